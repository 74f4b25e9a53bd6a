# frozen_string_literal: true

require "open3"

module Bench
  # Where the Ruby benchmarks run: the mock cluster inside this process, or the
  # broker named by PROSODY_BENCH_BOOTSTRAP. The gem has no admin client, so on
  # a real broker topics are created by the Rust bench's `create-topics`
  # subcommand (PROSODY_BENCH_BIN, default target/release/prosody-bench).
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

    private

    def create_on_mock(topics)
      topics.each { |name, partitions| Prosody::MockCluster.create_topic(name, partitions:) }
      topics.dup
    end
  end
end
