# frozen_string_literal: true

# A handler may send messages itself (the usual forward/fan-out pattern): its
# send suspends only its own fiber, so other handler calls keep running while
# it waits for the acknowledgement, and the forwarded messages arrive.
RSpec.describe "sending from inside a handler" do
  it "forwards messages without blocking the other handler calls" do
    source = unique_name("source")
    sink = unique_name("sink")
    Prosody::MockCluster.create_topic(sink, partitions: 1)
    forwarder = mock_consumer(source)
    in_flight = 0
    most = 0
    forwarder.subscribe(handler do |_context, message|
      in_flight += 1
      most = [most, in_flight].max
      forwarder.send_message(sink, message.key, { "forwarded" => message.payload["n"] })
    ensure
      in_flight -= 1
    end)

    received = Queue.new
    reader = mock_consumer(sink)
    reader.subscribe(handler { |_context, message| received << message.payload["forwarded"] })
    send_concurrently(forwarder, source, 50, keys: Array.new(10) { |index| "k#{index}" },
                                             payload: ->(index) { { "n" => index } })

    wait_for(timeout: 30, description: "50 forwarded messages") { received.size >= 50 }
    expect(Array.new(received.size) { received.pop }).to match_array((0...50).to_a)
    expect(most).to be > 1
  end
end
