# frozen_string_literal: true

module Prosody
  module Testing
    # What one handler call did, as the consumer would have judged it.
    #
    # - `outcome`: `:ok` (returned normally), `:transient` (raised anything
    #   that is not a {PermanentError}: the consumer retries it) or
    #   `:permanent` (raised a {PermanentError}, also through the `permanent`
    #   macro: never retried, sent to `failure_topic`).
    # - `error`: the exception the consumer would see (after classification,
    #   so a `permanent :on_message, KeyError` rule gives a PermanentError whose
    #   `cause` is the KeyError), nil when `:ok`.
    # - `context`: the {Prosody::Context} the handler got; `context.scheduled`
    #   lists the key's timers.
    # - `subject`: the {Message} or {Timer} handled.
    # - `timers`: the {Timers} store the context wrote to (for {Testing.fire_timers}).
    Result = Struct.new(:outcome, :error, :context, :subject, :timers, keyword_init: true) do
      # @return [Boolean]
      def ok?
        outcome == :ok
      end

      # @return [Boolean]
      def transient?
        outcome == :transient
      end

      # @return [Boolean]
      def permanent?
        outcome == :permanent
      end

      # @return [String]
      def inspect
        "#<Prosody::Testing::Result #{outcome}#{" #{error.class}: #{error.message}" if error} #{subject.inspect}>"
      end
    end
  end
end
