# frozen_string_literal: true

module Prosody
  # What a handler knows about its own call: whether it should stop.
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
    # @api private
    # @param native [Native::Context] the core's context for this call
    def initialize(native)
      @native = native
      @cancelled = false
      @waiters = nil
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
  end
end
