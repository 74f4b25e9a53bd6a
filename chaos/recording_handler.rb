# frozen_string_literal: true

require "prosody"

module Chaos
  # The chaos run's handler: records every call, so the verifier
  # (crates/prosody-chaos) can prove nothing was lost and no key ran out of order.
  #
  # Each call appends two lines to this process's record file (the path is in
  # CHAOS_RECORDS_FILE):
  #
  #   S <key> <partition> <offset> <seq> <pid> <monotonic_ns>   when it starts
  #   E <key> <partition> <offset> <seq> <pid> <monotonic_ns>   when it finishes
  #
  # or `X ...` instead of `E` when it is cancelled (Async::Stop at the sleep).
  # CLOCK_MONOTONIC is system-wide on Linux, so times compare across processes.
  # The file is opened in append mode with sync, so each line is one write(2) and
  # a SIGKILL can tear at most the last line. File writes never yield the fiber
  # (async 1.x hooks no file I/O), so cancellation can only land in the sleep.
  class RecordingHandler < Prosody::EventHandler
    # Longest pause per call, in seconds: long enough that calls of different
    # keys overlap, short enough to keep the run quick.
    MAX_PAUSE = 0.005

    # @param path [String] the record file, created if missing
    def initialize(path = ENV.fetch("CHAOS_RECORDS_FILE"))
      super()
      @file = File.open(path, "a")
      @file.sync = true
      @pid = Process.pid
    end

    # @param _context [Prosody::Context]
    # @param message [Prosody::Message]
    # @return [void]
    def on_message(_context, message)
      fields = "#{message.key} #{message.partition} #{message.offset} #{message.payload.fetch("seq")} #{@pid}"
      record("S", fields)
      finished = false
      sleep(rand * MAX_PAUSE) # fiber-friendly under Async: other keys run meanwhile
      record("E", fields)
      finished = true
    ensure
      record("X", fields) if fields && !finished
    end

    private

    def record(phase, fields)
      @file.write("#{phase} #{fields} #{Process.clock_gettime(Process::CLOCK_MONOTONIC, :nanosecond)}\n")
    end
  end
end
