# frozen_string_literal: true

module Prosody
  # Notices a handler that holds the processor's reactor (runs without yielding)
  # for longer than a threshold. Every other handler of the process waits
  # meanwhile, which is Ruby's nature, so it is made visible: logged at WARN
  # with the message it was working on, and counted.
  #
  # The reactor calls {#beat} from a task every {HEARTBEAT} seconds; the
  # watchdog's own thread (which Ruby's scheduler runs even while a handler
  # hogs the GVL) checks how long ago the last beat was. The message in hand is
  # a fiber-local of the handler's fiber, which `Thread#[]` reads for whatever
  # fiber the reactor's thread is running at that moment.
  #
  # @api private Used by {AsyncTaskProcessor}.
  class ReactorWatchdog
    # Seconds a handler may hold the reactor before it is reported.
    DEFAULT_THRESHOLD = 1.0

    # How often the reactor proves it is turning, in seconds.
    HEARTBEAT = 0.1

    # Fiber-local key naming the message a handler fiber works on.
    CURRENT = :__prosody_current_message
    private_constant :CURRENT

    # Marks the calling fiber as working on `subject` (a Message or Timer).
    #
    # @param subject [Message, Timer]
    # @return [void]
    def self.working_on(subject)
      Thread.current[CURRENT] = subject
    end

    # @return [Integer] handlers reported so far
    attr_reader :reports

    # @param reactor_thread [Thread] the thread whose reactor is watched
    # @param threshold [Numeric] seconds
    def initialize(reactor_thread, threshold: DEFAULT_THRESHOLD)
      @reactor_thread = reactor_thread
      @threshold = threshold
      @beat_at = monotonic
      @reports = 0
      @thread = nil
    end

    # Starts watching on a thread of its own, until the reactor's thread ends.
    #
    # @return [self]
    def start
      @thread = Thread.new { watch }
      @thread.name = "prosody-watchdog"
      self
    end

    # Called by the reactor: it got control back.
    #
    # @return [void]
    def beat
      @beat_at = monotonic
    end

    private

    def watch
      reported = nil
      while @reactor_thread.alive?
        sleep(HEARTBEAT * 2)
        held_for = monotonic - @beat_at
        next reported = nil if held_for < @threshold

        subject = @reactor_thread[CURRENT]
        next if subject.nil? || subject.equal?(reported)

        reported = subject
        @reports += 1
        report(subject, held_for)
      end
    end

    def report(subject, held_for)
      message = format("handler for %<subject>s has held the reactor for %<seconds>.1fs without yielding; every " \
                       "other handler of this process waits meanwhile (move CPU-bound work to a thread, or call " \
                       "Async::Task.current.yield in long loops)", subject: subject.summary, seconds: held_for)
      Prosody.log(Logger::WARN, message)
    end

    def monotonic
      Process.clock_gettime(Process::CLOCK_MONOTONIC)
    end
  end
end
