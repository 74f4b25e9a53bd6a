# frozen_string_literal: true

require "json"

# Helpers of bench/ruby_bench.rb.
module Bench
  # The figures of one run (a flat Hash written as JSON) and the table rows
  # printed on stdout: scenario, figure, the baseline measured in the same run,
  # and figure / baseline. The rows go into the JSON too, under "table", so
  # bench/merge_results.rb can print every suite in one table. The Rust bench's
  # report.rs writes the same shape.
  class Report
    attr_reader :figures, :rows

    # @param core [Hash] the Rust bench's figures, the baselines of {#compare}
    def initialize(core = {})
      @core = core
      @figures = {}
      @rows = []
    end

    # Adds a row comparing `figure` (shown as `shown`) with the core figure
    # `key`, named `baseline`, and records the ratio under `ratio_key`; without
    # that core figure (no --core JSON), the row says so.
    def compare(scenario, figure, shown, key:, baseline:, ratio_key:)
      value = @core[key]
      return row(scenario, shown, "#{baseline}: not in --core JSON") unless value

      ratio = Bench.ratio(figure, value)
      @figures[ratio_key] = ratio.round(3)
      row(scenario, shown, "#{baseline} #{Report.show(key, value)}", format("%.2f", ratio))
    end

    # A core figure with the unit its key ends with.
    def self.show(key, value)
      return format("%.2f ms", value) if key.end_with?("_ms")
      return format("%.1f MB", value) if key.end_with?("_mb")
      return format("%.2f CPU s/100k", value) if key.end_with?("_per_100k")

      Bench.per_second(value)
    end

    def []=(key, value)
      @figures[key] = value
    end

    def row(scenario, figure, baseline = "", ratio = "")
      @rows << { "scenario" => scenario, "figure" => figure, "baseline" => baseline, "ratio" => ratio }
    end

    def print(title)
      Report.print_table(title, @rows)
    end

    def to_h = @figures.merge("table" => @rows)

    def write(path)
      File.write(path, "#{JSON.pretty_generate(to_h)}\n")
    end

    # Prints `rows` (Hashes with "scenario", "figure", "baseline", "ratio") under `title`.
    def self.print_table(title, rows)
      all = [{ "scenario" => title, "figure" => "figure", "baseline" => "baseline (same run)", "ratio" => "ratio" },
             *rows]
      widths = %w[scenario figure baseline].to_h { |field| [field, all.map { |row| row[field].to_s.length }.max] }
      all.each { |row| puts line(row, widths) }
    end

    def self.line(row, widths)
      [row["scenario"].to_s.ljust(widths["scenario"]), row["figure"].to_s.rjust(widths["figure"]),
       row["baseline"].to_s.ljust(widths["baseline"]), row["ratio"]].join("  ").rstrip
    end
    private_class_method :line
  end

  module_function

  # "12345 msg/s"
  def per_second(value) = "#{value.round} msg/s"

  # figure / baseline, or nil without a baseline.
  def ratio(figure, baseline) = baseline&.positive? ? figure.to_f / baseline : nil

  # Nearest-rank quantile of `values`.
  def percentile(values, quantile)
    sorted = values.sort
    sorted[((sorted.size - 1) * quantile).round] || 0.0
  end

  def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)

  # CPU seconds this process has used, every thread together.
  def cpu_now = Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID)

  # CPU seconds the calling thread has used.
  def thread_cpu_now = Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID)

  # This process's resident set size in MB (Linux), or nil where /proc is missing.
  def rss_mb
    status = File.read("/proc/self/status")
    kb = status[/^VmRSS:\s+(\d+)/, 1]
    kb && (Integer(kb) / 1024.0)
  rescue SystemCallError
    nil
  end

  def unique(name) = "bench-#{name}-#{Process.pid}-#{rand(1 << 30)}"

  # Polls `condition` every 10 ms until it holds; raises after `timeout` seconds.
  def wait_until(timeout, what)
    deadline = now + timeout
    until yield
      raise "timed out after #{timeout} s waiting for #{what}" if now > deadline

      sleep 0.01
    end
  end
end
