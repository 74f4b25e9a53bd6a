# frozen_string_literal: true

require "json"
require "open3"
require "rbconfig"

module Bench
  # (f) Memory under a backlog, from Ruby: the resident set of a Ruby consumer
  # facing 500k messages with a handler that sleeps 5 ms (default
  # max_concurrency), against the same process idle after Prosody::Client.new,
  # and the backlog's raw size for contrast. Like the Rust bench's memory.rs.
  #
  # The broker holds the backlog in memory (the mock cluster lives in this
  # process), so the consumer runs in a child process (bench/memory_child.rb)
  # that connects to the broker's address with mock: false.
  module Memory
    BACKLOG = 500_000
    # The mock cluster's fetch cost grows with partition length.
    PER_PARTITION = 25_000
    # Sends in flight while filling: the fill is setup, not a measurement.
    FILL_FIBERS = 1_000
    CHILD = File.expand_path("../memory_child.rb", __dir__)

    module_function

    # Measures and reports against idle, the backlog's size and the core's growth.
    def run(cluster, report, backlog)
      figures = measure(cluster, backlog)
      idle, peak = %w[idle_kib peak_kib].map { |key| figures.fetch(key) / 1024.0 }
      backlog_mb = figures.fetch("backlog_bytes") / 1024.0 / 1024.0
      {
        "backlog_messages" => backlog, "backlog_mb" => backlog_mb.round(1), "idle_rss_mb" => idle.round(1),
        "peak_rss_mb" => peak.round(1), "growth_mb" => (peak - idle).round(1),
        "peak_vs_idle_ratio" => (peak / idle).round(2), "peak_after_secs" => figures["peak_after_secs"],
        "handled" => figures.fetch("handled"), "rss_by_second_mb" => figures["rss_by_second_mb"]
      }.each { |name, value| report["ruby_memory_#{name}"] = value }
      rows(report, figures, idle:, peak:, backlog_mb:)
    end

    def rows(report, figures, idle:, peak:, backlog_mb:)
      scenario = "(f) Ruby consumer peak RSS, #{report.figures["ruby_memory_backlog_messages"]}-msg backlog, " \
                 "#{figures["partitions"]} partitions, 5 ms handler, 12 s (#{figures["handled"]} handled)"
      report.row(scenario, format("%.1f MB", peak), format("same process idle after Client.new %.1f MB", idle),
                 format("%.2fx", peak / idle))
      growth = "(f) Ruby consumer RSS growth over idle (same run)"
      report.row(growth, format("%.1f MB", peak - idle), format("backlog size (keys + payloads) %.1f MB", backlog_mb),
                 format("%.2f", (peak - idle) / backlog_mb))
      report.compare(growth, peak - idle, format("%.1f MB", peak - idle),
                     key: "memory_growth_mb", baseline: "core consumer's growth",
                     ratio_key: "ruby_vs_core_memory_growth_ratio")
    end

    # @return [Hash] the child's figures ("idle_kib", "peak_kib", "handled", …)
    #   plus "backlog_bytes" and "partitions"
    def measure(cluster, backlog = BACKLOG)
      topic = Bench.unique("memory")
      partitions = cluster.create_topics(topic => (backlog / PER_PARTITION.to_f).ceil).fetch(topic)
      bytes = fill(cluster, topic, backlog)
      out, status = Open3.capture2(RbConfig.ruby, *load_path_flags, CHILD, bootstrap(cluster), topic)
      raise "#{CHILD} failed (#{status})" unless status.success?

      JSON.parse(out.lines.last).merge("backlog_bytes" => bytes, "partitions" => partitions)
    end

    def bootstrap(cluster) = cluster.mock? ? Prosody::MockCluster.bootstrap_servers : cluster.bootstrap

    # The child loads this process's build of the extension and lib/.
    def load_path_flags
      native = $LOADED_FEATURES.find { |path| path.include?("prosody_native") }
      [native && File.dirname(native, 2), File.expand_path("../../lib", __dir__)].compact.map { |dir| "-I#{dir}" }
    end

    # Fills `topic` with the producer scenario's payloads; returns the bytes of keys and payloads.
    def fill(cluster, topic, count)
      client = Consuming.producer(cluster)
      Async do |task|
        Array.new(FILL_FIBERS) do |fiber|
          task.async do
            fiber.step(count - 1, FILL_FIBERS).sum do |n|
              key = "key-#{n % Producing::KEYS}"
              payload = Producing.payload(n)
              client.send_message(topic, key, payload)
              key.bytesize + JSON.generate(payload).bytesize
            end
          end
        end.sum(&:wait)
      end.wait
    end
  end
end
