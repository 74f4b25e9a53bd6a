# frozen_string_literal: true

require "net/http"

# Handlers run as fibers on one processor thread per subscription. Whatever a
# handler raises (Interrupt, NoMemoryError, a bare Exception) fails only that
# call: it is retried and the thread keeps serving. If the thread dies anyway,
# nothing can run, so the consumer must say so at once (stalled?, /livez 503)
# instead of retrying forever while reporting healthy. A handler that runs
# without yielding holds up every other handler of the process: it is logged
# and counted.
RSpec.describe "the handler thread" do
  let(:topic) { unique_name("processor") }

  def processor_thread
    Thread.list.find { |thread| thread.name == "prosody-processor" && thread.alive? }
  end

  def livez(port)
    Net::HTTP.start("127.0.0.1", port, open_timeout: 2, read_timeout: 2) { |http| http.get("/livez").code.to_i }
  end

  [Interrupt, NoMemoryError, Exception].each do |error_class|
    it "survives a handler raising #{error_class} and retries the message" do
      client = mock_consumer(topic, retry_base: 0.01, defer_base: 0.01)
      attempts = Queue.new
      handled = Queue.new
      logs = capture_logs(level: Logger::ERROR) do
        client.subscribe(handler do |_context, message|
          attempts << message.offset
          raise error_class, "raised by the handler" if attempts.size == 1

          handled << message.offset
        end)
        client.send_message(topic, "key", { "n" => 1 })
        expect(next_item(handled, description: "the retried message")).to eq(0)
      end

      expect(logs.string)
        .to include("handler failed for topic=#{topic} partition=0 offset=0 key=\"key\": #{error_class}")
      expect(attempts.size).to eq(2)
      expect(processor_thread).not_to be_nil
      expect(client.stalled?).to be(false)
    end
  end

  it "reports a dead processor thread at once: stalled?, /livez 503, one error line" do
    client = mock_consumer(topic, probe_port: 0, stall_threshold: 300)
    handled = Queue.new
    logs = capture_logs(level: Logger::ERROR) do
      client.subscribe(handler { |_context, message| handled << message.offset })
      client.send_message(topic, "key", { "n" => 1 })
      next_item(handled, description: "the first message")
      expect(livez(client.probe_port)).to eq(200)

      processor_thread.kill
      wait_for(timeout: 2, description: "stalled? to turn true") { client.stalled? }
      expect(livez(client.probe_port)).to eq(503)
    end
    expect(logs.string.scan("the handler thread (prosody-processor) died").size).to eq(1)
  end

  it "reports a dead bridge thread at once (/livez 503), and the next call starts a new one" do
    client = mock_consumer(topic, probe_port: 0, stall_threshold: 300)
    handled = Queue.new
    client.subscribe(handler { |_context, message| handled << message.offset })
    client.send_message(topic, "key", { "n" => 1 })
    next_item(handled, description: "the first message")

    port = client.probe_port
    Thread.list.find { |thread| thread.name == "prosody-bridge" }.kill
    # Only Rust runs here (no call into the client), as when an orchestrator probes.
    wait_for(timeout: 2, description: "/livez to answer 503") { livez(port) == 503 }

    # The next call into Prosody starts a fresh bridge: the consumer works again.
    client.send_message(topic, "key", { "n" => 2 })
    expect(next_item(handled, description: "a message handled after the bridge restarted")).to eq(1)
    expect(livez(port)).to eq(200)
  end

  it "takes handler calls while the bridge thread is busy in Ruby (calls do not go through it)" do
    client = mock_consumer(topic)
    handled = Queue.new
    client.subscribe(handler { |_context, message| handled << message.payload.fetch("n") })
    client.send_message(topic, "key", { "n" => 1 })
    expect(next_item(handled, description: "the first message")).to eq(1)

    # The native send answers on this "queue" from the bridge thread, whose
    # push then blocks until released: the bridge is stuck in Ruby code.
    entered = Queue.new
    gate = Queue.new
    blocking = Object.new
    blocking.define_singleton_method(:push) do |_result|
      entered << true
      gate.pop
    end
    client.instance_variable_get(:@native).send_message(topic, "key", { "n" => 2 }, {}, blocking)
    begin
      next_item(entered, description: "the bridge thread to block")
      expect(next_item(handled, description: "a message handled while the bridge is blocked")).to eq(2)
    ensure
      gate << :release
    end
  end

  it "logs and counts a handler that holds the reactor without yielding" do
    client = mock_consumer(topic, timeout: 30)
    handled = Queue.new
    logs = capture_logs(level: Logger::WARN) do
      client.subscribe(handler do |_context, message|
        deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 1.6
        nil while Process.clock_gettime(Process::CLOCK_MONOTONIC) < deadline # CPU-bound, never yields
        handled << message.key
      end)
      client.send_message(topic, "busy-key", { "n" => 1 })
      next_item(handled, description: "the busy handler to finish")
    end
    expect(logs.string).to match(/handler for topic=#{topic} partition=0 offset=0 key="busy-key" has held the reactor/)
    expect(client.blocking_handlers).to eq(1)
  end
end
