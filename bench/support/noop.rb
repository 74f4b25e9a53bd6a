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

    # Messages per partition at most, as the core's (a): 100k messages over 4.
    PER_PARTITION = 25_000

    # The Ruby path's target against the core on the same messages (issue 14).
    TARGET_VS_CORE = 0.3

    def run(cluster, report, messages)
      topic = Bench.unique("noop")
      partitions = cluster.create_topics(topic => [(messages / PER_PARTITION.to_f).ceil, 1].max).fetch(topic)
      fill(cluster, topic, messages)
      runs, cores = measure(cluster, topic, messages)
      (rate, cpu, processor_cpu, objects), range = median_run(report, runs)
      scenario = "(b) Ruby no-op handler (#{messages} msgs, #{partitions} partitions, 1000 keys; " \
                 "median of #{RUNS} runs, #{range})"
      noop_report(report, scenario, messages, rate, cpu)
      interleaved_report(report, messages, runs, cores) if cores
      processor_ceiling(report, scenario, processor_cpu)
      report["ruby_noop_objects_per_msg"] = objects.round(1)
      report.row("#{scenario}: Ruby objects allocated per message", format("%.1f", objects))
      noop_deep(cluster, report, topic, messages)
    end

    # On a broker outside this process, (a)'s kind of messages (the Rust
    # bench produces them), so that Ruby and the core read the same data: a
    # topic filled by Prosody's producer (headers, batches of the sends in
    # flight) took both ~2-3x longer to consume. On the in-process mock, which
    # the Rust bench cannot reach, Prosody's producer fills it.
    def fill(cluster, topic, messages)
      return Consuming.fill(cluster, topic, messages, 1_000) if cluster.mock?

      cluster.fill_like_core(topic, messages)
    end

    # RUNS Ruby runs over the messages, each by a new group; on a broker
    # outside this process, each followed by the core's run over the same
    # messages (nil on the in-process mock, which the core cannot reach).
    def measure(cluster, topic, messages)
      cores = cluster.mock? ? nil : []
      runs = Array.new(RUNS) do
        run = Consuming.consume(cluster, topic, messages)
        cores&.push(cluster.core_noop(topic, messages))
        run
      end
      [runs, cores]
    end

    # The figures of the run with the median rate, and the runs' range as
    # text; records every run's rate.
    def median_run(report, runs)
      report["ruby_noop_runs_msgs_per_sec"] = runs.map { |run| run.first.round }
      runs = runs.sort_by(&:first)
      [runs[RUNS / 2], "#{(runs.first.first / 1000).round}-#{(runs.last.first / 1000).round}k msg/s"]
    end

    # Ruby against the core run right after it over the same messages: the
    # median of the runs' ratios. The machine's speed drifts between runs (see
    # RUNS), and the core's (a) ran minutes earlier on other messages; a pair
    # run back to back sees the same machine.
    def interleaved_report(report, messages, runs, cores)
      ratios = runs.zip(cores).map { |(rate, *), (core, _)| rate / core }
      ratio = Bench.percentile(ratios, 0.5)
      core_rate = Bench.percentile(cores.map(&:first), 0.5)
      record_interleaved(report, core_rate, Bench.percentile(cores.map(&:last), 0.5), ratio)
      report.row("(b) Ruby no-op vs the core right after it, same #{messages} msgs (median of #{RUNS} pairs' " \
                 "ratios, #{format("%<low>.2f-%<high>.2f", low: ratios.min, high: ratios.max)})",
                 Bench.per_second(Bench.percentile(runs.map(&:first), 0.5)),
                 "core no-op #{Bench.per_second(core_rate)}", verdict(ratio))
    end

    def record_interleaved(report, core_rate, core_cpu, ratio)
      report["core_noop_interleaved_msgs_per_sec"] = core_rate.round
      report["core_noop_interleaved_cpu_s_per_100k"] = core_cpu
      report["ruby_vs_core_noop_interleaved_ratio"] = ratio.round(3)
    end

    def verdict(ratio)
      format("%<ratio>.2f (target ≥ %<target>.1f: %<verdict>s)",
             ratio:, target: TARGET_VS_CORE, verdict: ratio >= TARGET_VS_CORE ? "met" : "MISSED")
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
