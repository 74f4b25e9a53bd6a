# frozen_string_literal: true

require "json"
require "open3"

module Bench
  # Where the Ruby benchmarks run: the mock cluster inside this process, or the
  # broker named by PROSODY_BENCH_BOOTSTRAP. The gem has no admin client, so on
  # a real broker topics are created by the Rust bench's `create-topics`
  # subcommand (PROSODY_BENCH_BIN, default target/release/prosody-bench), which
  # also fills (b)'s topic and runs the core's consumer over it (`fill`, `noop-once`).
  class Cluster
    BOOTSTRAP_ENV = "PROSODY_BENCH_BOOTSTRAP"
    LOOPBACK_ENV = "PROSODY_BENCH_LOOPBACK"
    TOOL = File.expand_path("../../target/release/prosody-bench", __dir__)

    # @return [String, nil] the broker's host:port list, nil for the mock
    attr_reader :bootstrap

    def initialize(bootstrap = ENV.fetch(BOOTSTRAP_ENV, ""), tool: ENV.fetch("PROSODY_BENCH_BIN", TOOL))
      @bootstrap = bootstrap.strip.empty? ? nil : bootstrap.strip
      @tool = tool
    end

    def mock? = @bootstrap.nil?

    # Whether the broker is librdkafka's mock, here or in the parent process of
    # `prosody-bench loopback`: its quirks then apply.
    def mock_broker? = mock? || ENV.key?(LOOPBACK_ENV)

    def describe = mock? ? "in-process mock cluster" : "broker at #{@bootstrap}"

    # Client options for this cluster; probes off, as several clients run at once.
    def client_options
      base = mock? ? { mock: true } : { mock: false, bootstrap_servers: @bootstrap }
      base.merge(probe_port: false)
    end

    # Creates each topic; returns the partition count each ends up with (a
    # broker that refuses to create topics auto-creates them with its default).
    #
    # @param topics [Hash{String=>Integer}] name => partitions
    # @return [Hash{String=>Integer}]
    def create_topics(topics)
      return create_on_mock(topics) if mock?

      args = topics.map { |name, partitions| "#{name}:#{partitions}" }
      out, status = Open3.capture2(@tool, "create-topics", *args)
      raise "#{@tool} create-topics failed (#{status})" unless status.success?

      out.lines.to_h { |line| line.split.then { |name, count| [name, Integer(count)] } }
    end

    # Fills `topic` with `count` messages like the core's (a): a small JSON
    # payload over 1000 keys, no headers, produced in full batches (the Rust
    # bench's `fill`).
    def fill_like_core(topic, count)
      _, status = Open3.capture2(@tool, "fill", topic, count.to_s)
      raise "#{@tool} fill failed (#{status})" unless status.success?
    end

    # The core's no-op consumer over the first `count` messages of `topic`, by
    # a new group, in a process of its own (the Rust bench's `noop-once`).
    #
    # @return [Array(Float, Float)] messages per second, CPU seconds per 100k
    def core_noop(topic, count)
      out, status = Open3.capture2(@tool, "noop-once", topic, count.to_s)
      raise "#{@tool} noop-once failed (#{status})" unless status.success?

      JSON.parse(out).values_at("msgs_per_sec", "cpu_s_per_100k")
    end

    private

    def create_on_mock(topics)
      topics.each { |name, partitions| Prosody::MockCluster.create_topic(name, partitions:) }
      topics.dup
    end
  end
end
