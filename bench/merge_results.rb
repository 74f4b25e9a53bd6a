# frozen_string_literal: true

# Merges the suites' JSON files into one object (figures side by side, each
# suite's keys being distinct; table rows concatenated under "table"), writes
# it, and prints every row in one table.
#
#   ruby bench/merge_results.rb [--out bench/results/all.json] [FILE…]
#
# FILE defaults to bench/results/core.json, hot_key.json, timers.json and ruby.json; a
# missing one is skipped with a warning.

require "json"
require "optparse"
require_relative "support/report"

results = File.expand_path("results", __dir__)
out = File.join(results, "all.json")
OptionParser.new do |parser|
  parser.on("--out PATH", "where to write the merged JSON") { |path| out = path }
end.parse!
files = ARGV.empty? ? %w[core hot_key timers ruby].map { |suite| File.join(results, "#{suite}.json") } : ARGV

merged = {}
table = []
files.each do |path|
  next warn("merge: #{path} is missing; skipped") unless File.exist?(path)

  suite = JSON.parse(File.read(path))
  table.concat(suite.delete("table") || [])
  repeated = merged.keys & suite.keys
  warn "merge: #{path} repeats #{repeated.join(", ")}; its values win" unless repeated.empty?
  merged.merge!(suite)
end
merged["table"] = table
File.write(out, "#{JSON.pretty_generate(merged)}\n")
Bench::Report.print_table("all scenarios", table)
warn "wrote #{out}"
