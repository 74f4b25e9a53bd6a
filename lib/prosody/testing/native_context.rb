# frozen_string_literal: true

module Prosody
  module Testing
    # Implements the interface of the native context (`Prosody::Native::Context`)
    # over a {Timers} store, so {Testing.deliver} hands handlers a real
    # {Prosody::Context}: its time checks, its conversions and its errors are
    # the ones the consumer's handlers get. Each call answers through the queue
    # it is given, at once, as the native side does when it is done.
    #
    # @api private Built by {Testing.deliver} and {Testing.fire_timers}.
    class NativeContext
      # @param key [String] the key whose timers this call manages
      # @param timers [Timers]
      def initialize(key, timers)
        @key = key
        @timers = timers
        @cancelled = false
      end

      # @return [Boolean]
      def should_cancel?
        @cancelled
      end

      # No spans are opened outside a consumer.
      #
      # @return [nil]
      def trace_context
        nil
      end

      # Makes {#should_cancel?} true (the {Prosody::Context} also needs its own `cancel!`).
      #
      # @return [void]
      def cancel!
        @cancelled = true
      end

      # @param at [Integer] milliseconds since the epoch
      # @param queue [Thread::Queue]
      # @return [nil]
      def schedule(at, queue)
        answer(queue) { @timers.schedule(@key, at) }
      end

      # @param at [Integer]
      # @param queue [Thread::Queue]
      # @return [nil]
      def clear_and_schedule(at, queue)
        answer(queue) do
          @timers.clear(@key)
          @timers.schedule(@key, at)
        end
      end

      # @param at [Integer]
      # @param queue [Thread::Queue]
      # @return [nil]
      def unschedule(at, queue)
        answer(queue) { @timers.unschedule(@key, at) }
      end

      # @param queue [Thread::Queue]
      # @return [nil]
      def clear_scheduled(queue)
        answer(queue) { @timers.clear(@key) }
      end

      # @param queue [Thread::Queue]
      # @return [nil]
      def scheduled(queue)
        answer(queue) { @timers.millis(@key) }
      end

      private

      def answer(queue)
        queue.push(yield)
        nil
      end
    end
  end
end
