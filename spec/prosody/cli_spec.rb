# frozen_string_literal: true

require "prosody/cli"

RSpec.describe Prosody::CLI do
  def parse(*argv, env: {})
    described_class.new(argv, env:)
  end

  it "reads the files to require, the handler and the client options" do
    cli = parse("--require", "./app.rb", "-r", "./more.rb", "--handler", "Billing::InvoiceHandler",
                "--group-id", "billing", "--subscribed-topics", "invoices,payments", "--max-retries", "5")
    expect(cli.requires).to eq(%w[./app.rb ./more.rb])
    expect(cli.handler_name).to eq("Billing::InvoiceHandler")
    expect(cli.client_options).to eq(group_id: "billing", subscribed_topics: "invoices,payments", max_retries: 5)
  end

  it "passes whole-number options as Integers, which Configuration requires" do
    cli = parse("--max-concurrency", "10", "--idempotence-cache-size", "0")
    expect(cli.client_options).to eq(max_concurrency: 10, idempotence_cache_size: 0)
    expect { Prosody::Configuration.new(**cli.client_options) }.not_to raise_error
  end

  it "takes --rails, or PROSODY_RAILS, to boot the Rails app of the current directory" do
    expect(parse("--handler", "H").rails?).to be(false)
    expect(parse("--rails", "--handler", "H").rails?).to be(true)
    expect(parse(env: { "PROSODY_RAILS" => "true" }).rails?).to be(true)
    expect(parse(env: { "PROSODY_RAILS" => "0" }).rails?).to be(false)
    expect(parse.usage).to include("--rails", "--require FILE | --rails")
  end

  it "accepts underscores, `=` values and the short aliases" do
    cli = parse("--group=billing", "--topics", "invoices", "--brokers=kafka:9092", "--shutdown_timeout=30s",
                "--failure_topic", "invoices.dead")
    expect(cli.client_options).to eq(
      group_id: "billing", subscribed_topics: "invoices", bootstrap_servers: "kafka:9092",
      shutdown_timeout: "30s", failure_topic: "invoices.dead"
    )
  end

  it "has a flag for every client option" do
    usage = parse.usage
    Prosody::Configuration::OPTIONS.each do |name, kind|
      dashed = name.to_s.tr("_", "-")
      next if name == :kafka

      expect(usage).to match(kind == :flag ? /--\[no-\]#{dashed}\s/ : /--#{dashed}[ ,]/)
    end
    expect(usage).to include("--kafka SETTING=VALUE")
    expect(parse("--no-defer", "--defer-failure-threshold", "0.5", "--no-telemetry-enabled").client_options)
      .to eq(defer: false, defer_failure_threshold: 0.5, telemetry_enabled: false)
  end

  it "takes the scheduler's shares as Floats and its durations as given" do
    expect(parse("--scheduler-failure-share", "0.25", "--scheduler-max-wait", "30s").client_options)
      .to eq(scheduler_failure_share: 0.25, scheduler_max_wait: "30s")
  end

  it "takes --mock as a switch and repeated --kafka settings as a Hash" do
    cli = parse("--mock", "--kafka", "security.protocol=SSL", "--kafka", "ssl.ca.location=/etc/ca.pem")
    expect(cli.client_options).to eq(mock: true, kafka: { "security.protocol" => "SSL",
                                                          "ssl.ca.location" => "/etc/ca.pem" })
    expect(parse("--no-mock").client_options).to eq(mock: false)
  end

  it "falls back to PROSODY_REQUIRE, PROSODY_HANDLER and PROSODY_LOG_LEVEL" do
    env = { "PROSODY_REQUIRE" => "./boot.rb, ./app.rb", "PROSODY_HANDLER" => "Handler", "PROSODY_LOG_LEVEL" => "WARN" }
    cli = parse(env:)
    expect(cli.requires).to eq(%w[./boot.rb ./app.rb])
    expect(cli.handler_name).to eq("Handler")
    expect(cli.log_level).to eq("warn")
    expect(cli.client_options).to be_empty
  end

  it "lets flags win over the environment" do
    env = { "PROSODY_REQUIRE" => "./boot.rb", "PROSODY_HANDLER" => "Handler" }
    cli = parse("--require", "./other.rb", "--handler", "Other", "--log-level", "debug", env:)
    expect(cli.requires).to eq(%w[./other.rb])
    expect(cli.handler_name).to eq("Other")
    expect(cli.log_level).to eq("debug")
  end

  it "takes --log-format" do
    expect(parse("--log-format", "json").log_format).to eq("json")
    expect(parse.log_format).to be_nil
  end

  it "knows --help and --version" do
    expect(parse("--help")).to be_help
    expect(parse("-v")).to be_version
    expect(parse).not_to be_help
  end

  {
    %w[--no-such-flag] => "--no-such-flag",
    %w[--group] => "--group",
    %w[stray] => "stray",
    %w[--log-level loud] => "loud",
    %w[--log-format yaml] => "yaml",
    %w[--kafka acks] => "--kafka acks"
  }.each do |argv, named|
    it "raises a ConfigurationError naming #{named.inspect} for #{argv.join(" ")}" do
      expect { parse(*argv) }.to raise_error(Prosody::ConfigurationError, /#{Regexp.escape(named)}/)
    end
  end
end
