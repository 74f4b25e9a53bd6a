# frozen_string_literal: true

module Prosody
  # A timer firing, as `EventHandler#on_timer` receives it. Built by the native
  # side; immutable.
  #
  # @example
  #   def on_timer(context, timer)
  #     Reminder.send_for(timer.key) if timer.time <= Time.now
  #   end
  class Timer
    # @return [String] the key the timer was scheduled for
    attr_reader :key
    # @return [Time] when it was due (it fires at or after this time)
    attr_reader :time

    # @param key [String]
    # @param time [Time]
    def initialize(key, time)
      @key = key
      @time = time
      freeze
    end

    # What the timer is, for log lines.
    #
    # @return [String] e.g. `timer key="customer-42" time=2026-12-02 10:00:00 UTC`
    def summary
      "timer key=#{key.inspect} time=#{time.inspect}"
    end

    # @return [Hash{Symbol=>Object}]
    def to_h
      { key:, time: }
    end

    # Timers are equal when key and time are.
    #
    # @param other [Object]
    # @return [Boolean]
    def ==(other)
      other.is_a?(Timer) && to_h == other.to_h
    end
    alias eql? ==

    # @return [Integer]
    def hash
      to_h.hash
    end

    # @return [String]
    def inspect
      "#<#{self.class.name} key=#{key.inspect} time=#{time.inspect}>"
    end
  end
end
