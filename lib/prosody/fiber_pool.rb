# frozen_string_literal: true

module Prosody
  # Long-lived worker tasks (fibers) that run handler calls for an
  # {AsyncTaskProcessor}, inside its reactor, on its thread.
  #
  # {#start} hands a batch of calls to the pool: an idle worker runs them
  # inline, one after another, until a handler yields (sleeps, waits on I/O);
  # only then does the next call go to another worker, started when none is
  # idle. Handlers that never wait so cost no task, fiber or switch each, and
  # handlers that wait still run concurrently. Workers stay until stopped:
  # cancelling a call stops its worker (with the tasks the handler started), and
  # a worker whose call leaves tasks running retires with them.
  #
  # @api private Used by {AsyncTaskProcessor}.
  class FiberPool
    # A worker: its task, the call in hand (`task_id`, `context`), if any, and
    # whether it is in the idle list (a flag: searching the list compared
    # Structs member by member, measurably slow with many workers).
    Worker = Struct.new(:task, :task_id, :context, :idle)

    # Entries per call in a batch: task id, context, completion, message.
    STRIDE = 4

    # The batch in hand when there is none.
    NO_CALLS = [].freeze
    private_constant :NO_CALLS

    # @param runner [#perform, #refill] `perform(worker, context, completion, message)`
    #   runs a call (sets `worker.context`) and reports its outcome, a method
    #   call rather than a block, one frame less per call; `refill` starts the
    #   calls waiting for a slot, after a call finished outside {#start}
    def initialize(runner)
      @runner = runner
      @workers = [] # every worker, idle or busy
      @idle = [] # workers parked, waiting for calls
      @batch = NO_CALLS # the calls being started, STRIDE entries each
      @next = 0 # index in @batch of the next call to start
      @dispatching = false
      @call_finished = nil # an Async::Notification, while draining
      @calls_running = 0
    end

    # @return [Integer] calls started and not finished (running or waiting in a handler)
    attr_reader :calls_running

    # @return [Boolean] whether {#start} is handing out a batch right now
    def dispatching?
      @dispatching
    end

    # Starts every call of `calls` (STRIDE entries each); returns once each has
    # finished or is waiting. Only from the reactor's main task.
    #
    # @param root [Async::Task] the parent of new workers
    # @param calls [Array]
    # @return [void]
    def start(root, calls)
      @batch = calls
      @next = 0
      @dispatching = true
      while @next < @batch.size
        worker = @idle.pop
        if worker
          worker.idle = false
          worker.task.fiber.resume
        else
          start_worker(root)
        end
      end
    ensure
      @batch = NO_CALLS
      @next = 0
      @dispatching = false
    end

    # @param task_id [Integer]
    # @return [Worker, nil] the worker running that call
    def running(task_id)
      @workers.find { |worker| worker.task_id == task_id }
    end

    # Waits for the calls in flight, then stops the idle workers.
    #
    # @return [void]
    def drain
      @call_finished = Async::Notification.new
      @call_finished.wait while @workers.any?(&:task_id)
      @workers.dup.each { |worker| worker.task.stop }
    end

    private

    def start_worker(root)
      worker = Worker.new
      @workers << worker
      root.async { |task| work(task, worker) }
    end

    def work(task, worker)
      worker.task = task
      loop do
        while (index = @next) < @batch.size
          @next = index + STRIDE
          perform(worker, index)
          # Outside a batch its handler had waited: the calls queued for its
          # slot start now, not after the main task's next turn.
          @runner.refill unless @dispatching
          # The call left tasks running: they stay with this task, which retires.
          return if task.children?
        end
        # (Never twice: a stray wake-up of a parked worker just parks it again.)
        unless worker.idle
          worker.idle = true
          @idle << worker
        end
        Async::Task.yield # parked until the main task has calls again
      end
    ensure
      @idle.delete_if { |other| other.equal?(worker) }
      @workers.delete_if { |other| other.equal?(worker) }
    end

    def perform(worker, index)
      worker.task_id = @batch[index]
      @calls_running += 1
      @runner.perform(worker, @batch[index + 1], @batch[index + 2], @batch[index + 3])
    ensure
      # Also when the call was stopped (Async::Stop ends this worker).
      @calls_running -= 1
      worker.task_id = nil
      worker.context = nil
      @call_finished&.signal
    end
  end
end
