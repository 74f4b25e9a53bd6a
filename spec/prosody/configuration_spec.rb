# frozen_string_literal: true

RSpec.describe Prosody::Configuration do
  def error_for(**options)
    described_class.new(**options)
  rescue Prosody::ConfigurationError => e
    e
  else
    raise "expected Prosody::ConfigurationError for #{options.inspect}"
  end

  it "knows exactly the options the native core accepts, each with the kind of value the core's table gives it" do
    expect(described_class::OPTIONS.keys.map(&:to_s)).to match_array(Prosody::Native.option_names)
    expect(described_class::OPTIONS.to_h { |name, kind| [name.to_s, kind.to_s] }).to eq(Prosody::Native.option_kinds)
    expect(described_class::OPTIONS.values.uniq).to match_array(described_class.const_get(:CONVERTERS).keys)
  end

  it "takes the specification's names for two options as aliases the native core also knows" do
    expect(described_class::ALIASES.to_h { |name, option| [name.to_s, option.to_s] })
      .to eq(Prosody::Native.option_aliases)
    config = described_class.new(defer_enabled: false, scheduler_failure_weight: 0.5)
    expect(config.to_native).to eq("defer" => false, "scheduler_failure_share" => 0.5)
    expect(config[:defer_enabled]).to be(false)
    expect(config.set?(:scheduler_failure_weight)).to be(true)
    expect(config.merge(defer_enabled: true)[:defer]).to be(true)
    expect(described_class.new(defer: true, defer_enabled: nil)[:defer]).to be(true)
    expect(error_for(defer: true, defer_enabled: false).message)
      .to eq("invalid option `defer`: set twice, as `defer` and as `defer_enabled` (two names for one option); " \
             "set one of them")
    expect { config.merge(defer: true, defer_enabled: true) }.to raise_error(Prosody::ConfigurationError, /set twice/)
    expect(error_for(scheduler_failure_weight: 2).message).to include("scheduler_failure_share")
  end

  it "takes the span relations by the native core's names" do
    config = described_class.new(message_spans: "follows-from", timer_spans: :child)
    expect(config.to_native).to eq("message_spans" => :follows_from, "timer_spans" => :child)
    expect(error_for(timer_spans: :parent).message)
      .to eq("invalid option `timer_spans`: expected one of child, follows_from, got `parent`")
  end

  it "checks choices by the native core's names and spellings" do
    expect(described_class::MODES).to eq(%i[pipeline low_latency best_effort])
    expect(described_class.new(state_store: "PostgreSQL")[:state_store]).to eq(:postgres)
    expect(described_class.new(mode: ":Low-Latency")[:mode]).to eq(:low_latency)
    expect(error_for(state_store: :disk).message)
      .to eq("invalid option `state_store`: expected one of auto, postgres, memory, got `disk`")
  end

  it "keeps only the options that were set, with String keys, for the native client" do
    config = described_class.new(group_id: :billing, subscribed_topics: %i[a b], mock: true, source_system: nil)
    expect(config.to_native).to eq("group_id" => "billing", "subscribed_topics" => %w[a b], "mock" => true)
  end

  it "converts durations to Float seconds and leaves unit strings to the native parser" do
    config = described_class.new(commit_interval: 2, poll_interval: 0.25, send_timeout: "250ms",
                                 shutdown_timeout: :"5s")
    expect(config.to_native).to eq(
      "commit_interval" => 2.0, "poll_interval" => 0.25, "send_timeout" => "250ms", "shutdown_timeout" => "5s"
    )
  end

  it "accepts a String or a list for bootstrap servers and topics" do
    config = described_class.new(bootstrap_servers: "a:9092,b:9092", subscribed_topics: "invoices")
    expect(config[:bootstrap_servers]).to eq("a:9092,b:9092")
    expect(config[:subscribed_topics]).to eq("invoices")
  end

  it "turns kafka passthrough settings into Strings" do
    config = described_class.new(kafka: { "compression.type": :zstd, "linger.ms" => 5, "enable.idempotence" => true })
    expect(config[:kafka]).to eq("compression.type" => "zstd", "linger.ms" => "5", "enable.idempotence" => "true")
  end

  it "normalises the mode to a Symbol and rejects unknown modes" do
    expect(described_class.new(mode: "low-latency")[:mode]).to eq(:low_latency)
    expect(described_class.new(mode: :best_effort).to_native).to eq("mode" => :best_effort)
    expect(error_for(mode: :fastest).message).to start_with("invalid option `mode`")
  end

  it "accepts a probe port, or false / none to turn probes off" do
    config = described_class.new(state_store: :memory, probe_port: false, max_retries: 0)
    expect(config.to_native).to eq("state_store" => :memory, "probe_port" => false, "max_retries" => 0)
    expect(described_class.new(probe_port: :none)[:probe_port]).to be(false)
    expect(described_class.new(probe_port: "9000")[:probe_port]).to eq(9000)
    expect(described_class.new(probe_port: 0)[:probe_port]).to eq(0)
  end

  it "accepts the deduplication options, with 0 turning it off and a version of any label" do
    config = described_class.new(idempotence_cache_size: 0, idempotence_version: 2, idempotence_ttl: "1d")
    expect(config.to_native).to eq(
      "idempotence_cache_size" => 0, "idempotence_version" => "2", "idempotence_ttl" => "1d"
    )
    expect(described_class.new(idempotence_version: :v3)[:idempotence_version]).to eq("v3")
  end

  it "accepts the scheduler and monopolization options, shares as Float from above 0 to 1" do
    config = described_class.new(scheduler_decay: "30s", scheduler_failure_share: 0.5, scheduler_max_wait: 10,
                                 scheduler_wait_weight: 0, monopolization_window: "1m", monopolization_threshold: 1)
    expect(config.to_native).to eq(
      "scheduler_decay" => "30s", "scheduler_failure_share" => 0.5, "scheduler_max_wait" => 10.0,
      "scheduler_wait_weight" => 0,
      "monopolization_window" => "1m", "monopolization_threshold" => 1.0
    )
    expect(Prosody::Client.new(mock: true, group_id: "g", scheduler_failure_share: 0.25)).to be_a(Prosody::Client)
  end

  it "accepts allowed event prefixes as a list" do
    expect(described_class.new(allowed_events: %i[invoice. payment.])[:allowed_events]).to eq(%w[invoice. payment.])
  end

  it "names an unknown option and lists the known ones" do
    error = error_for(group: "billing")
    expect(error.message).to include("`group`", "group_id")
  end

  {
    { group_id: 42 } => "group_id",
    { group_id: "  " } => "group_id",
    { subscribed_topics: ["a", 1] } => "subscribed_topics",
    { mock: "yes" } => "mock",
    { max_concurrency: 0 } => "max_concurrency",
    { max_uncommitted: 1.5 } => "max_uncommitted",
    { commit_interval: -1 } => "commit_interval",
    { poll_interval: Float::NAN } => "poll_interval",
    { send_timeout: [] } => "send_timeout",
    { kafka: "acks=all" } => "kafka",
    { kafka: { "acks" => [1] } } => "kafka",
    { max_retries: -1 } => "max_retries",
    { probe_port: 70_000 } => "probe_port",
    { probe_port: true } => "probe_port",
    { mode: 1 } => "mode",
    { timeout: [1] } => "timeout",
    { idempotence_cache_size: -1 } => "idempotence_cache_size",
    { idempotence_version: "" } => "idempotence_version",
    { idempotence_ttl: -5 } => "idempotence_ttl",
    { scheduler_failure_share: 0 } => "scheduler_failure_share",
    { scheduler_failure_share: "0.3" } => "scheduler_failure_share",
    { monopolization_threshold: 1.5 } => "monopolization_threshold",
    { scheduler_max_wait: -1 } => "scheduler_max_wait"
  }.each do |options, name|
    it "names `#{name}` when given #{options.inspect}" do
      expect(error_for(**options).message).to start_with("invalid option `#{name}`")
    end
  end

  it "is frozen and merges into a new configuration" do
    config = described_class.new(group_id: "a", mock: true)
    merged = config.merge(group_id: "b")
    expect(config).to be_frozen
    expect(merged.to_h).to eq(group_id: "b", mock: true)
    expect(config[:group_id]).to eq("a")
  end

  it "reports which options were set" do
    config = described_class.new(group_id: "a")
    expect(config.set?(:group_id)).to be(true)
    expect(config.set?("mock")).to be(false)
  end

  it "masks secrets in inspect" do
    config = described_class.new(
      kafka: { "sasl.password" => "hunter2", "security.protocol" => "SASL_SSL" },
      database_url: "postgres://app:hunter3@db/prosody"
    )
    expect(config.inspect).not_to include("hunter2", "hunter3")
    expect(config.inspect).to include("SASL_SSL", "database_url=")
  end
end
