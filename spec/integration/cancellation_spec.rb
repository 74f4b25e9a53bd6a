# frozen_string_literal: true

# Unsubscribing cancels handlers that do not finish within shutdown_timeout: a
# handler parked in context.on_cancel is released with should_cancel? true, a
# handler that ignores its context is stopped at its next yield point, and
# their ensure blocks run. Unsubscribe returns soon after the timeout.
RSpec.describe "cancellation on unsubscribe" do
  let(:topic) { unique_name("cancel") }
  let(:client) { mock_consumer(topic, shutdown_timeout: 1) }

  # Unsubscribes; returns the seconds it took and what was logged meanwhile.
  def unsubscribe_timed
    started = now
    logs = capture_logs(level: Logger::INFO) { client.unsubscribe }
    [now - started, logs.string]
  end

  it "releases a handler waiting in on_cancel and runs its ensure block" do
    events = Queue.new
    client.subscribe(handler do |context, _message|
      events << :started
      context.on_cancel
      events << [:released, context.should_cancel?]
    ensure
      events << :ensure
    end)
    client.send_message(topic, "k", {})
    expect(events.pop).to eq(:started)

    elapsed, logs = unsubscribe_timed
    expect(elapsed).to be < 5
    expect(logs).to match(/cancel/i)
    expect(Array.new(events.size) { events.pop }).to eq([[:released, true], :ensure])
    expect(client.consumer_state).to eq(:configured)
  end

  it "stops a handler that ignores cancellation at its next yield point" do
    events = Queue.new
    client.subscribe(handler do |_context, _message|
      events << :started
      sleep 60
      events << :finished
    ensure
      events << :ensure
    end)
    client.send_message(topic, "k", {})
    expect(events.pop).to eq(:started)

    elapsed, = unsubscribe_timed
    expect(elapsed).to be < 5
    expect(Array.new(events.size) { events.pop }).to eq([:ensure])
  end

  it "lets handlers that finish in time complete normally" do
    events = Queue.new
    client.subscribe(handler do |context, message|
      events << :started
      sleep 0.2
      events << [message.key, context.should_cancel?]
    end)
    client.send_message(topic, "k", {})
    expect(events.pop).to eq(:started)

    client.unsubscribe
    expect(Array.new(events.size) { events.pop }).to eq([["k", false]])
  end
end
