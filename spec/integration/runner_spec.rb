# frozen_string_literal: true

require "rbconfig"
require "tmpdir"

# The `prosody` executable as a real child process, connected to this
# process's mock cluster like any Kafka client. It loads an application file,
# subscribes the named handler class and serves. On SIGTERM it logs what it is
# waiting for, lets the in-flight handlers finish, commits, leaves the group
# and exits 0; a consumer that joins the same group afterwards handles none of
# the finished messages again, only new ones. SIGTSTP is logged and ignored. A
# second SIGTERM during a slow shutdown exits at once with status 128 + 15,
# unless it comes within a second of the first (then it is taken for a
# duplicate delivery and ignored). A handler that calls `exit` stops the runner
# as TERM would.
RSpec.describe "the prosody runner" do
  # When the last member leaves a group, librdkafka's mock coordinator waits
  # session timeout - 1 s for members to rejoin before it assigns partitions
  # (rd_kafka_mock_cgrp_classic_rebalance); with the default session (45 s) the
  # successor below would wait 44 s. Both sides use a short session instead.
  let(:group_session) { { "session.timeout.ms" => "1500", "heartbeat.interval.ms" => "200" } }

  let(:root) { File.expand_path("../..", __dir__) }
  let(:dir) { Dir.mktmpdir("prosody-runner") }
  let(:events) { File.join(dir, "events") }
  let(:log) { File.join(dir, "log") }
  let(:topic) { unique_name("runner") }
  let(:group) { unique_name("runner-group") }
  let(:children) { [] }

  # Each handler call appends "start <offset>", calls exit(4) for the key "exit", sleeps (yielding its fiber)
  # and appends "end <offset>".
  let(:app) do
    File.join(dir, "app.rb").tap do |path|
      File.write(path, <<~RUBY)
        # frozen_string_literal: true

        class SlowHandler < Prosody::EventHandler
          def on_message(_context, message)
            record("start \#{message.offset}")
            exit(4) if message.key == "exit"
            sleep Float(ENV.fetch("HANDLER_SECONDS"))
            record("end \#{message.offset}")
          end

          private

          def record(line)
            File.open(ENV.fetch("EVENTS_FILE"), "a") { |file| file.puts(line) }
          end
        end
      RUBY
    end
  end

  after do
    children.each do |pid|
      Process.kill("KILL", pid)
      Process.wait(pid)
    rescue Errno::ESRCH, Errno::ECHILD
      nil
    end
    FileUtils.rm_rf(dir)
  end

  def runner_arguments(shutdown_timeout)
    [
      "--require", app, "--handler", "SlowHandler",
      "--brokers", Prosody::MockCluster.bootstrap_servers, "--group", group, "--topics", topic,
      "--probe-port", "none", "--shutdown-timeout", shutdown_timeout.to_s,
      *group_session.flat_map { |setting, value| ["--kafka", "#{setting}=#{value}"] }
    ]
  end

  # Starts `ruby -Ilib exe/prosody ...` and waits until it owns the topic's partition.
  def spawn_runner(handler_seconds:, shutdown_timeout: 10)
    Prosody::MockCluster.create_topic(topic)
    env = { "EVENTS_FILE" => events, "HANDLER_SECONDS" => handler_seconds.to_s }
    pid = Process.spawn(env, RbConfig.ruby, "-Ilib", "exe/prosody", *runner_arguments(shutdown_timeout),
                        chdir: root, out: log, err: log)
    children << pid
    wait_for(timeout: 30, description: "the runner to subscribe") { log_text.include?("running SlowHandler") }
    wait_for(timeout: 30, description: "the runner's partition assignment") { log_text.include?("partitions assigned") }
    pid
  end

  def log_text
    File.exist?(log) ? File.read(log) : ""
  end

  def event_lines
    File.exist?(events) ? File.readlines(events, chomp: true) : []
  end

  # The exit status of `pid`, waiting up to `timeout` seconds.
  def exit_status(pid, timeout: 30)
    status = wait_for(timeout:, description: "the runner to exit") { Process.wait2(pid, Process::WNOHANG)&.last }
    children.delete(pid)
    status
  end

  it "exits 0 without subscribing when SIGTERM arrives while the application boots" do
    booting = File.join(dir, "booting")
    slow_app = File.join(dir, "slow_boot.rb")
    File.write(slow_app, "File.write(#{booting.inspect}, 'yes')\nsleep 3\nrequire #{app.inspect}\n")
    arguments = runner_arguments(10).map { |argument| argument == app ? slow_app : argument }
    pid = Process.spawn(RbConfig.ruby, "-Ilib", "exe/prosody", *arguments, chdir: root, out: log, err: log)
    children << pid
    wait_for(timeout: 30, description: "the application to start booting") { File.exist?(booting) }
    Process.kill("TERM", pid)
    status = exit_status(pid)
    expect(status.signaled?).to be(false), "killed by SIG#{Signal.signame(status.termsig.to_i)}: #{log_text}"
    expect(status.exitstatus).to eq(0), log_text
    expect(log_text).to include("SIGTERM while starting; exiting before subscribing")
    expect(log_text).not_to include("running SlowHandler")
  end

  it "finishes in-flight handlers on SIGTERM, exits 0, and nothing finished is handled again" do
    pid = spawn_runner(handler_seconds: 2)
    producer = mock_client
    3.times { |index| producer.send_message(topic, "key-#{index}", { "n" => index }) }
    wait_for(description: "three handlers in flight") { event_lines.count { |line| line.start_with?("start") } == 3 }

    Process.kill("TSTP", pid)
    wait_for(description: "SIGTSTP to be logged") { log_text.include?("SIGTSTP ignored") }
    Process.kill("TERM", pid)

    expect(exit_status(pid).exitstatus).to eq(0), log_text
    expect(event_lines).to include("end 0", "end 1", "end 2")
    expect(log_text).to include("stopping: waiting for 3 in-flight message(s) on 1 partition(s)", "stopped cleanly")

    successor = mock_client(group_id: group, subscribed_topics: topic, kafka: group_session)
    handled = Queue.new
    successor.subscribe(handler { |_context, message| handled << message.offset })
    producer.send_message(topic, "key-3", { "n" => 3 })
    expect(next_item(handled, timeout: 30)).to eq(3)
    expect(drain(handled)).to be_empty
  end

  it "stops gracefully when a handler calls exit" do
    pid = spawn_runner(handler_seconds: 0.1)
    mock_client.send_message(topic, "exit", {})

    expect(exit_status(pid).exitstatus).to eq(0), log_text
    expect(log_text).to include("handler called exit (status 4)", "stopped cleanly")
  end

  it "exits at once with 128 + 15 on a second SIGTERM during the shutdown" do
    pid = spawn_runner(handler_seconds: 60, shutdown_timeout: 60)
    mock_client.send_message(topic, "slow", {})
    wait_for(description: "the handler to start") { event_lines.include?("start 0") }

    Process.kill("TERM", pid)
    wait_for(description: "the shutdown to start") { log_text.include?("stopping: waiting for 1 in-flight message(s)") }
    Process.kill("TERM", pid) # within a second of the first: a duplicate
    wait_for(description: "the duplicate to be ignored") { log_text.include?("taken for a duplicate") }
    expect(Process.wait2(pid, Process::WNOHANG)).to be_nil

    # Sent until the runner exits, since a TERM within a second of the first is ignored.
    status = wait_for(timeout: 10, interval: 0.25, description: "the runner to exit on a later SIGTERM") do
      Process.kill("TERM", pid)
      Process.wait2(pid, Process::WNOHANG)&.last
    end
    children.delete(pid)
    expect(status.exitstatus).to eq(143), log_text
    expect(log_text).to include("SIGTERM again; exiting now with status 143")
    expect(event_lines).not_to include("end 0")
  end
end
