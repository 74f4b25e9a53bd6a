# frozen_string_literal: true

# `./script/bench --against REF [RUNS]`: the Ruby no-op consumer of this tree
# against the same scenario on another version of the gem (REF, built by
# script/bench in a git worktree), in one run. Each run is a child process
# (bench/noop_child.rb); the two versions alternate, so the machine's drift
# affects both alike. Prints each pair and the medians, with ratios.
#
#   ruby bench/against.rb RUNS BASELINE_NATIVE BASELINE_LIB NATIVE LIB LABEL

require "json"
require "open3"

runs, *paths, label = ARGV
runs = Integer(runs)
base_native, base_lib, native, lib = paths
child = File.expand_path("noop_child.rb", __dir__)
versions = { label => [base_native, base_lib], "this tree" => [native, lib] }

def measure(native, lib, child)
  out, err, status = Open3.capture3("ruby", "-I#{native}", "-I#{lib}", child)
  raise "#{child} failed (#{status}): #{err.lines.last(5).join}" unless status.success?

  JSON.parse(out.lines.last)
end

def median(values)
  sorted = values.sort
  mid = sorted.size / 2
  sorted.size.odd? ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2.0
end

results = Hash.new { |hash, key| hash[key] = [] }
runs.times do |run|
  line = versions.map do |name, (version_native, version_lib)|
    figures = measure(version_native, version_lib, child)
    results[name] << figures
    format("%<name>s %<rate>d msg/s %<cpu>.2f CPU s/100k (processor %<processor>.2f), %<objects>.1f objects/msg",
           name:, rate: figures["msgs_per_sec"], cpu: figures["cpu_s_per_100k"],
           processor: figures["processor_cpu_s_per_100k"], objects: figures["objects_per_msg"])
  end
  base, current = results.values.map(&:last)
  puts format("run %<run>d/%<runs>d: %<line>s; ratio %<ratio>.2f",
              run: run + 1, runs:, line: line.join(", "),
              ratio: current["msgs_per_sec"].to_f / base["msgs_per_sec"])
end

rate = results.transform_values { |list| median(list.map { |figures| figures["msgs_per_sec"] }) }
cpu = results.transform_values { |list| median(list.map { |figures| figures["cpu_s_per_100k"] }) }
processor = results.transform_values do |list|
  median(list.map { |figures| figures["processor_cpu_s_per_100k"] })
end
objects = results.transform_values { |list| median(list.map { |figures| figures["objects_per_msg"] }) }
pairs = results[label].zip(results["this tree"]).map do |base, current|
  current["msgs_per_sec"].to_f / base["msgs_per_sec"]
end
puts
puts format("(b) Ruby no-op, %<messages>d msgs, 4 partitions, 1000 keys; median of %<runs>d alternating runs",
            messages: Integer(ENV.fetch("MESSAGES", "100000")), runs:)
["this tree", label].each do |name|
  puts format("  %<name>-12s %<rate>8.0f msg/s  %<cpu>.2f CPU s/100k, processor thread %<processor>.2f " \
              "(100k / its CPU %<ceiling>.0f msg/s), %<objects>.1f Ruby objects per message",
              name:, rate: rate[name], cpu: cpu[name], processor: processor[name], ceiling: 100_000 / processor[name],
              objects: objects[name])
end
puts format("  ratio: throughput %<rate>.2f (pairs %<low>.2f-%<high>.2f), CPU per message %<cpu>.2f, " \
            "objects per message %<objects>.2f",
            rate: rate["this tree"] / rate[label], low: pairs.min, high: pairs.max,
            cpu: cpu["this tree"] / cpu[label], objects: objects["this tree"] / objects[label])
