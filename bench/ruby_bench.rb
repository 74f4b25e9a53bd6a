# frozen_string_literal: true

# Ruby-side benchmarks on the in-process mock cluster, each against a baseline
# measured in the same run:
#   (b) a no-op Ruby handler vs the core's no-op figure (from the Rust bench's
#       JSON, when given): the cost of crossing into Ruby per message;
#   (c) a handler that waits 10 ms (fiber-friendly), 1 partition, 256 keys, at
#       max_concurrency 32 and 128: vs the ideal (max_concurrency / 10 ms) and
#       vs a sequential loop doing the same waits.
# Default options everywhere except where a scenario names one.
#
#   ruby -Ilib bench/ruby_bench.rb [--core bench/results/core.json] [--json out.json]

require "json"
require "optparse"
require "async"
require "prosody"

options = { messages: 40_000, core: nil, json: nil }
OptionParser.new do |parser|
  parser.on("--messages N", Integer, "messages for the no-op scenario (default 40000)") { |n| options[:messages] = n }
  parser.on("--core PATH", "the Rust bench's JSON, for the Ruby/core ratio") { |path| options[:core] = path }
  parser.on("--json PATH", "write results as JSON") { |path| options[:json] = path }
end.parse!

Prosody.logger = Logger.new($stderr, level: Logger::WARN)

def unique(name) = "bench-#{name}-#{Process.pid}-#{rand(1 << 30)}"

def produce(topic, count, keys)
  client = Prosody::Client.new(mock: true, source_system: "bench-producer")
  Async do |task|
    fibers = 64
    fibers.times.map do |fiber|
      task.async do
        fiber.step(count - 1, fibers) { |i| client.send_message(topic, "key-#{i % keys}", { "i" => i }) }
      end
    end.each(&:wait)
  end
end

def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)

# Consumes everything on `topic`; returns messages per second from the first
# handler start to the last handler end (group join time is not counted).
def consume(topic, count, **options, &work)
  done = Thread::Queue.new
  handled = 0
  first = nil
  handler = Class.new(Prosody::EventHandler) do
    define_method(:on_message) do |_context, _message|
      first ||= now
      work&.call
      handled += 1 # the processor thread runs handlers one fiber at a time
      done.push(now) if handled == count
    end
  end
  client = Prosody::Client.new(mock: true, group_id: unique("group"), subscribed_topics: topic, **options)
  client.subscribe(handler.new)
  last = done.pop
  client.unsubscribe
  count / (last - first)
end

results = {}
rows = []

# (b) no-op handler
partitions = [(options[:messages] / 20_000.0).ceil, 1].max
topic = unique("noop")
Prosody::MockCluster.create_topic(topic, partitions:)
produce(topic, options[:messages], 1_000)
noop = consume(topic, options[:messages])
results["ruby_noop_msgs_per_sec"] = noop.round
rows << ["Ruby no-op handler (#{options[:messages]} msgs, #{partitions} partitions)", "#{noop.round} msg/s", ""]
if options[:core] && File.exist?(options[:core])
  core = JSON.parse(File.read(options[:core]))
  core_noop = core["core_noop_msgs_per_sec"] || core.dig("results", "core_noop_msgs_per_sec")
  if core_noop
    ratio = noop / core_noop
    results["ruby_vs_core_noop_ratio"] = ratio.round(3)
    rows << ["  vs core no-op (#{core_noop.round} msg/s)", "", format("%.2f", ratio)]
  end
end

# (c) 10 ms waits, 1 partition, 256 keys
wait = 0.010
sequential_count = 100
started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
Async { sequential_count.times { sleep(wait) } }
sequential = sequential_count / (Process.clock_gettime(Process::CLOCK_MONOTONIC) - started)
results["sequential_10ms_msgs_per_sec"] = sequential.round(1)
rows << ["Sequential loop, 10 ms per message", "#{sequential.round(1)} msg/s", ""]
# max_uncommitted (default 64) also caps how many messages of one partition can
# run at once, so the 128 case is measured with the default and with room for 128.
[[32, {}], [128, {}], [128, { max_uncommitted: 256 }]].each do |concurrency, extra|
  count = concurrency * 60
  topic = unique("io#{concurrency}")
  Prosody::MockCluster.create_topic(topic, partitions: 1)
  produce(topic, count, 256)
  rate = consume(topic, count, max_concurrency: concurrency, **extra) { sleep(wait) }
  ideal = concurrency / wait
  label = "c#{concurrency}#{extra.map { |k, v| "_#{k}#{v}" }.join}"
  results["io_10ms_#{label}_msgs_per_sec"] = rate.round
  results["io_10ms_#{label}_vs_ideal"] = (rate / ideal).round(3)
  results["io_10ms_#{label}_vs_sequential"] = (rate / sequential).round(1)
  shown = extra.map { |k, v| ", #{k} #{v}" }.join
  scenario = "10 ms handler, 1 partition, 256 keys, max_concurrency #{concurrency}#{shown} (#{count} msgs)"
  rows << [scenario, "#{rate.round} msg/s", ""]
  rows << ["  vs ideal #{ideal.round} msg/s", "", format("%.2f", rate / ideal)]
  rows << ["  vs sequential loop", "", format("%.1fx", rate / sequential)]
end

width = rows.map { |row| row[0].length }.max
puts format("%-#{width}s  %14s  %8s", "scenario (Ruby)", "throughput", "ratio")
rows.each { |row| puts format("%-#{width}s  %14s  %8s", *row) }
File.write(options[:json], JSON.pretty_generate(results)) if options[:json]
