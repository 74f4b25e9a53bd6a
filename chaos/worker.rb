#!/usr/bin/env ruby
# frozen_string_literal: true

# One consumer process of a chaos run: the `prosody` runner serving
# Chaos::RecordingHandler, so TERM is a graceful stop exactly as in production.
# Every argument is a runner flag (see `ruby -Ilib exe/prosody --help`); the
# record file comes from CHAOS_RECORDS_FILE. Started by crates/prosody-chaos:
#
#   CHAOS_RECORDS_FILE=/tmp/w1.records ruby -Ilib chaos/worker.rb \
#     --brokers 127.0.0.1:9092 --group chaos --topics chaos-events --probe-port none

$stdout.sync = true
require "prosody/runner"

handler = File.expand_path("recording_handler.rb", __dir__)
exit Prosody::Runner.run(["--require", handler, "--handler", "Chaos::RecordingHandler", *ARGV])
