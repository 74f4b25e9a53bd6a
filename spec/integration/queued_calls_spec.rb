# frozen_string_literal: true

# The consumer queues handler calls on the processor ahead of time (twice
# max_concurrency beyond it), so a finished call's successor is already there.
# Queued calls are not running: at most max_concurrency handlers run at once,
# a call's timeout counts from when it starts, a timed-out handler is stopped
# even while every other call waits for its slot, and calls still queued at
# unsubscribe never run.
RSpec.describe "calls queued on the processor" do
  let(:topic) { unique_name("queued") }

  it "runs at most max_concurrency handlers at once" do
    total = 300
    client = mock_consumer(topic, max_concurrency: 4)
    send_concurrently(client, topic, total, keys: Array.new(100) { |index| "key-#{index}" })

    tracker = ProsodySpec::OrderTracker.new
    client.subscribe(handler { |_context, message| tracker.track(message) { sleep(0.005) } })
    wait_for(timeout: 60, description: "#{total} messages handled") { tracker.handled >= total }

    expect(tracker.violations).to be_empty
    expect(tracker.max_in_flight).to eq(4)
  end

  it "counts a queued call's timeout from its start" do
    # One handler at a time; each runs 0.2 s, the timeout is 0.3 s, so every
    # call but the first waits longer than its timeout before it starts.
    client = mock_consumer(topic, max_concurrency: 1, timeout: 0.3, mode: :best_effort, max_retries: 0)
    events = Queue.new
    client.subscribe(handler do |context, message|
      sleep 0.2
      events << [message.key, context.should_cancel?]
    end)
    %w[a b c d].each { |key| client.send_message(topic, key, {}) }

    outcomes = Array.new(4) { next_item(events, description: "four handlers to finish") }
    expect(outcomes.map(&:first)).to contain_exactly("a", "b", "c", "d")
    expect(outcomes.map(&:last)).to all(be(false))
  end

  it "stops a handler past its timeout while the calls queued behind it wait" do
    client = mock_consumer(topic, max_concurrency: 1, timeout: 0.3, mode: :best_effort, max_retries: 0)
    events = Queue.new
    client.subscribe(handler do |_context, message|
      if message.key == "stuck"
        events << [:started, now]
        begin
          sleep 60
        rescue Async::Stop
          events << [:stopped, now]
          raise
        end
      end
      events << [:handled, message.key]
    end)
    client.send_message(topic, "stuck", {})
    _, started = next_item(events, description: "the stuck handler to start")
    %w[a b c].each { |key| client.send_message(topic, key, {}) }

    kind, stopped = next_item(events, timeout: 10, description: "the stuck handler to be stopped")
    expect(kind).to eq(:stopped)
    expect(stopped - started).to be_between(0.25, 5)
    handled = Array.new(3) { next_item(events, description: "the queued calls to run").last }
    expect(handled).to contain_exactly("a", "b", "c")
  end

  it "drops the calls still queued when unsubscribe cancels them" do
    client = mock_consumer(topic, max_concurrency: 1, shutdown_timeout: 2)
    # All there at the assignment: the first call starts, two more are queued.
    %w[a b c d e f].each { |key| client.send_message(topic, key, {}) }
    started = Queue.new
    client.subscribe(handler do |_context, message|
      started << message.key
      sleep 5 # until unsubscribe stops it
    end)
    first = next_item(started, description: "the first handler to start")

    began = now
    client.unsubscribe
    expect(now - began).to be < 3
    # The processor's thread has ended: whatever ran has been recorded.
    expect(drain(started)).to be_empty, "queued calls ran after #{first} was cancelled"
  end
end
