# frozen_string_literal: true

module ProsodySpec
  # Stands in for Prosody::Native::Context in processor unit specs.
  class FakeNativeContext
    attr_writer :cancelled

    def initialize(cancelled: false)
      @cancelled = cancelled
    end

    def should_cancel?
      @cancelled
    end
  end

  # Stands in for Prosody::Native::Completion: records every outcome it is given.
  class FakeCompletion
    def initialize
      @outcomes = []
      @lock = Mutex.new
      @changed = ConditionVariable.new
    end

    def complete(outcome)
      @lock.synchronize do
        @outcomes << outcome
        @changed.broadcast
        @outcomes.size == 1
      end
    end

    # @return [Array] every outcome reported so far
    def outcomes
      @lock.synchronize { @outcomes.dup }
    end

    # The first outcome, waiting for it up to `timeout` seconds.
    def outcome(timeout: 10)
      deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
      @lock.synchronize do
        while @outcomes.empty?
          left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
          raise RSpec::Expectations::ExpectationNotMetError, "no outcome within #{timeout}s" if left <= 0

          @changed.wait(@lock, left)
        end
        @outcomes.first
      end
    end
  end
end
