# frozen_string_literal: true

# After fork, a child has none of the parent's threads: Prosody's bridge thread
# and tokio runtime stay behind. A child starts its own on its first client, so
# clients made in the child work even when the parent used Prosody first; a
# client made before the fork raises BridgeError saying to make a new one.
RSpec.describe "fork" do
  let(:topic) { unique_name("fork") }

  it "lets a child create and use new clients after the parent used Prosody" do
    received = collect(topic)
    parent = mock_client(topic:)
    parent.send_message(topic, "parent", { "from" => "parent" })
    bootstrap = Prosody::MockCluster.bootstrap_servers

    reader, writer = IO.pipe
    pid = fork do
      reader.close
      outcome = {}
      begin
        parent.send_message(topic, "stale", {})
        outcome[:stale] = "sent"
      rescue Prosody::BridgeError => e
        outcome[:stale] = e.message
      end
      child = Prosody::Client.new(bootstrap_servers: bootstrap, source_system: "fork-child", send_timeout: 10)
      3.times { |index| child.send_message(topic, "child", { "index" => index }) }
      outcome[:sent] = 3
    rescue Exception => e # rubocop:disable Lint/RescueException -- reported to the parent
      outcome[:error] = "#{e.class}: #{e.message}"
    ensure
      writer.write(Marshal.dump(outcome))
      writer.close
      exit!(0) # the child must not run RSpec's at_exit hooks
    end
    writer.close
    outcome = Marshal.load(reader.read) # rubocop:disable Security/MarshalLoad -- our own child
    Process.wait(pid)

    expect(outcome[:error]).to be_nil
    expect(outcome[:stale]).to include("created before the process forked", "create a new Prosody::Client in the child")
    expect(outcome[:sent]).to eq(3)
    keys = Array.new(4) { next_item(received, description: "the messages of parent and child").key }
    expect(keys.sort).to eq(%w[child child child parent])
  end
end
