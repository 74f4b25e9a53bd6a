# frozen_string_literal: true

module Prosody
  # One Kafka record as a handler sees it. Built by the native side (which sets
  # the same instance variables as {#initialize}, without calling it, the
  # timestamp as nanoseconds since the epoch); immutable.
  #
  # @example
  #   def on_message(context, message)
  #     Invoice.charge(message.payload.fetch("amount")) if message.key.start_with?("acct-")
  #   end
  class Message
    # @return [String] frozen (shared by the messages of a topic)
    attr_reader :topic
    # @return [Integer]
    attr_reader :partition
    # @return [Integer]
    attr_reader :offset
    # @return [String] the record key; messages with the same key are handled in order
    attr_reader :key
    # @return [Object] the decoded JSON payload (Hashes have String keys)
    attr_reader :payload
    # @return [Hash{String=>String}] record headers (frozen, as are their
    #   values; consecutive messages with the same headers share one Hash)
    attr_reader :headers

    # Positional because the native bridge calls it once per record.
    #
    # @param topic [String]
    # @param partition [Integer]
    # @param offset [Integer]
    # @param key [String]
    # @param timestamp [Time, nil]
    # @param payload [Object] decoded JSON
    # @param headers [Hash{String=>String}]
    def initialize(topic, partition, offset, key, timestamp, payload, headers) # rubocop:disable Metrics/ParameterLists
      @topic = topic
      @partition = partition
      @offset = offset
      @key = key
      @timestamp = timestamp
      @payload = payload
      @headers = headers.freeze
      freeze
    end

    # The native side stores nanoseconds since the epoch (an Integer), so the
    # Time is only built for handlers that read it.
    #
    # @return [Time, nil] the record timestamp, when the broker provided one
    def timestamp
      stamp = @timestamp
      return stamp unless stamp.is_a?(Integer)

      Time.at(stamp / 1_000_000_000, stamp % 1_000_000_000, :nsec)
    end

    # Where the record is, for log lines.
    #
    # @return [String] e.g. `topic=orders partition=0 offset=7 key="customer-42"`
    def summary
      "topic=#{topic} partition=#{partition} offset=#{offset} key=#{key.inspect}"
    end

    # @return [Hash{Symbol=>Object}]
    def to_h
      {
        topic:, partition:, offset:, key:,
        timestamp:, payload:, headers:
      }
    end

    # Messages are equal when every field is.
    #
    # @param other [Object]
    # @return [Boolean]
    def ==(other)
      other.is_a?(Message) && to_h == other.to_h
    end
    alias eql? ==

    # @return [Integer]
    def hash
      [self.class, topic, partition, offset, key].hash
    end

    # Shows where the message came from; the payload is left out, it may be large or private.
    #
    # @return [String]
    def inspect
      "#<#{self.class.name} #{topic}/#{partition}@#{offset} key=#{key.inspect} timestamp=#{timestamp.inspect}>"
    end
  end
end
