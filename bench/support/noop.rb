# frozen_string_literal: true

module Bench
  # (b) a no-op Ruby handler vs the core's no-op figure: the cost of crossing
  # into Ruby per message, the processor thread's own share, and the same
  # messages again with a deeper pipeline (support/consuming.rb runs them).
  module Noop
    # The second run's max_concurrency, with room for the round trip (a tuning
    # hint, not a default: the option also bounds handlers waiting on I/O).
    DEEP = 128

    # Runs of the default case, each by a new group over the same messages; the
    # median run is reported, like the core's (a). On the 2-core development VM
    # one run in three or so lands ~30% below the others, the same build too
    # (every thread's CPU per message rises together): compare builds with
    # interleaved runs (`--against`), not with one figure each.
    RUNS = 3

    module_function

    def run(cluster, report, messages)
      topic = Bench.unique("noop")
      partitions = cluster.create_topics(topic => [(messages / 20_000.0).ceil, 1].max).fetch(topic)
      Consuming.fill(cluster, topic, messages, 1_000)
      (rate, cpu, processor_cpu, objects), range = median_run(cluster, report, topic, messages)
      scenario = "(b) Ruby no-op handler (#{messages} msgs, #{partitions} partitions, 1000 keys; " \
                 "median of #{RUNS} runs, #{range})"
      noop_report(report, scenario, messages, rate, cpu)
      processor_ceiling(report, scenario, processor_cpu)
      report["ruby_noop_objects_per_msg"] = objects.round(1)
      report.row("#{scenario}: Ruby objects allocated per message", format("%.1f", objects))
      noop_deep(cluster, report, topic, messages)
    end

    # The figures of the run with the median rate, and the runs' range as
    # text; records every run's rate.
    def median_run(cluster, report, topic, messages)
      runs = Array.new(RUNS) { Consuming.consume(cluster, topic, messages) }.sort_by(&:first)
      report["ruby_noop_runs_msgs_per_sec"] = runs.map { |run| run.first.round }
      [runs[RUNS / 2], "#{(runs.first.first / 1000).round}-#{(runs.last.first / 1000).round}k msg/s"]
    end

    # At the default max_concurrency a no-op call's round trip through both
    # sides bounds the rate: the same messages with room for DEEP calls show how much.
    def noop_deep(cluster, report, topic, messages)
      rate, cpu, = Consuming.consume(cluster, topic, messages, max_concurrency: DEEP)
      report["ruby_noop_deep_msgs_per_sec"] = rate.round
      report["ruby_noop_deep_cpu_s_per_100k"] = cpu.round(2)
      vs_core_rate(report, "(b) the same at max_concurrency #{DEEP} (#{format("%.2f CPU s/100k", cpu)})", rate,
                   "ruby_noop_deep_vs_core_noop_ratio")
    end

    def vs_core_rate(report, scenario, rate, ratio_key)
      report.compare(scenario, rate, Bench.per_second(rate), key: "core_noop_msgs_per_sec", baseline: "core no-op",
                                                             ratio_key:)
    end

    def noop_report(report, scenario, messages, rate, cpu)
      report["ruby_noop_messages"] = messages
      report["ruby_noop_msgs_per_sec"] = rate.round
      report["ruby_noop_cpu_s_per_100k"] = cpu.round(2)
      report["ruby_noop_rss_mb"] = Bench.rss_mb&.round(1)
      vs_core_rate(report, scenario, rate, "ruby_vs_core_noop_ratio")
      report.compare("#{scenario}: CPU", cpu, format("%.2f CPU s/100k", cpu),
                     key: "core_noop_cpu_s_per_100k", baseline: "core no-op", ratio_key: "ruby_vs_core_noop_cpu_ratio")
    end

    # Every Ruby handler call runs on the processor's one thread, under the
    # GVL: the rate that thread could sustain with every other cost gone (its
    # CPU per message, inverted) bounds the Ruby path once that thread is
    # saturated. With no-op calls it is not, and the figure is a floor (README).
    def processor_ceiling(report, scenario, processor_cpu)
      ceiling = 100_000 / processor_cpu
      report["ruby_noop_processor_cpu_s_per_100k"] = processor_cpu.round(2)
      report["ruby_noop_processor_ceiling_msgs_per_sec"] = ceiling.round
      vs_core_rate(report, "#{scenario}: processor thread alone (#{format("%.2f CPU s/100k", processor_cpu)}), " \
                           "100k / its CPU", ceiling, "ruby_processor_ceiling_vs_core_noop_ratio")
    end
  end
end
