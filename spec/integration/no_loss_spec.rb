# frozen_string_literal: true

# Every message sent is handled: N sent (some before, some after the consumer
# joined) means the handler sees N distinct offsets, each with its payload.
RSpec.describe "no message loss" do
  it "hands every sent message to the handler" do
    topic = unique_name("no-loss")
    client = mock_consumer(topic)
    seen = Queue.new
    send_concurrently(client, topic, 300, keys: %w[a b c d e])
    client.subscribe(handler { |_context, message| seen << [message.offset, message.payload["seq"]] })
    send_concurrently(client, topic, 300, keys: %w[f g h], payload: ->(index) { { "seq" => 300 + index } })

    wait_for(timeout: 30, description: "600 messages") { seen.size >= 600 }
    pairs = Array.new(seen.size) { seen.pop }
    expect(pairs.map(&:first)).to match_array((0...600).to_a)
    expect(pairs.map(&:last)).to match_array((0...600).to_a)
  end
end
