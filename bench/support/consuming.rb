# frozen_string_literal: true

module Bench
  # Consumer throughput (the no-op scenario (b) is in noop.rb):
  #   (c) a handler that waits 10 ms (fiber-friendly), 1 partition, 256 keys, at
  #       max_concurrency 32 and 128: vs the ideal (max_concurrency / 10 ms) and
  #       vs a sequential loop doing the same waits.
  # Throughput runs from the first handler start to the last handler end, so
  # joining the group is not counted.
  module Consuming
    # The `source-system` of producing clients: a consumer skips messages whose
    # header equals its own group id, which is every client's default.
    PRODUCER_SOURCE = "bench-producer"
    # Sends in flight while filling a topic.
    FILL_FIBERS = 64
    # Seconds a consumer may take over its messages.
    DEADLINE = 300

    # The 10 ms scenario's wait.
    WAIT = 0.010
    # max_uncommitted (default 64) also caps how many messages of one partition
    # run at once, so 128 is measured with the default and with room for 128.
    IO_CASES = [[32, {}], [128, {}], [128, { max_uncommitted: 256 }]].freeze

    module_function

    # (c)
    def io(cluster, report)
      sequential = sequential_rate
      report["ruby_sequential_10ms_msgs_per_sec"] = sequential.round(1)
      IO_CASES.each { |concurrency, extra| io_case(cluster, report, sequential, concurrency, extra) }
    end

    def io_case(cluster, report, sequential, concurrency, extra)
      count = concurrency * 60
      topic = Bench.unique("io#{concurrency}")
      # 1 unless a real broker auto-created the topic with its own default.
      partitions = cluster.create_topics(topic => 1).fetch(topic)
      fill(cluster, topic, count, 256)
      rate, cpu, = consume(cluster, topic, count, max_concurrency: concurrency, **extra) { sleep(WAIT) }
      label = "c#{concurrency}#{extra.map { |name, value| "_#{name}#{value}" }.join}"
      scope = "#{partitions == 1 ? "1 partition" : "#{partitions} partitions"}, 256 keys, " \
              "max_concurrency #{concurrency}#{extra.map { |name, value| ", #{name} #{value}" }.join} (#{count} msgs)"
      io_report(report, label, scope, rate:, cpu:, ideal: concurrency / WAIT, sequential:)
    end

    def sequential_rate(count = 100)
      started = Bench.now
      Async { count.times { sleep(WAIT) } }
      count / (Bench.now - started)
    end

    # Records figures under ruby_io_10ms_<label>_* and a row against each baseline.
    def io_report(report, label, scope, rate:, cpu:, ideal:, sequential:)
      figures = { "msgs_per_sec" => rate.round, "cpu_s_per_100k" => cpu.round(2), "vs_ideal" => (rate / ideal).round(3),
                  "vs_sequential" => (rate / sequential).round(1) }
      figures.each { |name, value| report["ruby_io_10ms_#{label}_#{name}"] = value }
      scenario = "(c) Ruby 10 ms handler, #{scope}"
      report.row(scenario, "#{Bench.per_second(rate)} (#{format("%.2f CPU s/100k", cpu)})",
                 "ideal #{Bench.per_second(ideal)}", format("%.2f", rate / ideal))
      report.row(scenario, Bench.per_second(rate), format("sequential loop %.0f msg/s", sequential),
                 format("%.1fx", rate / sequential))
    end

    def producer(cluster) = Prosody::Client.new(**cluster.client_options, source_system: PRODUCER_SOURCE)

    # Sends `count` messages over `keys` keys; payload `yield(n)`, by default {"i" => n}.
    def fill(cluster, topic, count, keys)
      client = producer(cluster)
      Async do |task|
        Array.new(FILL_FIBERS) do |fiber|
          task.async do
            fiber.step(count - 1, FILL_FIBERS) do |n|
              client.send_message(topic, "key-#{n % keys}", block_given? ? yield(n) : { "i" => n })
            end
          end
        end.each(&:wait)
      end
    end

    # Consumes `count` messages of `topic`, calling `work` in each handler;
    # returns messages per second from the first handler start to the last
    # handler end (joining the group is not counted), the process's CPU
    # seconds per 100k messages over the same span, the processor thread's own
    # (where handlers run), and Ruby objects allocated per message (every
    # thread: unlike time, a figure the machine's load does not move).
    def consume(cluster, topic, count, **options, &work)
      span = Span.new(count)
      handler = Class.new(Prosody::EventHandler) do
        define_method(:on_message) do |_context, _message|
          span.start
          work&.call
          span.handled
        end
      end
      client = Prosody::Client.new(**cluster.client_options, group_id: Bench.unique("group"),
                                                             subscribed_topics: topic, **options)
      client.subscribe(handler.new)
      Bench.wait_until(DEADLINE, "#{count} messages") { span.done? }
      client.unsubscribe
      [span.rate, span.cpu_per_100k, span.thread_cpu_per_100k, span.objects_per_message]
    end

    # Wall clock, process CPU, the processor thread's CPU and Ruby's allocated
    # objects from the first handler start to the last handler end. Called from the handlers, so on
    # the processor thread, which runs them one fiber at a time.
    class Span
      def initialize(count)
        @count = count
        @handled = 0
        @first = @last = @cpu_first = @cpu_last = @thread_cpu_first = @thread_cpu_last = nil
        @objects_first = @objects_last = nil
      end

      def start
        return if @first

        @first = Bench.now
        @cpu_first = Bench.cpu_now
        @thread_cpu_first = Bench.thread_cpu_now
        @objects_first = GC.stat(:total_allocated_objects)
      end

      def handled
        @handled += 1
        return unless @handled == @count

        @last = Bench.now
        @cpu_last = Bench.cpu_now
        @thread_cpu_last = Bench.thread_cpu_now
        @objects_last = GC.stat(:total_allocated_objects)
      end

      def done? = !@last.nil?

      def rate = @count / (@last - @first)

      def cpu_per_100k = (@cpu_last - @cpu_first) * 100_000.0 / @count

      def thread_cpu_per_100k = (@thread_cpu_last - @thread_cpu_first) * 100_000.0 / @count

      def objects_per_message = (@objects_last - @objects_first).fdiv(@count)
    end
  end
end
