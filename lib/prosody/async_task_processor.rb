# frozen_string_literal: true

require "async"
require "async/notification"

module Prosody
  # Runs handler calls as fibers on one dedicated Ruby thread.
  #
  # The native bridge thread calls {#submit} and {#cancel}; both only push a
  # command onto a Thread::Queue, so the bridge never waits on Ruby code. The
  # processor's thread runs an Async reactor whose main task pops commands and
  # starts one task (fiber) per handler call, so a handler that sleeps or waits
  # on I/O lets the others run. Each call reports back exactly once through its
  # native completion: success, the handler's exception, or {CancelledError}.
  #
  # The thread must outlive anything a handler does: every exception a handler
  # raises is that call's failure (`exit` also asks the client to stop). If the
  # thread ends anyway without {#stop} (killed, or a bug), `on_death` is called
  # once so the consumer reports itself stalled instead of retrying forever.
  #
  # A {ReactorWatchdog} reports handlers that hold the reactor (run without
  # yielding) for too long.
  #
  # @api private Created by {Client#subscribe}; applications do not use it directly.
  class AsyncTaskProcessor
    # A call in flight: its task, and the context its cancellation goes through.
    Call = Struct.new(:task, :context)
    private_constant :Call

    # Marks a call that ended without reporting an outcome (it was stopped).
    UNFINISHED = Object.new.freeze
    private_constant :UNFINISHED

    @process_exiting = false
    # Ruby runs at_exit hooks before it kills the remaining threads: a processor
    # killed after this is part of the process ending, not a death to report.
    at_exit { @process_exiting = true }

    class << self
      # @return [Boolean] whether the process has started to exit
      def process_exiting?
        @process_exiting
      end
    end

    # @param handler [EventHandler]
    # @param on_exit [#call, nil] called with the SystemExit when a handler calls `exit`
    # @param on_death [#call, nil] called with the cause (or nil) if the thread ends without {#stop}
    # @param blocking_threshold [Numeric] seconds a handler may run without yielding before it is reported
    def initialize(handler, on_exit: nil, on_death: nil, blocking_threshold: ReactorWatchdog::DEFAULT_THRESHOLD)
      @handler = handler
      @on_exit = on_exit
      @on_death = on_death
      @blocking_threshold = blocking_threshold
      @commands = Thread::Queue.new
      @calls = {} # task id => Call; touched only by the processor thread
      @thread = nil
      @watchdog = nil
      @stopping = false
      @exit_requested = false
    end

    # Starts the processor thread.
    #
    # @return [self]
    # @raise [StateError] if already started
    def start
      raise StateError, "the processor was already started" if @thread

      @thread = Thread.new { run }
      @thread.name = "prosody-processor"
      @thread.report_on_exception = false # `run` reports its own death
      @watchdog = ReactorWatchdog.new(@thread, threshold: @blocking_threshold).start
      self
    end

    # @return [Integer] handlers seen holding the reactor longer than the threshold
    def blocking_calls
      @watchdog&.reports || 0
    end

    # Queues a handler call. Called by the native bridge; never blocks.
    #
    # @param task_id [Integer] unique within this subscription
    # @param native_context [Native::Context]
    # @param message [Message]
    # @param completion [Native::Completion] reports the outcome, once
    # @return [nil]
    def submit(task_id, native_context, message, completion)
      @commands.push([:submit, task_id, native_context, message, completion])
      nil
    rescue ClosedQueueError
      completion.complete(CancelledError.new("the processor has stopped; #{where(message)} was not handled"))
      nil
    end

    # Queues the cancellation of a call. Called by the native bridge; never blocks.
    #
    # @param task_id [Integer]
    # @return [nil]
    def cancel(task_id)
      @commands.push([:cancel, task_id])
      nil
    rescue ClosedQueueError
      nil
    end

    # Stops taking calls, waits for the calls in flight to finish, and joins the
    # thread. Calls submitted afterwards are reported as {CancelledError}.
    #
    # With a `timeout`, gives up waiting after that many seconds and leaves the
    # thread to finish in the background: used after the core has abandoned
    # handlers that ignored cancellation, so they cannot hold up unsubscribe.
    #
    # @param timeout [Numeric, nil] seconds to wait; nil waits as long as it takes
    # @return [Boolean] true when the thread has finished
    def stop(timeout: nil)
      @stopping = true
      @commands.close
      return true if @thread.nil? || processor_thread?

      !@thread.join(timeout).nil?
    end

    # @return [Boolean] whether the processor thread is running
    def running?
      @thread&.alive? || false
    end

    # @param thread [Thread]
    # @return [Boolean] whether `thread` is the processor's own thread
    def processor_thread?(thread = Thread.current)
      !@thread.nil? && @thread.equal?(thread)
    end

    private

    def run
      Async { |root| serve(root) }
    rescue Exception => e # rubocop:disable Lint/RescueException -- reported below, then re-raised
      fatal = e
      raise
    ensure
      # Whatever stopped the reactor, never leave the native side waiting.
      @commands.close
      abandon_queued
      died(fatal) unless @stopping
    end

    def serve(root)
      heartbeat = root.async { |task| beat(task) }
      while (command = @commands.pop)
        dispatch(root, command)
      end
      drain
    ensure
      heartbeat&.stop
    end

    def dispatch(root, command)
      case command
      in [:submit, task_id, native_context, message, completion]
        start_call(root, task_id, Context.new(native_context), message, completion)
      in [:cancel, task_id]
        cancel_call(root, task_id)
      end
    end

    def start_call(root, task_id, context, message, completion)
      # Registered before the task starts: a handler that never yields finishes
      # (and unregisters) inside `async`.
      call = Call.new(nil, context)
      @calls[task_id] = call
      call.task = root.async { perform(task_id, context, message, completion) }
      nil
    end

    def perform(task_id, context, message, completion)
      ReactorWatchdog.working_on(message)
      outcome = UNFINISHED
      begin
        invoke(context, message)
        outcome = nil
      rescue Async::Stop
        raise # cancellation: reported as such below
      rescue SystemExit => e
        outcome = exited(message, e)
      rescue Exception => e # rubocop:disable Lint/RescueException -- a handler must not kill the processor
        # Anything a handler raises (Interrupt, NoMemoryError, ScriptError...)
        # fails this call only; the thread goes on serving the others.
        outcome = e
        log_failure(message, e)
      ensure
        # Async::Stop (cancellation) skips the branches above and lands here.
        @calls.delete(task_id)
        report(completion, UNFINISHED.equal?(outcome) ? cancelled(message) : outcome)
      end
    end

    def invoke(context, message)
      if message.is_a?(Timer)
        @handler.on_timer(context, message)
      else
        @handler.on_message(context, message)
      end
    end

    # `exit` in a handler asks for a stop; the call itself is not finished, so
    # its message runs again after the restart.
    def exited(message, error)
      unless @exit_requested
        @exit_requested = true
        Prosody.logger.warn("handler called exit (status #{error.status}) for #{where(message)}; " \
                            "stopping the client gracefully")
        @on_exit&.call(error)
      end
      CancelledError.new("the handler for #{where(message)} called exit")
    end

    def cancel_call(root, task_id)
      call = @calls[task_id] or return

      call.context.cancel!
      # Let fibers parked in Context#on_cancel run first, then stop the call at
      # its next yield point; `ensure` blocks in the handler run.
      root.async do |stopper|
        stopper.yield
        call.task.stop if @calls.key?(task_id)
      end
    end

    def drain
      until @calls.empty?
        task_id, call = @calls.first
        if call.task&.alive?
          call.task.wait
        else
          @calls.delete(task_id)
        end
      end
    end

    def abandon_queued
      while (command = @commands.pop)
        next unless command.first == :submit

        _, _, _, message, completion = command
        report(completion, CancelledError.new("the processor stopped before #{where(message)} was handled"))
      end
    end

    def died(cause)
      return if AsyncTaskProcessor.process_exiting?

      reason = cause ? "#{cause.class}: #{cause.message}" : "the thread was killed"
      Prosody.logger.error("the handler thread (prosody-processor) died (#{reason}); no handler can run any more, " \
                           "so the consumer now reports itself stalled (/livez 503); restart the process")
      @on_death&.call(cause)
    rescue StandardError => e
      warn("prosody: cannot report the handler thread's death: #{e.class}: #{e.message}")
    end

    # Runs in the reactor: each beat proves the reactor got control back.
    def beat(task)
      loop do
        @watchdog.beat
        task.sleep(ReactorWatchdog::HEARTBEAT)
      end
    end

    def report(completion, outcome)
      completion.complete(outcome)
    rescue StandardError => e
      Prosody.logger.error("cannot report a handler outcome: #{e.class}: #{e.message}")
    end

    def cancelled(message)
      CancelledError.new("the handler for #{where(message)} was cancelled before it finished")
    end

    def log_failure(message, error)
      origin = error.backtrace&.first
      Prosody.logger.error(
        "handler failed for #{where(message)}: #{error.class}: #{error.message}#{" (#{origin})" if origin}"
      )
    end

    def where(subject)
      subject.summary
    end
  end
end
