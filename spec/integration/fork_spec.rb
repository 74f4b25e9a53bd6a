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

  # A handler that calls `fork` without a block leaves its child inside the
  # processor's thread, with copies of the parent's calls in flight. Left to
  # go on, the child took the handler's `exit` for "stop the client" (and
  # exited 0 whatever the status), ran the rest of the batch and the parent's
  # at_exit hooks. It ends instead once the handler returns, with the
  # handler's `exit` status if it called `exit`. Its context is the parent's:
  # timer calls there raise BridgeError.
  { "returns" => [nil, 0], "calls exit 7" => [7, 7] }.each do |ending, (exit_with, status)|
    it "ends a child forked without a block once the handler #{ending}; the parent goes on" do
      client = mock_consumer(topic)
      reader, writer = IO.pipe
      handled = Queue.new
      children = Queue.new
      client.subscribe(handler do |context, message|
        writer.puts("#{Process.pid} #{message.offset}") # atomic: shorter than PIPE_BUF
        if message.payload["fork"]
          child = fork
          if child.nil?
            writer.puts("#{Process.pid} #{message.offset}")
            exit(exit_with) if exit_with
            begin
              context.schedule(Time.now + 60)
            rescue Prosody::BridgeError => e
              writer.puts("#{Process.pid} #{e.class}")
            end
            next
          end

          children << child
        end
        handled << message.offset
      end)
      child = nil
      child_status = nil
      capture_logs do # the child's warning
        client.send_message(topic, "key", { "fork" => true })
        child = next_item(children, description: "the child's pid")
        _, child_status = wait_for(timeout: 10, description: "the child to end") do
          Process.wait2(child, Process::WNOHANG)
        end
      ensure
        Process.kill(:KILL, child) && Process.wait(child) if child && !child_status
      end
      5.times { |index| client.send_message(topic, "key", { "n" => index }) }
      expect(Array.new(6) { next_item(handled, description: "the parent's messages") }).to eq((0..5).to_a)
      writer.close
      calls = reader.read.lines.map(&:split)

      expect(child_status.exitstatus).to eq(status)
      expect(calls.select { |pid, _| pid == child.to_s }.map(&:last))
        .to eq(exit_with ? ["0"] : ["0", "Prosody::BridgeError"])
      expect(calls.count { |pid, _| pid == Process.pid.to_s }).to eq(6)
    end
  end
end
