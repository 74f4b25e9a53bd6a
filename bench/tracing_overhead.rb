# frozen_string_literal: true

# Tracing's cost: bench (a) (core no-op) and (b) (Ruby no-op), each run with
# tracing off and with spans exported over OTLP/HTTP to a local receiver that
# counts and discards them, interleaved, RUNS pairs; prints the medians side by
# side with the ratio on / off, and how many export requests arrived (so "on"
# really exported). Tracing is configured per process from the environment, so
# every run is a process of its own.
#
#   ruby bench/tracing_overhead.rb BENCH_BINARY RUBY_NATIVE_DIR [RUNS]

require "json"
require "rbconfig"
require "socket"
require "tmpdir"
require_relative "support/report"

bench, native, runs = ARGV
runs = Integer(runs || 3)
lib = File.expand_path("../lib", __dir__)

# Accepts OTLP/HTTP POSTs, answers 200 and counts them.
server = TCPServer.new("127.0.0.1", 0)
exports = Queue.new
Thread.new do
  loop do
    connection = server.accept
    head = +""
    head << connection.readpartial(65_536) until head.include?("\r\n\r\n")
    head, body = head.split("\r\n\r\n", 2)
    length = head[/^content-length:\s*(\d+)/i, 1].to_i
    body << connection.readpartial(65_536) while body.bytesize < length
    connection.write("HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n" \
                     "Connection: close\r\n\r\n")
    exports << length
    connection.close
  rescue EOFError, Errno::ECONNRESET
    connection&.close
  end
end
endpoint = "http://127.0.0.1:#{server.addr[1]}"

# One run of a scenario; its JSON figures.
def run(env, command)
  Dir.mktmpdir do |dir|
    out = File.join(dir, "out.json")
    system(env, *command, "--json", out, out: File::NULL) or abort("bench run failed: #{command.join(" ")}")
    JSON.parse(File.read(out))
  end
end

scenarios = {
  "(a) core no-op" => [[bench, "--only", "a"], "core_noop_msgs_per_sec", "core_noop_cpu_s_per_100k"],
  "(b) Ruby no-op" => [[RbConfig.ruby, "-I#{native}", "-I#{lib}", File.expand_path("ruby_bench.rb", __dir__),
                        "--only", "b"], "ruby_noop_msgs_per_sec", "ruby_noop_cpu_s_per_100k"]
}
rows = []
scenarios.each do |name, (command, rate_key, cpu_key)|
  figures = { off: [], on: [] }
  exported = 0
  runs.times do
    figures[:off] << run({ "OTEL_EXPORTER_OTLP_ENDPOINT" => nil, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" => nil }, command)
    before = exports.size
    figures[:on] << run({ "OTEL_EXPORTER_OTLP_ENDPOINT" => endpoint, "OTEL_SERVICE_NAME" => "prosody-bench" }, command)
    exported += exports.size - before
  end
  off_rate, on_rate = %i[off on].map { |side| Bench.percentile(figures[side].map { |f| f[rate_key] }, 0.5) }
  off_cpu, on_cpu = %i[off on].map { |side| Bench.percentile(figures[side].map { |f| f[cpu_key] }, 0.5) }
  rows << { "scenario" => "#{name}, tracing on (#{exported} export requests)",
            "figure" => "#{Bench.per_second(on_rate)}, #{on_cpu} CPU s/100k",
            "baseline" => "tracing off #{Bench.per_second(off_rate)}, #{off_cpu} CPU s/100k",
            "ratio" => format("%.2f", on_rate.to_f / off_rate) }
end
Bench::Report.print_table("Tracing on vs off (OTLP/HTTP to a local receiver), median of #{runs} interleaved runs",
                          rows)
