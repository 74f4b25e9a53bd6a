# frozen_string_literal: true

require "open3"
require "socket"

# Bad input is refused with a clear Prosody error and never breaks the client:
# a payload that is not JSON, a nil key and invalid options raise, and the same
# client goes on sending and consuming afterwards.
RSpec.describe "bad input" do
  let(:topic) { unique_name("bad-input") }
  let(:client) { mock_consumer(topic) }

  it "refuses a payload that is not JSON and keeps working" do
    seen = Queue.new
    client.subscribe(handler { |_context, message| seen << message.payload })
    expect { client.send_message(topic, "k", Object.new) }
      .to raise_error(Prosody::InvalidMessageError, /Object.*not a JSON value/)
    expect { client.send_message(topic, "k", { "deep" => [Float::INFINITY] }) }
      .to raise_error(Prosody::InvalidMessageError, /Infinity/)
    client.send_message(topic, "k", { "ok" => true })
    expect(seen.pop).to eq("ok" => true)
  end

  it "refuses a nil key with a message saying so" do
    expect { client.send_message(topic, nil, { "a" => 1 }) }
      .to raise_error(Prosody::InvalidMessageError, "key must be a non-empty String, got nil")
    expect(client.send_message(topic, "k", { "a" => 1 })).to be_nil
  end

  it "refuses invalid headers" do
    expect { client.send_message(topic, "k", {}, headers: { "n" => 1 }) }
      .to raise_error(Prosody::InvalidMessageError, /header `n`/)
    expect { client.send_message(topic, "k", {}, headers: { nil => "x" }) }
      .to raise_error(Prosody::InvalidMessageError, "header name NilClass is not a String or Symbol")
  end

  it "refuses a topic name with a NUL byte, naming it" do
    expect { client.send_message("#{topic}\0shadow", "k", { "a" => 1 }) }
      .to raise_error(Prosody::InvalidMessageError, /topic "#{topic}\\0shadow" is not a topic name/)
  end

  it "refuses a key that is not UTF-8 or not a String, naming the problem" do
    expect { client.send_message(topic, "\xFF\x00k".b, { "a" => 1 }) }
      .to raise_error(Prosody::InvalidMessageError, /key is not valid UTF-8: "\\xff\\x00k"/)
    expect { client.send_message(topic, 42, { "a" => 1 }) }
      .to raise_error(Prosody::InvalidMessageError, /key must be a non-empty String, got Integer/)
    expect(client.send_message(topic, "plain ascii".b, { "a" => 1 })).to be_nil
  end

  it "refuses a source-system header: the source_system option sets it" do
    expect { client.send_message(topic, "k", {}, headers: { "source-system" => "elsewhere" }) }
      .to raise_error(Prosody::InvalidMessageError, /source_system/)
  end

  it "explains a store that cannot be reached: the cause and the server, not the password" do
    port = TCPServer.open("127.0.0.1", 0) { |server| server.addr[1] }
    failure = Queue.new
    # Deferred retry would hold the partition until its store answers; this is about the timer call's error.
    store_client = mock_consumer(topic, database_url: "postgres://prosody:s3cret@127.0.0.1:#{port}/orders",
                                        defer: false)
    store_client.subscribe(handler do |context, _message|
      context.schedule(Time.now + 60)
    rescue Prosody::Error => e
      failure << e
    end)
    store_client.send_message(topic, "k", {})
    error = next_item(failure, timeout: 30, description: "the timer call's error")
    expect(error).to be_a(Prosody::StoreError)
    expect(error.message).to match(/refused/i).and include("127.0.0.1:#{port}").and include("orders")
    expect(error.message).not_to include("s3cret")
  end

  {
    { bogus_option: true } => "bogus_option",
    { max_concurrency: "10" } => "max_concurrency",
    { max_retries: "3" } => "max_retries",
    { send_timeout: 1e12 } => "send_timeout",
    { send_timeout: Float::NAN } => "send_timeout",
    { shutdown_timeout: -1 } => "shutdown_timeout",
    { kafka: { "sesion.timeout.ms" => "9000" } } => "kafka",
    { database_url: "not a url" } => "database_url",
    { max_concurrency: 0 } => "max_concurrency",
    { commit_interval: "soon" } => "commit_interval",
    { source_system: "billing\0x" } => "source_system",
    { subscribed_topics: ["orders", "pay\0ments"] } => "subscribed_topics"
  }.each do |options, name|
    it "raises a ConfigurationError naming `#{name}` for #{options.inspect}" do
      expect { Prosody::Client.new(mock: true, group_id: "g", subscribed_topics: topic, **options) }
        .to raise_error(Prosody::ConfigurationError) { |error| expect(error.message).to include("`#{name}`") }
    end
  end

  it "names the unknown kafka setting" do
    expect { Prosody::Client.new(mock: true, group_id: "g", kafka: { "sesion.timeout.ms" => "9000" }) }
      .to raise_error(Prosody::ConfigurationError, /unknown librdkafka setting `sesion.timeout.ms`/)
  end

  # Client.new in a process of its own, with `env` added to its environment:
  # the runtime is built once per process, by its first client, and Ruby's own
  # ENV refuses some of the values tried here. Returns what Client.new said
  # (stdout), stderr and the exit status.
  define_method(:new_client_with_env) do |env|
    script = <<~RUBY
      require "prosody"
      begin
        Prosody::Client.new(mock: true, source_system: "s")
        puts "created"
      rescue Prosody::ConfigurationError => e
        puts "ConfigurationError: \#{e.message}"
      end
    RUBY
    lib = File.expand_path("../../lib", __dir__)
    Open3.capture3(env, RbConfig.ruby, "-I", lib, "-e", script)
  end

  # Tokio used to read the variable itself and panic on a worker thread,
  # leaving only "BridgeError: the worker thread ended without a result" and a
  # Rust backtrace.
  { "abc" => "a bad", "0" => "a zero", "\xFF".b => "a non-UTF-8" }.each do |value, what|
    it "raises a ConfigurationError at Client.new for #{what} TOKIO_WORKER_THREADS, without a panic" do
      out, err, status = new_client_with_env("TOKIO_WORKER_THREADS" => value)
      expect(status).to be_success, err
      expect(out).to include("ConfigurationError: TOKIO_WORKER_THREADS must be a positive whole number")
      expect(err).not_to include("panicked")
    end
  end

  it "takes a positive TOKIO_WORKER_THREADS" do
    out, err, status = new_client_with_env("TOKIO_WORKER_THREADS" => "3")
    expect(status).to be_success, err
    expect(out).to eq("created\n")
  end

  # Reading PROSODY_* variables used to read every variable as UTF-8, and one
  # that was not (anywhere in the environment) panicked: a Ruby `fatal`.
  it "ignores an environment variable that is not UTF-8 when it is not Prosody's" do
    out, err, status = new_client_with_env("UNRELATED_BYTES" => "\xFF".b)
    expect(status).to be_success, err
    expect(out).to eq("created\n")
  end

  { "PROSODY_MAX_CONCURRENCY" => "max_concurrency", "PROSODY_KAFKA_SASL_PASSWORD" => "kafka" }.each do |name, option|
    it "names `#{option}` when #{name} is not UTF-8, without showing the value" do
      out, err, status = new_client_with_env(name => "s3cret\xFF".b)
      expect(status).to be_success, err
      expect(out).to include("ConfigurationError: invalid option `#{option}`: " \
                             "the environment variable #{name} is not valid UTF-8")
      expect(out).not_to include("s3cret")
    end
  end

  it "still parses whole numbers from PROSODY_* environment variables" do
    ENV["PROSODY_MAX_CONCURRENCY"] = "7"
    expect { Prosody::Client.new(mock: true, group_id: "g") }.not_to raise_error
  ensure
    ENV.delete("PROSODY_MAX_CONCURRENCY")
  end
end
