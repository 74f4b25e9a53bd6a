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
  # @api private Created by {Client#subscribe}; applications do not use it directly.
  class AsyncTaskProcessor
    # A call in flight: its task, and the context its cancellation goes through.
    Call = Struct.new(:task, :context)
    private_constant :Call

    # Marks a call that ended without reporting an outcome (it was stopped).
    UNFINISHED = Object.new.freeze
    private_constant :UNFINISHED

    # @param handler [EventHandler]
    def initialize(handler)
      @handler = handler
      @commands = Thread::Queue.new
      @calls = {} # task id => Call; touched only by the processor thread
      @thread = nil
    end

    # Starts the processor thread.
    #
    # @return [self]
    # @raise [StateError] if already started
    def start
      raise StateError, "the processor was already started" if @thread

      @thread = Thread.new { run }
      @thread.name = "prosody-processor"
      self
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
    ensure
      # Whatever stopped the reactor, never leave the native side waiting.
      @commands.close
      abandon_queued
    end

    def serve(root)
      while (command = @commands.pop)
        dispatch(root, command)
      end
      drain
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
      outcome = UNFINISHED
      begin
        if message.is_a?(Timer)
          @handler.on_timer(context, message)
        else
          @handler.on_message(context, message)
        end
        outcome = nil
      rescue StandardError, ScriptError, SystemStackError => e
        # Anything a handler can reasonably raise, including NotImplementedError
        # and deep recursion, is its failure; Async::Stop (cancellation) is not.
        outcome = e
        log_failure(message, e)
      ensure
        # Async::Stop (cancellation) skips both branches above and lands here.
        @calls.delete(task_id)
        report(completion, UNFINISHED.equal?(outcome) ? cancelled(message) : outcome)
      end
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
      return "timer key=#{subject.key.inspect} time=#{subject.time.inspect}" if subject.is_a?(Timer)

      "topic=#{subject.topic} partition=#{subject.partition} offset=#{subject.offset} key=#{subject.key.inspect}"
    end
  end
end
