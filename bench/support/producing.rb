# frozen_string_literal: true

module Bench
  # (e) Producer throughput: send_message from one thread with 100 fibers, and
  # from 8 plain threads with 4 fibers each (32 in flight). Every sender awaits
  # its acknowledgement before sending again, so throughput depends on the sends
  # in flight; the baselines are the Rust bench's FutureProducer (idempotent,
  # like Prosody's producer) with as many in flight, on the same messages:
  # count, keys, payloads and a new 4-partition topic per run.
  #
  # The clock starts after one acknowledged warm-up send: an idempotent producer
  # first needs a producer id from the broker.
  module Producing
    PARTITIONS = 4
    KEYS = 1_000
    # The Rust bench's data.rs builds the same payload.
    TEXT = ("x" * 64).freeze

    # label, description, sends in flight (the baseline's), and how to send.
    CASES = [
      ["fibers100", "1 thread × 100 fibers", 100, ->(cluster, count) { fibers(cluster, count, 100) }],
      ["threads8x4", "8 threads × 4 fibers", 32, ->(cluster, count) { threads(cluster, count, 8, 4) }]
    ].freeze

    module_function

    # Measures each case and reports against the core JSON's baselines.
    def run(cluster, report, count)
      report["ruby_producer_messages"] = count
      CASES.each do |label, how, flight, measure|
        rate, cpu = measure.call(cluster, count)
        report["ruby_producer_#{label}_msgs_per_sec"] = rate.round
        report["ruby_producer_#{label}_cpu_s_per_100k"] = cpu.round(2)
        scenario = "(e) Ruby send_message, #{how} (#{count} msgs, #{PARTITIONS} partitions)"
        compare(report, scenario, label, flight, [rate, cpu])
      end
    end

    # Rows against the core JSON's FutureProducer and Client::send figures.
    def compare(report, scenario, label, flight, (rate, cpu))
      shown = Bench.per_second(rate)
      report.compare(scenario, rate, shown, key: "plain_producer_inflight#{flight}_msgs_per_sec",
                                            baseline: "FutureProducer, #{flight} in flight",
                                            ratio_key: "ruby_vs_plain_producer_#{label}_ratio")
      report.compare(scenario, rate, shown, key: "core_producer_inflight#{flight}_msgs_per_sec",
                                            baseline: "core Client::send, #{flight} in flight",
                                            ratio_key: "ruby_vs_core_producer_#{label}_ratio")
      report.compare("#{scenario}: process CPU", cpu, format("%.2f CPU s/100k", cpu),
                     key: "core_producer_inflight#{flight}_cpu_s_per_100k",
                     baseline: "core Client::send, #{flight} in flight",
                     ratio_key: "ruby_vs_core_producer_#{label}_cpu_ratio")
    end

    def payload(number) = { "n" => number, "text" => TEXT }

    # One thread, `fibers` fibers; messages per second.
    def fibers(cluster, count, fibers)
      timed(cluster, count) do |send|
        next_n = 0
        Async do |task|
          Array.new(fibers) do
            task.async do
              # One thread: nothing runs between reading and bumping the counter.
              while (n = next_n) < count
                next_n += 1
                send.call(n)
              end
            end
          end.each(&:wait)
        end
      end
    end

    # `threads` threads, each with its own reactor and `fibers` fibers; messages per second.
    def threads(cluster, count, threads, fibers)
      timed(cluster, count) do |send|
        # A closed queue's pop returns nil once it is empty, without blocking.
        numbers = Thread::Queue.new(0...count).tap(&:close)
        Array.new(threads) do
          Thread.new do
            Async do |task|
              Array.new(fibers) { task.async { while (n = numbers.pop) do send.call(n) end } }.each(&:wait)
            end
          end
        end.each(&:join)
      end
    end

    # Yields a callable that sends message n; times the block after a warm-up
    # send: messages per second, and the process's CPU seconds per 100k.
    def timed(cluster, count)
      topic = Bench.unique("producer")
      cluster.create_topics(topic => PARTITIONS)
      client = Consuming.producer(cluster)
      send = ->(n) { client.send_message(topic, "key-#{n % KEYS}", payload(n)) }
      send.call(0)
      started = Bench.now
      cpu_started = Bench.cpu_now
      yield send
      [count / (Bench.now - started), (Bench.cpu_now - cpu_started) * 100_000.0 / count]
    end
  end
end
