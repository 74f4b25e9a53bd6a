# frozen_string_literal: true

# Prosody on the in-process mock Kafka cluster, with default options: a producer
# client sends 10,000 messages over 100 keys to a one-partition topic, and a
# consumer client's handler, sleeping 2-5 ms (fiber-friendly), consumes them. Prints throughput, the highest number
# of handlers seen running at once inside the partition, and the per-key order
# check; exits non-zero if any key ran out of order or a message went missing.
#
#   rake compile && ruby -Ilib examples/demo.rb     (or: script/demo)

require "async"
require "prosody"

# The demo's moving parts: send, consume, check.
class Demo
  TOPIC = "demo-events"
  GROUP = "demo"
  # A consumer skips messages whose source-system header is its own group (loop
  # prevention), so the messages come from a separate producer client.
  PRODUCER = "demo-producer"

  # Watches every handler call: keys must see their sequence numbers in order,
  # one call at a time; counts concurrency per partition.
  class Tracker
    attr_reader :handled, :violations

    def initialize
      @lock = Mutex.new
      @next_seq = Hash.new(0)
      @running_keys = {}
      @in_flight = Hash.new(0)
      @max_in_flight = Hash.new(0)
      @handled = 0
      @violations = []
    end

    def track(message)
      enter(message)
      yield
    ensure
      leave(message)
    end

    def max_in_flight
      @lock.synchronize { @max_in_flight.values.max || 0 }
    end

    def keys
      @lock.synchronize { @next_seq.size }
    end

    private

    def enter(message)
      key = message.key
      seq = message.payload.fetch("seq")
      @lock.synchronize do
        @violations << "#{key}: seq #{seq} started while another call ran" if @running_keys[key]
        @violations << "#{key}: got seq #{seq}, expected #{@next_seq[key]}" if seq != @next_seq[key]
        @next_seq[key] = seq + 1
        @running_keys[key] = true
        count_in(message.partition)
      end
    end

    def count_in(partition)
      @in_flight[partition] += 1
      @max_in_flight[partition] = [@max_in_flight[partition], @in_flight[partition]].max
    end

    def leave(message)
      @lock.synchronize do
        @running_keys.delete(message.key)
        @in_flight[message.partition] -= 1
        @handled += 1
      end
    end
  end

  # Sleeps 2-5 ms per message; under Async, Kernel#sleep suspends only this fiber.
  class SleepyHandler < Prosody::EventHandler
    def initialize(tracker)
      super()
      @tracker = tracker
    end

    def on_message(_context, message)
      @tracker.track(message) { sleep(0.002 + (rand * 0.003)) }
    end
  end

  def initialize(messages:, keys:)
    @messages = messages
    @keys = Array.new(keys) { |index| format("key-%03d", index) }
    @tracker = Tracker.new
  end

  def run
    producer = Prosody::Client.new(mock: true, source_system: PRODUCER)
    consumer = Prosody::Client.new(mock: true, group_id: GROUP, subscribed_topics: TOPIC)
    Prosody::MockCluster.create_topic(TOPIC, partitions: 1)
    puts "prosody demo: #{@messages} messages, #{@keys.size} keys, 1 partition (mock cluster, default options)"
    report("sent", measure { send_all(producer) })
    report("handled", measure { consume_all(consumer) })
    check
  ensure
    consumer&.unsubscribe
  end

  private

  # One fiber per key sends that key's messages in sequence, so each key's
  # sequence numbers are also its offset order; the keys' fibers run at once.
  def send_all(client)
    per_key = @messages / @keys.size
    failures = []
    Async do |task|
      @keys.map do |key|
        task.async do
          per_key.times { |seq| client.send_message(TOPIC, key, { "seq" => seq, "key" => key }) }
        rescue Prosody::Error => e
          failures << "#{key}: #{e.class}: #{e.message}"
        end
      end.each(&:wait)
    end.wait
    abort "#{failures.size} of #{@keys.size} senders failed, e.g. #{failures.first}" unless failures.empty?
    @messages = per_key * @keys.size
  end

  def consume_all(client, timeout: 300)
    client.subscribe(SleepyHandler.new(@tracker))
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    sleep(0.01) while @tracker.handled < @messages && Process.clock_gettime(Process::CLOCK_MONOTONIC) < deadline
    return if @tracker.handled >= @messages

    abort "timed out: only #{@tracker.handled} of #{@messages} messages handled within #{timeout}s"
  end

  def measure
    started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    yield
    Process.clock_gettime(Process::CLOCK_MONOTONIC) - started
  end

  def report(verb, seconds)
    puts format("%<verb>-8s %<count>d messages in %<seconds>.2fs (%<rate>d msg/s)",
                verb:, count: @messages, seconds:, rate: @messages / seconds)
  end

  def check
    puts "highest concurrency inside one partition: #{@tracker.max_in_flight}"
    violations = @tracker.violations
    if violations.empty? && @tracker.keys == @keys.size
      puts "per-key order: OK (#{@tracker.keys} keys)"
      true
    else
      puts "per-key order: VIOLATED (#{violations.size} problems, #{@tracker.keys} of #{@keys.size} keys seen)"
      violations.first(10).each { |violation| puts "  #{violation}" }
      false
    end
  end
end

Prosody.logger = Logger.new($stdout, level: Logger::WARN)
ok = Demo.new(messages: Integer(ENV.fetch("DEMO_MESSAGES", "10000")), keys: 100).run
exit(ok ? 0 : 1)
