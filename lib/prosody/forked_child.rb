# frozen_string_literal: true

module Prosody
  # Ends the child of a handler that called `fork` without a block, once the
  # handler returns into the processor.
  #
  # That child runs on a copy of the processor's thread, with copies of the
  # parent's calls in flight. It must not report the parent's call (the parent
  # does; the scheduler's lock may have been held at the fork), start the
  # calls after it in its batch (the parent does), take the handler's `exit`
  # for a request to stop the client, or resume the other calls' fibers (even
  # their `ensure` could close connections the parent shares). So it ends at
  # once, like the child of `fork { ... }` after its block, but without running
  # the parent's at_exit hooks (as Resque's forked children do).
  #
  # @api private Used by {AsyncTaskProcessor}.
  module ForkedChild
    class << self
      # Logs why, flushes standard output and error, and exits the process.
      #
      # @param subject [String] the call the handler was running
      # @param outcome [SystemExit, Exception, nil] how the handler ended: its
      #   `exit` status is the child's, a failure exits 1, anything else 0
      # @return [void] never returns
      def end!(subject, outcome)
        code = status(outcome)
        begin
          Prosody.log(Logger::WARN, "a handler forked without a block (#{subject}); its child process #{Process.pid} " \
                                    "ends now that the handler returned (status #{code}): " \
                                    "run subprocesses with system, Open3 or Process.spawn, or fork only to exec")
          $stdout.flush
          $stderr.flush
        rescue StandardError
          nil # the child ends all the same
        end
        Process.exit!(code)
      end

      private

      def status(outcome)
        case outcome
        when SystemExit then outcome.status
        when Exception then 1
        else 0
        end
      end
    end
  end
end
