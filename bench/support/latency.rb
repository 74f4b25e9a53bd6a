# frozen_string_literal: true

module Bench
  # (d) End-to-end latency at a steady 1k msg/s: from the send_message call (in
  # an Async fiber, one per message so a slow acknowledgement does not delay the
  # next) to the start of on_message. The payload carries the monotonic clock at
  # send time; sender and handler share this process, hence the clock.
  #
  # The first second is warm-up and not counted. On librdkafka's mock cluster an
  # empty fetch is held for all of fetch.wait.max.ms (500 ms) even when data
  # arrives, which a real broker does not do, so there the consumer uses
  # fetch.wait.max.ms=1, like the Rust bench's consumers.
  module Latency
    RATE = 1_000
    MEASURED = 10_000
    WARMUP = 1_000
    PARTITIONS = 4
    KEYS = 100
    # Seconds to wait for the partitions to be assigned, and for the last message after the last send.
    DEADLINE = 60

    module_function

    # Measures and reports against the core JSON's plain and core figures.
    def run(cluster, report)
      scope = "#{RATE} msg/s, #{MEASURED} msgs, #{PARTITIONS} partitions"
      measure(cluster).zip(%w[p50 p99]).each do |ms, name|
        report["ruby_latency_#{name}_ms"] = ms.round(3)
        scenario = "(d) Ruby send_message → on_message start, latency #{name} (#{scope})"
        shown = format("%.2f ms", ms)
        report.compare(scenario, ms, shown, key: "plain_latency_#{name}_ms",
                                            baseline: "rdkafka FutureProducer → BaseConsumer",
                                            ratio_key: "ruby_vs_plain_latency_#{name}_ratio")
        report.compare(scenario, ms, shown, key: "core_latency_#{name}_ms", baseline: "core send → handler",
                                            ratio_key: "ruby_vs_core_latency_#{name}_ratio")
      end
    end

    # @return [Array(Float, Float)] p50 and p99 in milliseconds
    def measure(cluster)
      topic = Bench.unique("latency")
      partitions = cluster.create_topics(topic => PARTITIONS).fetch(topic)
      latencies = []
      consumer = Prosody::Client.new(**cluster.client_options, group_id: Bench.unique("latency"),
                                                               subscribed_topics: topic, kafka: fetch_settings(cluster))
      consumer.subscribe(recorder(latencies).new)
      begin
        Bench.wait_until(DEADLINE, "#{partitions} partitions assigned") { consumer.assigned_partitions >= partitions }
        send_paced(Consuming.producer(cluster), topic)
        Bench.wait_until(DEADLINE, "#{MEASURED} messages") { latencies.size >= MEASURED }
      ensure
        consumer.unsubscribe
      end
      [Bench.percentile(latencies, 0.5), Bench.percentile(latencies, 0.99)]
    end

    def fetch_settings(cluster) = cluster.mock_broker? ? { "fetch.wait.max.ms" => "1" } : {}

    # A handler class appending each measured message's latency (ms) to `latencies`.
    def recorder(latencies)
      Class.new(Prosody::EventHandler) do
        define_method(:on_message) do |_context, message|
          received = Bench.now
          payload = message.payload
          latencies << ((received - payload.fetch("t")) * 1000) unless payload.fetch("warm")
        end
      end
    end

    # Sends WARMUP + MEASURED messages at RATE per second on an absolute schedule.
    def send_paced(producer, topic)
      Async do |task|
        start = Bench.now
        sends = Array.new(WARMUP + MEASURED) do |n|
          delay = start + (n.to_f / RATE) - Bench.now
          sleep(delay) if delay.positive?
          task.async do
            producer.send_message(topic, "key-#{n % KEYS}", { "t" => Bench.now, "warm" => n < WARMUP })
          end
        end
        sends.each(&:wait) # raises the first send's error, if any
      end
    end
  end
end
