# frozen_string_literal: true

module Prosody
  module Testing
    # An in-memory timer store for {Testing.deliver}: what the handler
    # scheduled, per key, in milliseconds since the epoch (the real stores'
    # unit). Thread-safe. Pass one store to several deliveries (`timers:`) to
    # share timers between them, as the consumer does for one key.
    #
    # @example
    #   timers = Prosody::Testing::Timers.new
    #   Prosody::Testing.deliver(handler, topic: "t", key: "k", payload: {}, timers:)
    #   timers.scheduled("k") # => [2024-05-01 10:00:00 UTC]
    class Timers
      def initialize
        @lock = Mutex.new
        @timers = Hash.new { |timers, key| timers[key] = [] } # key => sorted, unique Integer ms
      end

      # @param key [String]
      # @return [Array<Time>] the key's pending timers, earliest first
      def scheduled(key)
        millis(key).map { |at| Timers.time(at) }
      end

      # @param key [String]
      # @return [Array<Integer>] the key's pending timers in milliseconds, earliest first
      def millis(key)
        @lock.synchronize { @timers.fetch(key, []).dup }
      end

      # @return [Array<Timer>] every pending timer of every key, earliest first
      def all
        @lock.synchronize do
          pending = @timers.flat_map { |key, times| times.map { |at| [at, key] } }
          pending.sort.map { |at, key| Timer.new(key, Timers.time(at)) }
        end
      end

      # @param key [String]
      # @param at [Integer] milliseconds since the epoch
      # @return [nil]
      def schedule(key, at)
        @lock.synchronize do
          times = @timers[key]
          times << at unless times.include?(at)
          times.sort!
        end
        nil
      end

      # @param key [String]
      # @param at [Integer]
      # @return [nil]
      def unschedule(key, at)
        @lock.synchronize do
          @timers[key].delete(at)
          @timers.delete(key) if @timers[key].empty?
        end
        nil
      end

      # @param key [String]
      # @return [nil]
      def clear(key)
        @lock.synchronize { @timers.delete(key) }
        nil
      end

      # Milliseconds since the epoch as a Time, as {Context#scheduled} returns them.
      #
      # @param at [Integer]
      # @return [Time]
      def self.time(at)
        Time.at(Rational(at, 1000))
      end
    end
  end
end
