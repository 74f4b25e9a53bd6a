# frozen_string_literal: true

RSpec.describe Prosody::AsyncTaskProcessor do
  let(:processors) { [] }

  after { processors.each(&:stop) }

  def start(event_handler)
    described_class.new(event_handler).start.tap { |processor| processors << processor }
  end

  def message(offset = 0, key: "k1")
    Prosody::Message.new("orders", 3, offset, key, nil, { "n" => offset }, {})
  end

  def submit(processor, task_id, msg = message(task_id), context: ProsodySpec::FakeNativeContext.new)
    completion = ProsodySpec::FakeCompletion.new
    processor.submit(task_id, context, msg, completion)
    completion
  end

  it "runs the handler with a Context and the message, then reports success" do
    seen = Queue.new
    processor = start(handler { |context, msg| seen << [context, msg] })
    completion = submit(processor, 1)
    expect(completion.outcome).to be_nil
    context, msg = seen.pop
    expect(context).to be_a(Prosody::Context)
    expect(msg.offset).to eq(1)
    expect(completion.outcomes.size).to eq(1)
  end

  # The parent's inbox lock may be held by a thread the child does not have.
  it "never touches the parent's native inbox in a forked child: it reads as closed there" do
    processor = described_class.new(handler { |_context, _msg| nil })
    expect(processor.inbox.take([], 0)).to eq([])
    pid = fork { exit!(processor.inbox.take([], 0).nil? && processor.stop ? 0 : 1) }
    _, status = Process.wait2(pid)
    expect(status.exitstatus).to eq(0)
  end

  # The child of a handler's `fork` without a block comes back into the
  # processor: it used to run the rest of the batch there, handling the
  # parent's messages a second time, and to report to the parent's completions.
  it "ends a child forked by a handler when the handler returns, before the rest of its batch" do
    reader, writer = IO.pipe
    children = Queue.new
    processor = start(handler do |_context, msg|
      writer.puts("#{Process.pid} #{msg.offset}") # atomic: shorter than PIPE_BUF
      children << (fork || writer.puts("#{Process.pid} #{msg.offset}") || next) if msg.offset == 1
    end)
    batch = [1, 2, 3].flat_map do |id|
      [id, ProsodySpec::FakeNativeContext.new, ProsodySpec::FakeCompletion.new, message(id)]
    end
    completions = batch.each_slice(4).map { |slice| slice[2] }
    capture_logs do
      processor.submit_batch(batch)
      expect(completions.map(&:outcome)).to eq([nil, nil, nil])
      child = children.pop
      ended = wait_for(timeout: 10, description: "the child to end") { Process.wait2(child, Process::WNOHANG) }
    ensure
      Process.kill(:KILL, child) && Process.wait(child) if child && !ended
    end
    writer.close
    calls = reader.read.lines.map(&:split)

    expect(calls.count { |pid, _| pid == Process.pid.to_s }).to eq(3)
    expect(calls.reject { |pid, _| pid == Process.pid.to_s }.map(&:last)).to eq(["1"])
    expect(completions.map { |completion| completion.outcomes.size }).to eq([1, 1, 1])
  end

  it "runs calls concurrently, one fiber each, on the processor thread" do
    started = []
    threads = Queue.new
    processor = start(handler do |_context, msg|
      threads << Thread.current
      started << msg.offset
      # The first call can only finish once the second has started, which
      # requires the first to yield while it waits.
      sleep(0.001) until started.include?(2)
    end)
    first = submit(processor, 1)
    second = submit(processor, 2)
    expect([first.outcome, second.outcome]).to eq([nil, nil])
    expect(threads.pop).to equal(threads.pop)
  end

  it "runs calls that never yield one after another on one long-lived fiber" do
    fibers = Queue.new
    processor = start(handler { |_context, _msg| fibers << Fiber.current })
    completions = Array.new(3) { |index| submit(processor, index + 1) }
    expect(completions.map(&:outcome)).to eq([nil, nil, nil])
    expect(Array.new(3) { fibers.pop }.uniq.size).to eq(1)
  end

  it "hands the calls of a batch to another fiber while one waits" do
    release = Queue.new
    order = Queue.new
    processor = start(handler do |_context, msg|
      release.pop if msg.offset == 1 # waits (yields to the reactor) until released
      order << msg.offset
    end)
    batch = [1, 2, 3].flat_map do |id|
      completion = ProsodySpec::FakeCompletion.new
      [id, ProsodySpec::FakeNativeContext.new, completion, message(id)]
    end
    processor.submit_batch(batch)
    completions = batch.each_slice(4).map { |slice| slice[2] }
    expect([completions[1].outcome, completions[2].outcome]).to eq([nil, nil])
    release << :go
    expect(completions[0].outcome).to be_nil
    expect(Array.new(3) { order.pop }).to eq([2, 3, 1])
  end

  # Each call queues the next before it ends, so the processor never finds
  # itself without work: only the reactor turns it takes between batches let
  # the waiting call resume.
  it "resumes a waiting call while calls that never wait keep coming" do
    resumed = Queue.new
    stream_until = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 15
    processor = start(handler do |_context, msg|
      if msg.offset.zero?
        sleep(0.01) # yields to the reactor
        resumed << :resumed
      elsif resumed.empty? && Process.clock_gettime(Process::CLOCK_MONOTONIC) < stream_until
        submit(processor, msg.offset + 1)
      end
    end)
    waiting = submit(processor, 0)
    submit(processor, 1)
    expect(waiting.outcome(timeout: 5)).to be_nil
  end

  it "lets tasks a call started outlive it, while later calls run" do
    child_done = Queue.new
    release = Queue.new
    processor = start(handler do |_context, msg|
      Async { child_done << release.pop } if msg.offset == 1
    end)
    expect(submit(processor, 1).outcome).to be_nil
    expect(submit(processor, 2).outcome).to be_nil
    release << :later
    expect(child_done.pop).to eq(:later)
  end

  it "stops the tasks a cancelled call started" do
    log = Queue.new
    processor = start(handler do |_context, msg|
      next unless msg.offset == 1

      Async do
        sleep 30
      ensure
        log << :child_ensure
      end
      sleep 30
    end)
    completion = submit(processor, 1)
    processor.cancel(1)
    expect(completion.outcome).to be_a(Prosody::CancelledError)
    expect(log.pop).to eq(:child_ensure)
    expect(submit(processor, 2).outcome).to be_nil
  end

  it "reports and logs a handler's exception, and keeps running" do
    calls = Queue.new
    logs = capture_logs do
      processor = start(handler do |_context, msg|
        calls << msg.offset
        raise ArgumentError, "bad amount" if msg.offset == 7
      end)
      failed = submit(processor, 7, message(7, key: "acct-9"))
      expect(failed.outcome).to be_a(ArgumentError).and(have_attributes(message: "bad amount"))
      expect(submit(processor, 8).outcome).to be_nil
    end
    expect(logs.string).to include("topic=orders", "partition=3", "offset=7", 'key="acct-9"',
                                   "ArgumentError: bad amount")
  end

  it "reports a handler without on_message as failed instead of dying" do
    processor = start(Prosody::EventHandler.new)
    capture_logs do
      expect(submit(processor, 1).outcome).to be_a(NotImplementedError)
      expect(submit(processor, 2).outcome).to be_a(NotImplementedError)
    end
    expect(processor).to be_running
  end

  it "reports a handler that overflows its stack as failed instead of dying" do
    recurse = ->(depth) { recurse.call(depth + 1) + 1 }
    processor = start(handler { |_context, msg| recurse.call(0) if msg.offset == 1 })
    capture_logs do
      expect(submit(processor, 1).outcome).to be_a(SystemStackError)
      expect(submit(processor, 2).outcome).to be_nil
    end
  end

  it "releases on_cancel on cancellation, stops the call and runs its ensure blocks" do
    log = Queue.new
    processor = start(handler do |context, _msg|
      context.on_cancel
      log << [:released, context.should_cancel?]
      sleep 30 # the processor stops the call here
      log << :not_stopped
    ensure
      log << :ensure
    end)
    completion = submit(processor, 1)
    processor.cancel(1)
    expect(completion.outcome).to be_a(Prosody::CancelledError)
    expect([log.pop, log.pop]).to eq([[:released, true], :ensure])
    expect(log).to be_empty
  end

  it "stops a call that never looks at its context" do
    ensured = Queue.new
    processor = start(handler do |_context, _msg|
      sleep 30
    ensure
      ensured << true
    end)
    completion = submit(processor, 1)
    processor.cancel(1)
    expect(completion.outcome).to be_a(Prosody::CancelledError).and(have_attributes(message: /offset=1/))
    expect(ensured.pop).to be(true)
  end

  it "ignores the cancellation of a call that already finished" do
    processor = start(handler { |_context, _msg| nil })
    completion = submit(processor, 1)
    expect(completion.outcome).to be_nil
    processor.cancel(1)
    processor.cancel(99)
    expect(submit(processor, 2).outcome).to be_nil
    expect(completion.outcomes).to eq([nil])
  end

  it "waits for calls in flight when stopped" do
    finished = []
    processor = start(handler do |_context, msg|
      sleep 0.05
      finished << msg.offset
    end)
    completions = (1..3).map { |id| submit(processor, id) }
    processor.stop
    expect(finished).to contain_exactly(1, 2, 3)
    expect(completions.map(&:outcomes)).to eq([[nil], [nil], [nil]])
    expect(processor).not_to be_running
  end

  it "gives up waiting after the timeout, leaving a call that ignores cancellation to finish in the background" do
    release = Queue.new
    started = Queue.new
    processor = start(handler do |_context, _msg|
      started << true
      begin
        release.pop
      rescue Async::Stop
        retry # ignores cancellation
      end
    end)
    completion = submit(processor, 1)
    started.pop
    processor.cancel(1)
    began = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    expect(processor.stop(timeout: 0.2)).to be(false)
    expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - began).to be < 2
    expect(processor).to be_running

    release << :go
    expect(completion.outcome).to be_nil
    wait_for(description: "the processor thread to end") { !processor.running? }
    expect(processor.stop(timeout: 0.2)).to be(true)
  end

  it "reports calls submitted after stop as cancelled" do
    processor = start(handler { |_context, _msg| nil })
    processor.stop
    expect(submit(processor, 1).outcome).to be_a(Prosody::CancelledError)
  end

  it "starts only once" do
    processor = start(handler { |_context, _msg| nil })
    expect { processor.start }.to raise_error(Prosody::StateError)
  end

  it "knows its own thread" do
    on_thread = Queue.new
    processor = start(handler { |_context, _msg| on_thread << processor.processor_thread? })
    submit(processor, 1).outcome
    expect(on_thread.pop).to be(true)
    expect(processor.processor_thread?).to be(false)
  end
end
