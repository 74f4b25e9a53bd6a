# frozen_string_literal: true

# Ruby-side benchmarks, each against a baseline measured in the same run (the
# Rust bench's figures come from its JSON, --core):
#   (b), (c) consumer throughput: a no-op handler vs the core's (support/noop.rb);
#            a 10 ms handler vs the ideal and a sequential loop (support/consuming.rb);
#   (d) latency from send_message to on_message at a steady 1k msg/s, p50 and
#       p99, vs plain rdkafka and vs the core (support/latency.rb);
#   (e) send_message throughput from 1 thread with 100 fibers and from 8 threads
#       with 4 fibers each, vs an idempotent FutureProducer with as many sends in
#       flight, and vs the core's Client::send (support/producing.rb);
#   (f) peak RSS of a Ruby consumer (a child process) facing a 500k-message
#       backlog with a 5 ms handler, vs the same process idle after Client.new,
#       the backlog's size, and the core's growth (support/memory.rb).
# Default options everywhere except where a scenario names one. Runs on the
# in-process mock cluster, or on the broker named by PROSODY_BENCH_BOOTSTRAP.
#
#   ruby -Ilib bench/ruby_bench.rb [--only bcdef] [--core bench/results/core.json] [--json out.json]

require "json"
require "optparse"
require "async"
require "prosody"
require_relative "support/report"
require_relative "support/cluster"
require_relative "support/consuming"
require_relative "support/noop"
require_relative "support/latency"
require_relative "support/producing"
require_relative "support/memory"

options = { only: "bcdef", messages: 100_000, producer_messages: nil, backlog: Bench::Memory::BACKLOG }
OptionParser.new do |parser|
  parser.on("--only LETTERS", /\A[bcdef]+\z/, "scenarios to run (default bcdef)") { |only| options[:only] = only }
  parser.on("--messages N", Integer, "messages for the no-op scenario (default 100000)") { |n| options[:messages] = n }
  parser.on("--producer-messages N", Integer, "messages per producer run (default: the core's, else 50000)") do |n|
    options[:producer_messages] = n
  end
  parser.on("--backlog N", Integer, "messages of the memory scenario's backlog (default 500000)") do |n|
    options[:backlog] = n
  end
  parser.on("--core PATH", "the Rust bench's JSON, for the baselines") { |path| options[:core] = path }
  parser.on("--json PATH", "write results as JSON") { |path| options[:json] = path }
end.parse!

Prosody.logger = Logger.new($stderr, level: Logger::WARN)
cluster = Bench::Cluster.new
core = options[:core] && File.exist?(options[:core]) ? JSON.parse(File.read(options[:core])) : {}
report = Bench::Report.new(core)
report["ruby_cluster"] = cluster.describe
only = options[:only]
Bench::Noop.run(cluster, report, options[:messages]) if only.include?("b")
Bench::Consuming.io(cluster, report) if only.include?("c")
Bench::Latency.run(cluster, report) if only.include?("d")
if only.include?("e")
  Bench::Producing.run(cluster, report, options[:producer_messages] || core.fetch("producer_messages", 50_000))
end
Bench::Memory.run(cluster, report, options[:backlog]) if only.include?("f")
report.print("Ruby (#{cluster.describe})")
report.write(options[:json]) if options[:json]
