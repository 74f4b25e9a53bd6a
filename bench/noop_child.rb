# frozen_string_literal: true

# One no-op consumer run in a process of its own, for `./script/bench --against`:
# fills a topic with MESSAGES messages over 1000 keys (4 partitions), consumes
# them with a no-op handler and prints one JSON line: messages per second, and
# CPU seconds per 100k of the process (every thread) and of the processor
# thread alone, from the first handler start to the last handler end. The
# extension and lib/ it loads come from the load path (-I), so the same script
# measures any version of the gem.
# With PAUSE_AFTER_FILL=1 the process stops itself (SIGSTOP) once the topic is
# filled, so a profiler can attach for the consuming phase alone: attach, then
# `kill -CONT` it.

require "json"
require "async"
require "prosody"
require_relative "support/report"
require_relative "support/cluster"
require_relative "support/consuming"

Prosody.logger = Logger.new($stderr, level: Logger::WARN)
messages = Integer(ENV.fetch("MESSAGES", "100000"))
cluster = Bench::Cluster.new
topic = Bench.unique("against")
cluster.create_topics(topic => 4)
Bench::Consuming.fill(cluster, topic, messages, 1_000)
Process.kill(:STOP, Process.pid) if ENV["PAUSE_AFTER_FILL"] == "1"
rate, cpu, processor_cpu, objects = Bench::Consuming.consume(cluster, topic, messages)
puts JSON.generate("msgs_per_sec" => rate.round, "cpu_s_per_100k" => cpu.round(3),
                   "processor_cpu_s_per_100k" => processor_cpu.round(3), "objects_per_msg" => objects.round(2))
