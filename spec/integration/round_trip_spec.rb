# frozen_string_literal: true

# A message arrives as it was sent: the JSON payload decoded with String keys,
# the key, the headers (plus the source-system header) and a timestamp.
RSpec.describe "message round trip" do
  it "delivers payload, key, headers and timestamp" do
    topic = unique_name("round-trip")
    client = mock_consumer(topic)
    received = Queue.new
    client.subscribe(handler { |_context, message| received << message })
    payload = { id: 7, "nested" => { "list" => [1, 2.5, nil, true, false, "é"] }, sym: :value }
    client.send_message(topic, "acct-7", payload, headers: { "origin" => "web" })

    message = received.pop
    expect(message).to have_attributes(topic:, partition: 0, key: "acct-7")
    expect(message.payload).to eq(
      "id" => 7, "nested" => { "list" => [1, 2.5, nil, true, false, "é"] }, "sym" => "value"
    )
    expect(message.headers).to include("origin" => "web")
    expect(message.timestamp).to be_a(Time).and(be_within(60).of(Time.now))
  end

  # Consecutive messages with equal headers share one frozen Hash (core and
  # extension both reuse the previous message's); each message must still get
  # exactly its own headers.
  it "gives each message its own headers when neighbours share theirs" do
    topic = unique_name("headers")
    client = mock_consumer(topic)
    sent = [{ "origin" => "web" }, { "origin" => "web" }, { "origin" => "app" }, {}, { "origin" => "web", "n" => "1" },
            { "origin" => "web" }]
    Async { sent.each_with_index.map { |headers, index| client.send_message(topic, "k#{index}", {}, headers:) } }
    received = Queue.new
    client.subscribe(handler { |_context, message| received << message })

    wait_for(description: "#{sent.size} messages") { received.size == sent.size }
    Array.new(sent.size) { received.pop }.each do |message|
      expected = sent.fetch(Integer(message.key.delete_prefix("k")))
      expect(message.headers.except("source-system")).to eq(expected)
      expect(message.headers).to be_frozen
      expect(message.headers.values).to all(be_frozen)
    end
  end
end
