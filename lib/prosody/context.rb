# frozen_string_literal: true

module Prosody
  # What a handler knows about its own call: whether it should stop, and the
  # timers of its key.
  #
  # A call is cancelled when its partition is revoked, the client unsubscribes
  # or the handler runs past its deadline. Long handlers either poll
  # {#should_cancel?} or park a fiber in {#on_cancel}; in both cases the
  # processor then stops the call with `Async::Stop` at its next yield point.
  #
  # @example Stop a long loop early
  #   def on_message(context, message)
  #     message.payload["items"].each do |item|
  #       break if context.should_cancel?
  #
  #       process(item)
  #     end
  #   end
  class Context
    # The milliseconds since the epoch a timer can be set to.
    MILLIS = (-(2**63)..((2**63) - 1))
    private_constant :MILLIS

    # The native extension builds a handler call's context without calling
    # this (`Native::Inbox#take`), with the same two instance variables; the
    # others start unset (nil) and are set when first used.
    #
    # @api private
    # @param native [Native::Context] the core's context for this call
    # @param subject [Message, Timer, nil] what the call handles (tags {#logger}'s lines)
    def initialize(native, subject = nil)
      @native = native
      @subject = subject
    end

    # The W3C `traceparent` of this handler attempt's span, when tracing is on
    # (an OTLP endpoint is configured): `00-<trace id>-<span id>-<flags>`.
    # {Client#send_message} in the handler's fiber adds it by itself; pass it
    # as the `traceparent` header of a send made elsewhere (another thread, a
    # job queue) to continue the trace there.
    #
    # @return [String, nil] nil when tracing is off
    def trace_context
      return @trace_context if defined?(@trace_context)

      @trace_context = @native.trace_context
    end

    # {Prosody.logger}, with each line tagged with this call's topic,
    # partition, offset and key (for a timer: topic, partition, key and time);
    # with `Prosody.log_format = :json` they are fields of the JSON line.
    #
    # @return [MessageLogger]
    # @example
    #   context.logger.info("charged #{amount}")
    #   # => ... [topic=orders partition=0 offset=7 key="acct-9"] charged 12
    def logger
      @logger ||= MessageLogger.new(Prosody.logger, MessageLogger.tags(@subject))
    end

    # Cheap and thread-safe; true once the call has been cancelled for any reason.
    #
    # @return [Boolean]
    def should_cancel?
      @cancelled || @native.should_cancel?
    end

    # Suspends the calling fiber until the call is cancelled; returns at once if
    # it already is. Only from inside the handler's own fiber.
    #
    # @return [void]
    # @example Release a resource when the partition goes away
    #   Async { context.on_cancel; subscription.close }
    def on_cancel
      return if should_cancel?

      (@waiters ||= Async::Notification.new).wait
      nil
    end

    # Schedules a timer for this call's key: {EventHandler#on_timer} runs at or
    # after `time` (millisecond precision), through the key's queue. A time in
    # the past fires promptly. Scheduling the same time twice is one timer.
    #
    # @param time [Time]
    # @return [nil]
    # @raise [TimerError] when `time` is not a Time, or is out of range
    # @raise [ConfigurationError] when no timer store is configured (database_url)
    # @example Remind the customer tomorrow
    #   context.schedule(Time.now + 86_400)
    def schedule(time)
      at = millis(time)
      NativeCall.await { |queue| @native.schedule(at, queue) }
    end

    # Replaces all of this key's timers with one at `time`.
    #
    # @param time [Time]
    # @return [nil]
    # @raise [TimerError] when `time` is not a Time, or is out of range
    def clear_and_schedule(time)
      at = millis(time)
      NativeCall.await { |queue| @native.clear_and_schedule(at, queue) }
    end

    # Removes this key's timer at `time`, if there is one.
    #
    # @param time [Time]
    # @return [nil]
    # @raise [TimerError] when `time` is not a Time, or is out of range
    def unschedule(time)
      at = millis(time)
      NativeCall.await { |queue| @native.unschedule(at, queue) }
    end

    # Removes all of this key's timers.
    #
    # @return [nil]
    def clear_scheduled
      NativeCall.await { |queue| @native.clear_scheduled(queue) }
    end

    # This key's pending timers, earliest first.
    #
    # @return [Array<Time>]
    def scheduled
      NativeCall.await { |queue| @native.scheduled(queue) }.map { |at| Time.at(Rational(at, 1000)) }
    end

    # Marks the call cancelled and wakes {#on_cancel} waiters. Called by the
    # processor on its reactor thread, the only thread that touches the waiters.
    #
    # @api private
    # @return [void]
    def cancel!
      @cancelled = true
      @waiters&.signal
      nil
    end

    private

    # Milliseconds since the epoch, the stores' unit (a signed 64-bit integer).
    def millis(time)
      raise TimerError, "timer times must be Time objects, got #{time.class} #{time.inspect}" unless time.is_a?(Time)

      at = (time.to_r * 1000).floor
      return at if MILLIS.cover?(at)

      raise TimerError, "timer time #{time.inspect} is out of range: timers keep milliseconds since 1970 " \
                        "in a signed 64-bit integer (about 292 million years either way)"
    end
  end
end
