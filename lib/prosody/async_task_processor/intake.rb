# frozen_string_literal: true

module Prosody
  class AsyncTaskProcessor
    # Where the processor's work comes from: the native {Native::Inbox}, fed by
    # tokio tasks, and a Thread::Queue for calls submitted from Ruby. Both wake
    # the reactor through the inbox's socket, and only when it waits: taking
    # from the inbox (first) marks it as waiting, so a command queued after
    # the queue was found empty wakes it.
    class Intake
      # @return [Native::Inbox]
      attr_reader :inbox

      def initialize
        @commands = Thread::Queue.new
        @inbox = Native::Inbox.new
        @wake = IO.for_fd(@inbox.wake_fd, autoclose: false)
        @cancels = [] # task ids taken from the inbox
      end

      # Queues a batch of calls or a task id to cancel, and wakes the reactor.
      #
      # @param command [Array, Integer]
      # @raise [ClosedQueueError] once closed
      # @return [void]
      def push(command)
        @commands.push(command)
        @inbox.wake
      end

      # Refuses further work; what is queued can still be taken.
      #
      # @return [void]
      def close
        @commands.close
        @inbox.close
      end

      # Yields what is queued now (up to `Native::Inbox#take`'s limits: calls
      # that keep at most `max_concurrency` running): batches of calls
      # (Arrays), and task ids (Integers) to cancel, each after the calls
      # taken with it.
      #
      # @param running [Integer] calls started and not finished
      # @return [Boolean, nil] whether anything was yielded; nil once closed and drained
      def take(running, &)
        calls = @inbox.take(@cancels, running)
        worked = take_native(calls, &)
        # Only what is queued now: commands the handlers of these queue wait
        # for the next take, so a stream of them cannot hold the reactor.
        queued = @commands.size
        queued.times { yield @commands.pop }
        worked ||= queued.positive?
        return nil if calls.nil? && !worked && @commands.closed?

        worked
      end

      # Waits (in the reactor) until the inbox's socket says there may be work.
      #
      # @return [void]
      def wait
        @wake.wait_readable
        @wake.read_nonblock(256, exception: false)
      end

      # Yields every batch of calls still queued, once closed.
      #
      # @return [void]
      def drain
        while (calls = @inbox.take(@cancels, 0))
          yield calls unless calls.empty?
        end
        while (command = @commands.pop)
          yield command unless command.is_a?(Integer)
        end
      end

      private

      def take_native(calls, &)
        worked = false
        if calls && !calls.empty?
          yield calls
          worked = true
        end
        return worked if @cancels.empty?

        cancels = @cancels
        @cancels = []
        cancels.each(&)
        true
      end
    end
  end
end
