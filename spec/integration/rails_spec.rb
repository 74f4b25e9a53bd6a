# frozen_string_literal: true

require "json"
require "open3"
require "net/http"
require "rbconfig"
require "socket"
require "tmpdir"

# A minimal Rails 6.1 app (spec/fixtures/rails_app, Debian's ruby-rails)
# connected to this process's mock cluster through PROSODY_BOOTSTRAP_SERVERS,
# which wins over the bootstrap_servers of its config/prosody.yml. Served by
# Puma, its controller sends with Prosody.client from parallel requests, in
# threads mode and in cluster mode (the master uses Prosody.client before it
# forks: each worker builds its own); every message is read back. The
# `prosody` runner boots the same app with --rails and runs a handler from
# app/handlers that sends with Prosody.client.
RSpec.describe "Rails integration" do
  let(:app_dir) { File.expand_path("../fixtures/rails_app", __dir__) }
  let(:exe) { File.expand_path("../../exe/prosody", __dir__) }
  let(:lib) { File.expand_path("../../lib", __dir__) }
  let(:topic) { unique_name("rails") }
  let(:dir) { Dir.mktmpdir("prosody-rails") }
  let(:log) { File.join(dir, "log") }
  let(:children) { [] }
  let(:app_env) do
    { "RAILS_ENV" => "test", "PROSODY_BOOTSTRAP_SERVERS" => Prosody::MockCluster.bootstrap_servers,
      "RUBYLIB" => lib }
  end

  after do
    children.each do |pid|
      Process.kill("TERM", pid)
      wait_for(timeout: 30, description: "child #{pid} to exit") { Process.wait2(pid, Process::WNOHANG) }
    rescue Errno::ESRCH, Errno::ECHILD
      nil
    end
    FileUtils.rm_rf(dir)
  end

  def log_text
    File.exist?(log) ? File.read(log) : ""
  end

  def request(port, method, path, form = nil)
    Net::HTTP.start("127.0.0.1", port, open_timeout: 2, read_timeout: 20) do |http|
      response = method == :post ? http.post(path, URI.encode_www_form(form)) : http.get(path)
      [response.code.to_i, response.body]
    end
  rescue Errno::ECONNREFUSED, Errno::ECONNRESET, EOFError
    nil
  end

  def start_puma(workers:, **env)
    port = free_port
    pid = Process.spawn(app_env.merge("PORT" => port.to_s, "WORKERS" => workers.to_s, "TOPIC" => topic, **env),
                        "puma", "--config", "config/puma.rb", "config.ru", chdir: app_dir, %i[out err] => log)
    children << pid
    wait_for(timeout: 60, description: "Puma to serve the Rails app") { request(port, :get, "/nothing") }
    port
  end

  # Sends `rounds` batches of `parallel` requests at once; returns the seqs sent
  # and the pids (of Puma processes) that served them.
  def send_in_parallel(port, rounds:, parallel:, until_pids: 1)
    sent = []
    pids = Hash.new(0)
    wait_for(timeout: 90, description: "#{until_pids} process(es) to serve #{rounds} rounds") do
      seqs = Array.new(parallel) { sent.size.tap { |seq| sent << seq } }
      threads = seqs.map { |seq| Thread.new { request(port, :post, "/messages", { "seq" => seq }) } }
      threads.each do |thread|
        status, body = thread.value
        expect(status).to eq(200), "a send failed: #{body.inspect}\n#{log_text}"
        pids[body] += 1
      end
      (rounds -= 1) <= 0 && pids.size >= until_pids
    end
    [sent, pids]
  end

  it "sends from parallel requests on Puma's threads with Prosody.client configured from prosody.yml" do
    received = collect(topic)
    port = start_puma(workers: 0)

    status, body = request(port, :get, "/prosody")
    expect(status).to eq(200), log_text
    shown = JSON.parse(body)
    # send_timeout: explicit config.prosody (10) over the file (5); bootstrap_servers: PROSODY_* over the file.
    expect(shown["options"]).to include("source_system" => "rails-fixture", "send_timeout" => 10.0,
                                        "probe_port" => false, "kafka" => { "client.id" => "rails-fixture" })
    expect(shown["options"]).not_to have_key("bootstrap_servers")
    expect(shown["rails_logger"]).to be(true)

    sent, pids = send_in_parallel(port, rounds: 5, parallel: 8)
    expect(pids.keys).to eq([shown["pid"].to_s])
    messages = Array.new(sent.size) { next_item(received, description: "every message sent") }
    expect(messages.map { |message| message.payload.fetch("seq") }).to match_array(sent)
    expect(messages.map { |message| message.headers["source-system"] }.uniq).to eq(["rails-fixture"])
  end

  it "sends from both workers in cluster mode after the master used Prosody.client before forking" do
    received = collect(topic)
    port = start_puma(workers: 2, "BOOT_TOPIC" => topic)

    sent, pids = send_in_parallel(port, rounds: 3, parallel: 6, until_pids: 2)
    messages = Array.new(sent.size + 1) { next_item(received, description: "every message sent") }
    boot, served = messages.partition { |message| message.key == "boot" }
    expect(boot.size).to eq(1)
    expect(pids.keys).not_to include(boot.first.payload.fetch("pid").to_s) # the master booted, workers served
    expect(served.map { |message| message.payload.fetch("seq") }).to match_array(sent)
    expect(served.map(&:key).uniq).to match_array(pids.keys.map { |pid| "worker-#{pid}" })
    expect(log_text).not_to include("BridgeError")
  end

  it "runs a handler of the app with `prosody --rails`, which sends with Prosody.client" do
    in_topic = unique_name("rails-in")
    Prosody::MockCluster.create_topic(in_topic)
    forwarded = collect(topic)
    env = app_env.merge("OUT_TOPIC" => topic, "LOG_LEVEL" => "info")
    pid = Process.spawn(env, RbConfig.ruby, exe, "--rails", "--handler", "ForwardHandler",
                        "--group", unique_name("rails-group"), "--topics", in_topic,
                        chdir: app_dir, %i[out err] => log)
    children << pid
    wait_for(timeout: 60, description: "the runner to subscribe") { log_text.include?("running ForwardHandler") }

    producer = mock_client
    keys = Array.new(5) { |index| "order-#{index}" }
    keys.each_with_index { |key, index| producer.send_message(in_topic, key, { "n" => index }) }
    messages = Array.new(keys.size) { next_item(forwarded, timeout: 30, description: "every message forwarded") }
    expect(messages.map(&:key)).to match_array(keys)
    expect(messages.map(&:payload)).to all(include("rails_env" => "test", "initialized" => true,
                                                   "controller" => "loaded"))
    expect(messages.map { |message| message.headers["source-system"] }.uniq).to eq(["rails-fixture"])

    Process.kill("TERM", pid)
    status = wait_for(timeout: 30, description: "the runner to stop") { Process.wait2(pid, Process::WNOHANG)&.last }
    children.delete(pid)
    expect(status.exitstatus).to eq(0), log_text
    expect(log_text).to include("booted the Rails app RailsFixture::Application (test)", "stopped cleanly")
  end

  it "boots the app of the current directory when nothing is required" do
    output, status = Open3.capture2e(app_env, RbConfig.ruby, exe, "--handler", "MessagesController", chdir: app_dir)
    # MessagesController exists only once the app is booted (Rails autoloads app/controllers).
    expect(output).to include("handler `MessagesController` must be a subclass of Prosody::EventHandler")
    expect(status.exitstatus).to eq(2)
  end
end
