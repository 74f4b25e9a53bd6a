# frozen_string_literal: true

require "async"
require "async/notification"
require "io/wait"
require_relative "async_task_processor/intake"

module Prosody
  # Runs handler calls as fibers on one dedicated Ruby thread.
  #
  # Native handler calls come straight to the processor's thread: tokio tasks
  # queue them on the processor's {#inbox} (a `Native::Inbox`, Rust data only)
  # and wake the thread only when it waits for work, through a socket its
  # reactor watches. The consumer queues calls there ahead of time (up to twice
  # `max_concurrency` beyond it); the processor takes only as many as keep at
  # most `max_concurrency` calls running, so a finished call's successor is
  # already at hand. Calls submitted from Ruby ({#submit_batch}, {#submit},
  # {#cancel}) go onto a Thread::Queue and wake it the same way. The
  # processor's thread runs an Async reactor whose main task takes calls (the
  # inbox builds their Ruby messages then, under the GVL the thread holds
  # anyway) and hands each call to a pool of long-lived worker tasks (fibers):
  # an idle worker runs calls one after another, inline, until one of them
  # yields (sleeps, waits on I/O), and only then does the next call go to
  # another worker, started when none is idle. So a handler that waits lets the
  # others run, while handlers that never wait cost no fiber or task each. Each
  # call reports back exactly once through its completion: success, the
  # handler's exception, or {CancelledError}. On the processor's thread those
  # reports are sent in one go per batch of calls (`Native.flush_completions`).
  #
  # Cancelling a call stops its worker at the handler's next yield point (with
  # the tasks the handler started); a worker whose call leaves tasks running
  # retires with them. Either way the next call gets another worker.
  #
  # The thread must outlive anything a handler does: every exception a handler
  # raises is that call's failure (`exit` also asks the client to stop). If the
  # thread ends anyway without {#stop} (killed, or a bug), `on_death` is called
  # once so the consumer reports itself stalled instead of retrying forever.
  # A child forked by a handler (`fork` without a block) comes back into
  # {#perform} and ends there ({ForkedChild}).
  #
  # A {ReactorWatchdog} reports handlers that hold the reactor (run without
  # yielding) for too long.
  #
  # @api private Created by {Client#subscribe}; applications do not use it directly.
  class AsyncTaskProcessor
    # Entries per call in a batch: task id, context, completion, message.
    STRIDE = FiberPool::STRIDE
    private_constant :STRIDE

    # Under a steady stream of calls the main task gives the reactor a turn
    # (waiting handlers, timers, the heartbeat) at most this often, in seconds,
    # rather than after every batch: a turn polls for I/O, and one per batch
    # took ~6% of this thread's CPU on no-op calls (~11 calls per batch).
    REACTOR_TURN = 0.001
    private_constant :REACTOR_TURN

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
      @intake = Intake.new
      @pool = FiberPool.new(self)
      @traced = false
      @thread = nil
      @watchdog = nil
      @root = nil # the reactor's main task, once running
      @stopping = false
      @exit_requested = false
      @generation = Native.process_generation
    end

    # Starts the processor thread.
    #
    # @return [self]
    # @raise [StateError] if already started
    def start
      raise StateError, "the processor was already started" if @thread

      @generation = Native.process_generation # its calls belong to this process
      @thread = Thread.new { run }
      @thread.name = "prosody-processor"
      @thread.report_on_exception = false # `run` reports its own death
      @watchdog = ReactorWatchdog.new(@thread, threshold: @blocking_threshold).start
      self
    end

    # @return [Integer] handlers seen holding the reactor longer than the threshold
    def blocking_calls = @watchdog&.reports || 0

    # @return [Native::Inbox] where the native side queues handler calls and cancellations
    def inbox = @intake.inbox

    # Queues a handler call. Never blocks.
    #
    # @param task_id [Integer] unique within this subscription
    # @param native_context [Native::Context]
    # @param message [Message, Timer]
    # @param completion [#complete] reports the outcome, once
    # @return [nil]
    def submit(task_id, native_context, message, completion)
      submit_batch([task_id, Context.new(native_context, message), completion, message])
    end

    # Queues handler calls: `task_id, context, completion, message` for each
    # call, as {Native::Inbox#take} returns them. Never blocks.
    #
    # @param calls [Array] STRIDE entries per call
    # @return [nil]
    def submit_batch(calls)
      @intake.push(calls)
      nil
    rescue ClosedQueueError
      calls.each_slice(STRIDE) do |_, _, completion, message|
        report(completion, CancelledError.new("the processor has stopped; #{where(message)} was not handled"))
      end
      nil
    end

    # Queues the cancellation of a call submitted from Ruby. Never blocks.
    #
    # @param task_id [Integer]
    # @return [nil]
    def cancel(task_id)
      @intake.push(task_id)
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
      @intake.close
      return true if @thread.nil? || processor_thread?

      !@thread.join(timeout).nil?
    end

    # @return [Boolean] whether the processor thread is running
    def running? = @thread&.alive? || false

    # @param thread [Thread]
    # @return [Boolean] whether `thread` is the processor's own thread
    def processor_thread?(thread = Thread.current) = !@thread.nil? && @thread.equal?(thread)

    # Runs one call on `worker`'s fiber and reports its outcome. Called by {FiberPool}.
    #
    # @api private
    # @param worker [FiberPool::Worker]
    # @param context [Context]
    # @param completion [#complete]
    # @param message [Message, Timer]
    # @return [void]
    def perform(worker, context, completion, message)
      worker.context = context
      ReactorWatchdog.working_on(message)
      outcome = UNFINISHED
      begin
        @traced ? TraceContext.within(context) { invoke(context, message) } : invoke(context, message)
        outcome = nil
      rescue Async::Stop
        raise # cancellation: reported as such below, and the worker stops
      rescue SystemExit => e
        outcome = forked? ? e : exited(message, e)
      rescue Exception => e # rubocop:disable Lint/RescueException -- a handler must not kill the processor
        # Anything a handler raises (Interrupt, NoMemoryError, ScriptError...)
        # fails this call only; the thread goes on serving the others.
        outcome = e
        log_failure(message, e)
      ensure
        ForkedChild.end!(where(message), outcome) if forked?
        # Async::Stop (cancellation) skips the branches above and lands here.
        report(completion, UNFINISHED.equal?(outcome) ? cancelled(message) : outcome)
        finished_alone(UNFINISHED.equal?(outcome)) unless @pool.dispatching?
      end
    end

    # Starts the calls queued for the slots that are free now. Called by the
    # pool when a call finished outside a batch (its handler had waited), in
    # that call's worker, so they start at once rather than after the
    # reactor's next turn.
    #
    # @api private
    # @return [void]
    def refill
      @intake.take(@pool.calls_running) { |command| dispatch(@root, command) }
    rescue Exception # rubocop:disable Lint/RescueException -- re-raised once the main task is told
      @intake.inbox.wake # this worker ends: the main task takes what is queued
      raise
    end

    private

    def run
      # Only with spans to continue does a call need to be the fiber's current
      # one (TraceContext); tracing is set up from the environment, once.
      @traced = Native.tracing?
      Native.defer_completions(true)
      Async { |root| serve(root) }
    rescue Exception => e # rubocop:disable Lint/RescueException -- reported below, then re-raised
      fatal = e
      raise
    ensure
      # Whatever stopped the reactor, never leave the native side waiting.
      @intake.close
      abandon_queued
      Native.flush_completions
      Native.defer_completions(false)
      died(fatal) unless @stopping
    end

    # Takes calls until the intake is closed and drained.
    def serve(root)
      @root = root
      heartbeat = root.async { |task| beat(task) }
      turned = clock
      until (worked = @intake.take(@pool.calls_running) { |command| dispatch(root, command) }).nil?
        if !worked
          @intake.wait # in the reactor: waiting handlers run meanwhile
          turned = clock
        elsif clock - turned >= REACTOR_TURN
          # There is always work: let the rest of the reactor have its turn.
          root.yield
          turned = clock
        end
      end
      @pool.drain
    ensure
      heartbeat&.stop
    end

    def clock = Process.clock_gettime(Process::CLOCK_MONOTONIC)

    def dispatch(root, command)
      command.is_a?(Integer) ? cancel_call(root, command) : start_calls(root, command)
    end

    # A call finished outside a batch (resumed after waiting, or stopped):
    # send its outcome now. A stopped call's worker ends without a {#refill}:
    # wake the main task to start what was queued for its slot.
    def finished_alone(stopped)
      Native.flush_completions
      @intake.inbox.wake if stopped
    end

    def start_calls(root, calls)
      @pool.start(root, calls)
    ensure
      Native.flush_completions
    end

    def invoke(context, message)
      if message.is_a?(Timer)
        @handler.on_timer(context, message)
      else
        @handler.on_message(context, message)
      end
    end

    # @return [Boolean] whether this is a child forked from the process that made the processor
    def forked? = Native.process_generation != @generation

    # `exit` in a handler asks for a stop; the call itself is not finished, so
    # its message runs again after the restart.
    def exited(message, error)
      unless @exit_requested
        @exit_requested = true
        Prosody.log(Logger::WARN, "handler called exit (status #{error.status}) for #{where(message)}; " \
                                  "stopping the client gracefully")
        @on_exit&.call(error)
      end
      CancelledError.new("the handler for #{where(message)} called exit")
    end

    def cancel_call(root, task_id)
      worker = @pool.running(task_id) or return

      worker.context.cancel!
      # Let fibers parked in Context#on_cancel run first, then stop the call at
      # its next yield point; `ensure` blocks in the handler run.
      root.async do |stopper|
        stopper.yield
        worker.task.stop if worker.task_id == task_id
      end
    end

    def abandon_queued
      @intake.drain { |calls| abandon(calls) }
    end

    def abandon(calls)
      calls.each_slice(STRIDE) do |_, _, completion, message|
        report(completion, CancelledError.new("the processor stopped before #{where(message)} was handled"))
      end
    end

    def died(cause)
      return if AsyncTaskProcessor.process_exiting?

      reason = cause ? "#{cause.class}: #{cause.message}" : "the thread was killed"
      Prosody.log(Logger::ERROR,
                  "the handler thread (prosody-processor) died (#{reason}); no handler can run any more, " \
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
      Prosody.log(Logger::ERROR, "cannot report a handler outcome: #{e.class}: #{e.message}")
    end

    def cancelled(message)
      CancelledError.new("the handler for #{where(message)} was cancelled before it finished")
    end

    def log_failure(message, error)
      origin = error.backtrace&.first
      Prosody.log(Logger::ERROR,
                  "handler failed for #{where(message)}: #{error.class}: #{error.message}#{" (#{origin})" if origin}")
    end

    def where(subject) = subject.summary
  end
end
