# frozen_string_literal: true

require "json"
require "open3"
require "rbconfig"

RSpec.describe Prosody::MessageLogger do
  def log_line(output)
    output.string.lines.last.to_s
  end

  it "tags a handler's lines with the message's topic, partition, offset and key" do
    topic = unique_name("logged")
    lines = Queue.new
    output = capture_logs(level: Logger::INFO) do |log|
      client = mock_consumer(topic)
      client.subscribe(handler do |context, message|
        context.logger.info("charged #{message.payload["amount"]}")
        context.logger.debug { raise "a block below the level is never called" }
        lines << :logged
      end)
      client.send_message(topic, "acct-9", { "amount" => 12 })
      next_item(lines, description: "the handler's log line")
      client.unsubscribe
      log
    end
    line = output.string.lines.grep(/charged/).first
    expect(line).to match(/INFO -- : \[topic=#{topic} partition=\d offset=0 key="acct-9"\] charged 12$/)
    expect(output.string).not_to include("never called")
  end

  it "follows Logger's calling conventions" do
    output = StringIO.new
    logger = described_class.new(Logger.new(output, level: Logger::WARN), { key: "k" })
    expect(logger.info("hidden")).to be(true)
    logger.warn("billing") { "with a progname" }
    logger.error { "from a block" }
    logger.add(Logger::ERROR, nil, "as the message")
    expect(logger).to have_attributes(level: Logger::WARN, info?: false, warn?: true)
    expect(output.string.lines.map { |line| line.split("-- ", 2).last })
      .to eq(["billing: [key=\"k\"] with a progname\n", ": [key=\"k\"] from a block\n",
              ": [key=\"k\"] as the message\n"])
  end

  it "writes JSON lines with the fields when PROSODY_LOG_FORMAT=json, native lines included" do
    script = <<~RUBY
      require "prosody"
      topic = "json-logs"
      client = Prosody::Client.new(mock: true, group_id: "g", subscribed_topics: topic, probe_port: false,
                                   source_system: "s")
      done = Queue.new
      handler = Class.new(Prosody::EventHandler) do
        define_method(:on_message) do |context, _message|
          context.logger.warn("slow downstream")
          done << true
        end
      end
      client.send_message(topic, "acct-9", { "n" => 1 })
      client.subscribe(handler.new)
      done.pop
      client.unsubscribe
    RUBY
    lib = File.expand_path("../../lib", __dir__)
    output, errors, status = Open3.capture3({ "PROSODY_LOG_FORMAT" => "json" }, RbConfig.ruby, "-I", lib, "-e", script)
    expect(status).to be_success, errors
    entries = output.lines.map { |line| JSON.parse(line) }
    expect(entries.find { |entry| entry["message"] == "slow downstream" })
      .to include("level" => "WARN", "topic" => "json-logs", "offset" => 0, "key" => "acct-9",
                  "partition" => a_kind_of(Integer), "time" => match(/\A\d{4}-\d\d-\d\dT.*Z\z/))
    expect(entries.find { |entry| entry["message"] == "subscribed" })
      .to include("progname" => "prosody", "group_id" => "g", "level" => "INFO")
  end

  it "refuses an unknown log format" do
    expect { Prosody.log_format = :yaml }.to raise_error(Prosody::ConfigurationError, /log_format.*text, json/)
  end
end
