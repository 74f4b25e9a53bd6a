# frozen_string_literal: true

require "async"
require "prosody"
require_relative "testing/timers"
require_relative "testing/native_context"
require_relative "testing/result"
require_relative "testing/capture"

module Prosody
  # Helpers for applications' own specs: `require "prosody/testing"`.
  #
  # - {deliver} runs a handler on one message, without Kafka, and reports what
  #   the consumer would make of it (`:ok`, `:transient`, `:permanent` and the
  #   error), with a real {Context} whose timers go to memory.
  # - {fire_timers} runs the handler's due timers.
  # - {capture} returns what clients sent while a block ran. Requiring this
  #   file prepends a module to {Client} that records each acknowledged send
  #   (only while a capture is open; the send itself is unchanged).
  # - With RSpec loaded, the `have_sent_message` matcher ({Testing::Matchers})
  #   is included in every example group.
  #
  # @example
  #   result = Prosody::Testing.deliver(InvoiceHandler.new, topic: "invoices", key: "acct-42", payload: { amount: 5 })
  #   expect(result).to be_ok
  #   expect(result.context.scheduled).to eq([Time.at(1_700_000_000)])
  module Testing
    class << self
      # Runs `handler.on_message` on a message built from the arguments, the
      # way the consumer does: in a fiber of an Async reactor (a new one, or a
      # child task of the current one), with every exception caught and
      # classified by the handler's `permanent` / `transient` rules.
      # Unclassified errors are transient; a cancelled call (`Async::Stop`) or
      # `exit` reports a transient {CancelledError}, as the message would run
      # again. Nothing is logged.
      #
      # @param handler [EventHandler]
      # @param topic [String]
      # @param key [String]
      # @param payload [Object] given to the handler as a consumer would decode it (JSON, String keys)
      # @param headers [Hash{String=>String}]
      # @param offset [Integer]
      # @param partition [Integer]
      # @param timestamp [Time, nil]
      # @param timers [Timers] where the context's timers go; a fresh store by default
      # @return [Result]
      # @raise [ArgumentError] for a handler that is not an {EventHandler}, or a key or topic that is not a String
      def deliver(handler, topic:, key:, payload:, headers: {}, offset: 0, partition: 0, timestamp: Time.now,
                  timers: Timers.new)
        check(handler, topic:, key:)
        message = Message.new(topic, partition, offset, key, timestamp, decode(payload), headers.dup)
        run(handler, :on_message, message, timers)
      end

      # Fires the timers of `timers` due at `now`, earliest first, each through
      # `handler.on_timer` as {deliver} does for messages. As in the consumer, a
      # timer is still listed by `context.scheduled` while it runs, and is
      # deleted when its call ends `:ok` or `:permanent`; after a `:transient`
      # failure it stays, to be retried (by the next `fire_timers`). Timers the
      # calls schedule fire on a later call, not this one.
      #
      # @param handler [EventHandler]
      # @param timers [Timers, Result] a store, or a {Result} of {deliver} (its store)
      # @param now [Time, nil] fire timers due at or before this; nil fires every pending timer
      # @return [Array<Result>] one per timer fired, in order
      def fire_timers(handler, timers, now: Time.now)
        store = timers.is_a?(Result) ? timers.timers : timers
        unless store.is_a?(Timers)
          raise ArgumentError, "fire_timers needs a Prosody::Testing::Timers or a Result, got #{timers.class}"
        end

        due = store.all.select { |timer| now.nil? || timer.time <= now }
        due.map do |timer|
          result = run(handler, :on_timer, timer, store)
          store.unschedule(timer.key, (timer.time.to_r * 1000).floor) unless result.transient?
          result
        end
      end

      # Runs the block and returns every message that any {Client} of this
      # process sent (and the broker acknowledged) meanwhile, from any thread
      # or fiber. Captures may nest; each sees every message.
      #
      # @yield
      # @return [Array<SentMessage>]
      # @example
      #   sent = Prosody::Testing.capture { Checkout.complete(order) }
      #   expect(sent.map(&:topic)).to eq(["orders"])
      def capture
        recorder = []
        Capture.start(recorder)
        begin
          yield
        ensure
          Capture.stop(recorder)
        end
        recorder
      end

      private

      def check(handler, topic:, key:)
        raise ArgumentError, "expected a Prosody::EventHandler, got #{handler.class}" unless handler.is_a?(EventHandler)
        raise ArgumentError, "topic must be a non-empty String" unless topic.is_a?(String) && !topic.empty?
        raise ArgumentError, "key must be a String" unless key.is_a?(String)
      end

      def decode(payload)
        JSON.parse(JSON.generate(payload))
      end

      def run(handler, method_name, subject, timers)
        native = NativeContext.new(subject.key, timers)
        context = Context.new(native)
        # Wrapped: async 1.x's Task#wait raises a result that is an exception.
        error, = Async { [call(handler, method_name, context, subject)] }.wait
        Result.new(outcome: outcome(error), error:, context:, subject:, timers:)
      end

      # What the consumer does with a call's exception: the core retries all but PermanentError.
      def outcome(error)
        return :ok if error.nil?

        error.is_a?(PermanentError) ? :permanent : :transient
      end

      # The exception the consumer would report, or nil.
      def call(handler, method_name, context, subject)
        handler.public_send(method_name, context, subject)
        nil
      rescue Async::Stop
        CancelledError.new("the handler for #{subject.inspect} was cancelled before it finished")
      rescue SystemExit
        CancelledError.new("the handler for #{subject.inspect} called exit")
      rescue Exception => e # rubocop:disable Lint/RescueException -- the consumer fails the call for anything
        e
      end
    end
  end
end

require_relative "testing/rspec" if defined?(RSpec::Core) || defined?(RSpec::Matchers)
