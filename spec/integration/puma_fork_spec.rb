# frozen_string_literal: true

require "net/http"
require "socket"
require "tmpdir"

# A real Puma (Debian's `puma`) in cluster mode with preload_app!: the master
# loads the app, which creates a Prosody client and sends with it, then forks
# two workers. Each worker creates its own client on first use and sends from
# its request threads; every message arrives. The master's client, used in a
# worker, raises BridgeError telling to create a new client in the child.
RSpec.describe "Puma cluster mode with preload_app!" do
  app_dir = File.expand_path("../fixtures/puma_app", __dir__)
  let(:topic) { unique_name("puma") }

  def get(port, path)
    Net::HTTP.start("127.0.0.1", port, open_timeout: 2, read_timeout: 15) do |http|
      response = http.get(path)
      [response.code.to_i, response.body]
    end
  rescue Errno::ECONNREFUSED, Errno::ECONNRESET, EOFError
    nil
  end

  it "sends from both workers, nothing lost, and names the fix for a pre-fork client" do
    received = collect(topic)
    port = free_port
    env = {
      "PORT" => port.to_s, "TOPIC" => topic,
      "PROSODY_BOOTSTRAP_SERVERS" => Prosody::MockCluster.bootstrap_servers
    }
    log = File.join(Dir.mktmpdir("prosody-puma"), "puma.log")
    puma = Process.spawn(env, "puma", "--config", "puma.rb", "config.ru", chdir: app_dir, %i[out err] => log)
    begin
      wait_for(timeout: 30, description: "Puma's workers to serve") { get(port, "/nothing") }

      sent = []
      pids = Hash.new(0)
      wait_for(timeout: 60, description: "requests served by both workers") do
        requests = Array.new(4) do
          seq = sent.size
          sent << seq
          Thread.new { get(port, "/send?seq=#{seq}") }
        end
        requests.each do |request|
          status, body = request.value
          expect(status).to eq(200), "a send failed: #{body.inspect}\n#{File.read(log)}"
          pids[body] += 1
        end
        pids.size >= 2 && sent.size >= 20
      end

      status, body = get(port, "/preloaded")
      expect(status).to eq(409)
      expect(body).to include("created before the process forked", "create a new Prosody::Client in the child")

      messages = Array.new(sent.size + 1) { next_item(received, description: "every message sent") }
      expect(messages.map(&:key)).to include("master")
      seqs = messages.reject { |message| message.key == "master" }.map { |message| message.payload.fetch("seq") }
      expect(seqs).to match_array(sent)
      expect(messages.map(&:key).uniq.size).to eq(3) # the master and both workers
    ensure
      Process.kill("TERM", puma)
      Process.wait(puma)
    end
  end
end
