# frozen_string_literal: true

# The consumer process of the Ruby memory scenario (bench/support/memory.rb):
# consumes TOPIC on the broker at BOOTSTRAP with a handler that sleeps 5 ms,
# samples its own resident set every 50 ms for 12 s after the first message,
# and prints one JSON line: idle_kib (after Client.new, before subscribing),
# peak_kib, peak_after_secs (since subscribing), rss_by_second_mb (RSS at each
# second after the first message, to show whether it levels off), final_kib
# (after unsubscribing), handled.
#
#   ruby -I<extension dir> -Ilib bench/memory_child.rb BOOTSTRAP TOPIC

require "json"
require "async"
require "prosody"
require_relative "support/report"

WORK = 0.005
CONSUME_FOR = 12
SAMPLE_EVERY = 0.05
FIRST_MESSAGE_DEADLINE = 60

def rss_kib = File.read("/proc/self/status")[/^VmRSS:\s+(\d+)/, 1].to_i

bootstrap, topic = ARGV
abort "usage: memory_child.rb BOOTSTRAP TOPIC" unless bootstrap && topic
Prosody.logger = Logger.new($stderr, level: Logger::WARN)

client = Prosody::Client.new(mock: false, bootstrap_servers: bootstrap, group_id: Bench.unique("memory"),
                             subscribed_topics: topic, probe_port: false)
idle = rss_kib
first = nil
handled = 0
handler = Class.new(Prosody::EventHandler) do
  define_method(:on_message) do |_context, _message|
    first ||= Bench.now
    sleep(WORK)
    handled += 1
  end
end
client.subscribe(handler.new)
subscribed = Bench.now
peak = idle
peak_after = 0.0
by_second = []
until first && Bench.now - first >= CONSUME_FOR
  raise "no message within #{FIRST_MESSAGE_DEADLINE} s" if first.nil? && Bench.now - subscribed > FIRST_MESSAGE_DEADLINE

  rss = rss_kib
  by_second << (rss / 1024.0).round(1) if first && Bench.now - first >= by_second.size
  if rss > peak
    peak = rss
    peak_after = Bench.now - subscribed
  end
  sleep(SAMPLE_EVERY)
end
count = handled
client.unsubscribe
puts JSON.generate("idle_kib" => idle, "peak_kib" => peak, "peak_after_secs" => peak_after.round(1),
                   "rss_by_second_mb" => by_second, "final_kib" => rss_kib, "handled" => count)
