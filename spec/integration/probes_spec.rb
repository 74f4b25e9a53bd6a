# frozen_string_literal: true

require "net/http"
require "socket"

# The HTTP probe server runs while the client is subscribed (probe_port: 0
# picks a free port, reported by client.probe_port): /readyz answers 200 once
# partitions are assigned; /livez answers 503 while a partition is stalled (a
# handler stuck for longer than stall_threshold, with a timeout far longer) and
# 200 again once it finishes. Before subscribing and after unsubscribing there
# is no server (probe_port is nil, connections are refused).
RSpec.describe "health probes" do
  let(:topic) { unique_name("probes") }

  # The status code of GET `path`, or :refused when nothing listens.
  def probe(port, path)
    Net::HTTP.start("127.0.0.1", port, open_timeout: 2, read_timeout: 2) { |http| http.get(path).code.to_i }
  rescue Errno::ECONNREFUSED
    :refused
  end

  it "serves /readyz and /livez while subscribed, and reports a stall" do
    client = mock_consumer(topic, probe_port: 0, stall_threshold: 0.3, timeout: 60)
    expect(client.probe_port).to be_nil
    expect(probe(free_port, "/livez")).to eq(:refused)

    release = Queue.new
    started = Queue.new
    client.subscribe(handler do |_context, _message|
      started << true
      release.pop
    end)
    port = client.probe_port
    expect(port).to be_an(Integer).and be_positive

    wait_for(description: "partition assignment") { client.assigned_partitions == 1 }
    expect(probe(port, "/readyz")).to eq(200)
    expect(probe(port, "/livez")).to eq(200)
    expect(client).not_to be_stalled

    client.send_message(topic, "stuck", {})
    next_item(started, description: "the handler to start")
    wait_for(description: "/livez to report the stall") { probe(port, "/livez") == 503 }
    expect(client.is_stalled?).to be(true)

    release << :go
    wait_for(description: "/livez to recover") { probe(port, "/livez") == 200 }
    expect(client.stalled?).to be(false)

    client.unsubscribe
    expect(client.probe_port).to be_nil
    expect(probe(port, "/readyz")).to eq(:refused)
  end

  it "answers 404 for other paths" do
    client = mock_consumer(topic, probe_port: 0)
    client.subscribe(handler { |_context, _message| nil })
    port = client.probe_port
    wait_for(description: "partition assignment") { client.assigned_partitions == 1 }
    expect(probe(port, "/readyz")).to eq(200)
    expect(probe(port, "/nope")).to eq(404)
  end

  it "runs no server with probe_port: false" do
    client = mock_consumer(topic, probe_port: false)
    client.subscribe(handler { |_context, _message| nil })
    expect(client.probe_port).to be_nil
  end
end
