# frozen_string_literal: true

# send_message is safe from many callers at once: from plain threads (each
# blocks only itself) and from fibers inside one Async reactor (each suspends
# only itself). Every send is acknowledged, then every message is consumed.
RSpec.describe "concurrent sends" do
  let(:topic) { unique_name("concurrent") }
  let(:client) { mock_consumer(topic) }

  def consume_all(expected)
    seen = Queue.new
    client.subscribe(handler { |_context, message| seen << message.payload["id"] })
    wait_for(timeout: 30, description: "#{expected.size} messages") { seen.size >= expected.size }
    expect(Array.new(seen.size) { seen.pop }).to match_array(expected)
  end

  it "accepts sends from 8 threads at once" do
    results = Queue.new
    start = Queue.new
    threads = Array.new(8) do |thread|
      Thread.new do
        start.pop
        25.times { |index| results << client.send_message(topic, "t#{thread}", { "id" => "#{thread}-#{index}" }) }
      end
    end
    8.times { start << :go }
    threads.each(&:join)

    expect(Array.new(results.size) { results.pop }).to eq(Array.new(200))
    consume_all(8.times.flat_map { |thread| Array.new(25) { |index| "#{thread}-#{index}" } })
  end

  it "accepts sends from 100 fibers at once inside Async" do
    in_flight = 0
    most = 0
    results = Async do |task|
      Array.new(100) do |index|
        task.async do
          in_flight += 1
          most = [most, in_flight].max
          client.send_message(topic, "f#{index % 10}", { "id" => index })
        ensure
          in_flight -= 1
        end
      end.map(&:wait)
    end.wait

    expect(results).to eq(Array.new(100))
    # All 100 were waiting for their acknowledgement at the same time: a send
    # suspends its fiber instead of blocking the reactor.
    expect(most).to eq(100)
    consume_all((0...100).to_a)
  end
end
