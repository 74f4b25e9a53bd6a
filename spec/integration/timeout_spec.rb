# frozen_string_literal: true

# A handler that runs past `timeout` is cancelled: its context says
# should_cancel?, Async::Stop is raised at its next yield point (here, inside
# sleep) and its ensure block runs; the attempt counts as a transient failure,
# so with best_effort and max_retries 0 the message is skipped and the next
# message of the key is handled. A handler that ignores cancellation (rescues
# Async::Stop and keeps going) cannot hold up unsubscribe: the core abandons it
# at the end of shutdown_timeout and unsubscribe returns.
RSpec.describe "handler timeout" do
  let(:topic) { unique_name("timeout") }

  it "cancels a handler that sleeps past the timeout" do
    client = mock_consumer(topic, mode: :best_effort, max_retries: 0, timeout: 0.3)
    events = Queue.new
    capture_logs(level: Logger::INFO) do |logs|
      client.subscribe(handler do |context, message|
        next events << [:handled, message.offset] unless message.payload["slow"]

        events << [:started, now]
        begin
          sleep 60
          events << :finished
        rescue Async::Stop
          events << [:stopped, now, context.should_cancel?]
          raise
        ensure
          events << :ensure
        end
      end)
      client.send_message(topic, "k", { "slow" => true })
      client.send_message(topic, "k", { "slow" => false })

      _, started_at = next_item(events, description: "the slow handler to start")
      _, stopped_at, cancelled = next_item(events, timeout: 10, description: "the slow handler to be stopped")
      expect(stopped_at - started_at).to be_between(0.25, 5)
      expect(cancelled).to be(true)
      expect(next_item(events)).to eq(:ensure)
      expect(next_item(events, description: "the next message of the key")).to eq([:handled, 1])
      # Native log lines come through the bridge thread, handler calls do not:
      # the line may arrive after the next message ran.
      wait_for(description: "the timeout's log line") do
        logs.string.include?("handler ran longer than the 300ms timeout")
      end
    end
  end

  it "does not let a handler that ignores cancellation hold up unsubscribe beyond shutdown_timeout" do
    client = mock_consumer(topic, shutdown_timeout: 1, timeout: 60)
    events = Queue.new
    release = false
    client.subscribe(handler do |_context, _message|
      events << :started
      begin
        sleep 0.05 until release
      rescue Async::Stop
        events << :ignored_stop
        retry
      end
      events << :finished
    end)
    client.send_message(topic, "stubborn", {})
    expect(next_item(events)).to eq(:started)

    began = now
    capture_logs { client.unsubscribe }
    expect(now - began).to be < 3
    expect(client.consumer_state).to eq(:configured)
    expect(next_item(events)).to eq(:ignored_stop)
  ensure
    release = true
  end
end
