# frozen_string_literal: true

module Prosody
  # Subclass and define {#on_message}; pass an instance to {Client#subscribe}.
  #
  # One handler instance serves every call, concurrently (one fiber per call,
  # on one thread), so keep per-message state in locals, not instance variables.
  # Calls for the same key never overlap and arrive in offset order.
  #
  # Returning normally marks the message done. Raising marks it failed:
  # {PermanentError} (or a subclass) means retrying cannot help; anything else
  # counts as transient and is retried according to the client's `mode`. The
  # class macros `permanent` and `transient` ({ErrorClassification}) classify
  # other exceptions without rescuing them by hand; subclasses inherit them.
  # Cancellation (partition revoked, timeout, shutdown) raises `Async::Stop` at
  # the handler's next yield point, so `ensure` blocks run.
  #
  # @example
  #   class InvoiceHandler < Prosody::EventHandler
  #     permanent :on_message, KeyError, JSON::ParserError
  #
  #     def on_message(context, message)
  #       return if context.should_cancel?
  #
  #       Invoices.record(message.key, message.payload.fetch("amount"))
  #     end
  #   end
  class EventHandler
    extend ErrorClassification
    # Handles one message.
    #
    # @param context [Context] cancellation for this call
    # @param message [Message]
    # @return [void]
    # @raise [NotImplementedError] unless a subclass defines it
    def on_message(context, message)
      raise NotImplementedError, "#{self.class.name || "handler"} must define on_message(context, message)"
    end

    # Handles a timer that fired; only needed by handlers that schedule timers.
    #
    # @param context [Context]
    # @param timer [Timer] the timer that fired (its `key` and `time`)
    # @return [void]
    # @raise [NotImplementedError] unless a subclass defines it
    def on_timer(context, timer)
      raise NotImplementedError, "#{self.class.name || "handler"} must define on_timer(context, timer) to use timers"
    end
  end
end
