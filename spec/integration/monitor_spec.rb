# frozen_string_literal: true

# Prosody.monitor: subscribers get what the consumer and producer did, on the
# monitor's thread, with the details to act on; a subscriber that raises is
# logged and breaks nothing.
RSpec.describe "Prosody.monitor" do
  let(:topic) { unique_name("monitor") }
  let(:monitor) { Prosody.monitor }

  after { @subscribers&.each { |subscriber| monitor.unsubscribe(subscriber) } }

  def subscribe(...)
    (@subscribers ||= []) << monitor.subscribe(...)
  end

  it "delivers message, partition and send events with their details, on its own thread" do
    events = Queue.new
    threads = Queue.new
    subscribe("message.handled", "message.failed", "message.retried", "partition.assigned", "send.delivered") do |event|
      events << event
      threads << Thread.current.name
    end
    client = mock_consumer(topic, retry_base: 0.005, defer_base: 0.005, group_id: unique_name("group"))
    attempts = 0
    client.subscribe(handler do |_context, _message|
      attempts += 1
      raise ArgumentError, "first attempt fails" if attempts == 1
    end)
    client.send_message(topic, "acct-1", { "n" => 1 })
    seen = []
    seen << next_item(events, description: "monitor events") until seen.any? { |event| event.name == "message.handled" }
    by_name = seen.group_by(&:name)

    expect(by_name.keys).to include("partition.assigned", "send.delivered", "message.failed", "message.retried")
    failed = by_name["message.failed"].first
    expect(failed.payload).to include(topic:, partition: 0, offset: 0, key: "acct-1", reason: "transient",
                                      error_class: "ArgumentError", error_message: "first attempt fails",
                                      group_id: client.config[:group_id], mode: :pipeline)
    expect(by_name["message.retried"].first[:attempts]).to eq(1)
    expect(by_name["message.handled"].first[:duration]).to be_a(Float).and(be >= 0)
    expect(drain(threads).uniq).to eq(["prosody-monitor"])
  end

  # The message used to be converted strictly and came out empty.
  it "keeps a handler error's message whose bytes are not UTF-8, replacing the bad bytes" do
    failures = Queue.new
    subscribe("message.failed") { |event| failures << event }
    client = mock_consumer(topic, retry_base: 0.005, defer_base: 0.005, group_id: unique_name("group"))
    attempts = 0
    client.subscribe(handler do |_context, _message|
      attempts += 1
      raise ArgumentError, "bad \xFF bytes".b if attempts == 1
    end)
    client.send_message(topic, "k", { "n" => 1 })
    failed = next_item(failures, description: "the message.failed event")
    expect(failed[:error_class]).to eq("ArgumentError")
    expect(failed[:error_message]).to eq("bad \u{FFFD} bytes")
  end

  it "logs a subscriber that raises and still calls the others" do
    calls = Queue.new
    subscribe("send.delivered") { raise "subscriber bug" }
    subscribe("send.delivered") { |event| calls << event[:key] }
    client = mock_client
    logs = capture_logs(level: Logger::ERROR) do
      client.send_message(topic, "k", { "n" => 1 })
      expect(next_item(calls, description: "the second subscriber's call")).to eq("k")
      expect(monitor.flush).to be(true)
    end
    expect(logs.string).to include("Prosody.monitor subscriber for send.delivered raised RuntimeError: subscriber bug")
  end

  it "stops calling a subscriber after unsubscribe, and rejects unknown events" do
    calls = Queue.new
    subscriber = monitor.subscribe("send.delivered") { |event| calls << event }
    client = mock_client
    client.send_message(topic, "k", { "n" => 1 })
    next_item(calls, description: "the first delivery")
    monitor.unsubscribe(subscriber)
    expect(monitor.subscribed?("send.delivered")).to be(false)
    client.send_message(topic, "k", { "n" => 2 })
    expect(monitor.flush).to be(true)
    expect(calls).to be_empty
    expect { monitor.subscribe("message.teleported") { nil } }.to raise_error(ArgumentError, /unknown event/)
  end

  it "reports the handler thread's death as processor.died" do
    died = Queue.new
    subscribe("processor.died") { |event| died << event }
    client = mock_consumer(topic, group_id: unique_name("group"))
    handled = Queue.new
    capture_logs(level: Logger::FATAL) do
      client.subscribe(handler { |_context, message| handled << message.offset })
      client.send_message(topic, "key", { "n" => 1 })
      next_item(handled, description: "the first message")
      Thread.list.find { |thread| thread.name == "prosody-processor" && thread.alive? }.kill
      expect(next_item(died, description: "processor.died")[:group_id]).to eq(client.config[:group_id])
    end
  end

  it "reports a partition whose handler is stuck as consumer.stalled, once" do
    stalled = Queue.new
    subscribe("consumer.stalled") { |event| stalled << event }
    client = mock_consumer(topic, group_id: unique_name("group"), stall_threshold: 0.3, timeout: 30,
                                  shutdown_timeout: 0.5)
    release = Queue.new
    capture_logs(level: Logger::FATAL) do
      client.subscribe(handler { |_context, _message| release.pop })
      client.send_message(topic, "stuck", { "n" => 1 })
      event = next_item(stalled, description: "consumer.stalled")
      expect(event.payload).to include(topic:, partition: 0, duration: 0.3, group_id: client.config[:group_id])
      expect(client).to be_stalled
      sleep 1 # three more checks of the stall: none may report it again
      expect(stalled).to be_empty
    ensure
      release << true
      client.unsubscribe
    end
  end

  it "forwards the events that are not per message to ActiveSupport::Notifications" do
    require "active_support/notifications"
    notifications = Queue.new
    listener = ActiveSupport::Notifications.subscribe("message_failed.prosody") do |*, payload|
      notifications << payload
    end
    @subscribers = [*@subscribers, monitor.forward_to_active_support]
    client = mock_consumer(topic, retry_base: 0.005, defer_base: 0.005)
    attempts = 0
    client.subscribe(handler { |*| raise "once" if (attempts += 1) == 1 })
    client.send_message(topic, "k", { "n" => 1 })
    expect(next_item(notifications, description: "message_failed.prosody")).to include(topic:, key: "k")
  ensure
    ActiveSupport::Notifications.unsubscribe(listener) if listener
  end
end
