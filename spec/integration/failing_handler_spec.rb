# frozen_string_literal: true

# A handler that raises does not stop the processor: the failure is logged with
# the message's topic, partition, offset and key and the error's class and
# message, the message is retried, and later messages are still handled.
RSpec.describe "a raising handler" do
  it "logs the failure and keeps handling messages" do
    topic = unique_name("failing")
    client = mock_consumer(topic)
    attempts = Hash.new(0)
    handled = Queue.new
    logs = capture_logs(level: Logger::INFO) do
      client.subscribe(handler do |_context, message|
        attempts[message.offset] += 1
        raise KeyError, "no account #{message.key}" if message.offset.even? && attempts[message.offset] == 1

        handled << message.offset
      end)
      10.times { |index| client.send_message(topic, "acct-#{index}", { "n" => index }) }
      wait_for(timeout: 30, description: "all 10 handled") { handled.size >= 10 }
      client.unsubscribe
    end

    expect(Array.new(handled.size) { handled.pop }).to match_array((0...10).to_a)
    [0, 2, 4, 6, 8].each do |offset|
      expect(logs.string).to include(
        "handler failed for topic=#{topic} partition=0 offset=#{offset} key=\"acct-#{offset}\": " \
        "KeyError: no account acct-#{offset}"
      )
    end
    expect(logs.string).not_to include("offset=1 key=")
  end

  it "survives a handler that raises every time with a permanent error" do
    topic = unique_name("poison")
    client = mock_consumer(topic)
    handled = Queue.new
    capture_logs do
      client.subscribe(handler do |_context, message|
        raise Prosody::PermanentError, "poison" if message.key == "poison"

        handled << message.key
      end)
      client.send_message(topic, "poison", {})
      client.send_message(topic, "healthy", {})
      expect(handled.pop).to eq("healthy")
      client.unsubscribe
    end
  end
end
