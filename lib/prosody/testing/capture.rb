# frozen_string_literal: true

require "json"

# Capturing sent messages in tests (see Prosody::Testing.capture).
module Prosody
  module Testing
    # A message a client sent (the broker acknowledged it) while a
    # {Testing.capture} block ran. `payload` is what a consumer will decode:
    # JSON with String keys, so `{ amount: 5 }` is recorded as `{ "amount" => 5 }`.
    SentMessage = Struct.new(:topic, :key, :payload, :headers, :client, keyword_init: true) do
      # @return [String]
      def inspect
        "#<Prosody::Testing::SentMessage #{topic} key=#{key.inspect} payload=#{payload.inspect}" \
          "#{" headers=#{headers.inspect}" unless headers.empty?}>"
      end
    end

    # Records sent messages into every capture open at the time.
    #
    # @api private
    module Capture
      @lock = Mutex.new
      @recorders = []

      class << self
        # @param recorder [Array<SentMessage>] collects messages until {#stop}
        # @return [void]
        def start(recorder)
          @lock.synchronize { @recorders << recorder }
        end

        # @param recorder [Array<SentMessage>]
        # @return [void]
        def stop(recorder)
          @lock.synchronize { @recorders.delete_if { |open| open.equal?(recorder) } }
        end

        # @param sent [SentMessage]
        # @return [void]
        def record(sent)
          @lock.synchronize { @recorders.each { |recorder| recorder << sent } }
        end

        # @return [Boolean] whether any capture is open
        def active?
          @lock.synchronize { !@recorders.empty? }
        end
      end

      # Prepended to {Prosody::Client} by `require "prosody/testing"` (and only
      # then): after a successful send, records it into the open captures.
      module ClientExtension
        # Same as {Prosody::Client#send_message}; also records the message.
        def send_message(topic, key, payload, headers: {})
          result = super
          if Capture.active?
            Capture.record(
              SentMessage.new(topic:, key:, payload: JSON.parse(JSON.generate(payload)), headers:, client: self)
            )
          end
          result
        end
      end
    end
  end

  Client.prepend(Testing::Capture::ClientExtension)
end
