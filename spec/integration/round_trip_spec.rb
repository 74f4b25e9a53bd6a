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
end
