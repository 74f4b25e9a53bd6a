# frozen_string_literal: true

module Prosody
  # One instrumentation event, as {Monitor} subscribers receive it.
  #
  # @example
  #   Prosody.monitor.subscribe("message.handled") do |event|
  #     Metrics.timing("kafka.#{event[:topic]}", event[:duration])
  #   end
  class Event
    # @return [String] e.g. "message.handled"
    attr_reader :name
    # @return [Hash{Symbol=>Object}] :topic, :partition, :offset, :key, :duration (Float seconds),
    #   :attempts, :reason, :error_class, :error_message, :group_id, :mode, as they apply
    attr_reader :payload
    # @return [Time] when the monitor delivered it
    attr_reader :time

    # @param name [String]
    # @param payload [Hash{Symbol=>Object}]
    def initialize(name, payload)
      @name = name
      @payload = payload.freeze
      @time = Time.now
      freeze
    end

    # @param field [Symbol]
    # @return [Object, nil] one field of the payload
    def [](field)
      @payload[field]
    end

    # @return [String]
    def inspect
      "#<#{self.class.name} #{@name} #{@payload.inspect}>"
    end
    alias to_s inspect
  end
end
