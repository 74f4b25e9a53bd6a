# frozen_string_literal: true

require "rspec/expectations"
require "prosody/testing" unless defined?(Prosody::Testing::Capture)

module Prosody
  module Testing
    # RSpec matchers; included in every example group when `prosody/testing` is
    # required with RSpec loaded (or `config.include Prosody::Testing::Matchers`).
    module Matchers
      # Passes when a message to `topic` whose key, payload and headers match
      # was sent: by the block (`expect { ... }.to have_sent_message(...)`,
      # through {Testing.capture}), or is in a list of {SentMessage}s
      # (`expect(Prosody::Testing.capture { ... }).to have_sent_message(...)`).
      # `key:`, `payload:` and `headers:` take values or matchers
      # (`hash_including`, `a_string_starting_with`); left out, anything
      # matches. Payloads are compared as a consumer decodes them (String keys).
      #
      # @param topic [String, Object] a topic name or a matcher
      # @param expected [Hash] :key, :payload, :headers
      # @return [HaveSentMessage]
      # @example
      #   expect { checkout.complete }
      #     .to have_sent_message("orders", key: "order-7", payload: hash_including("total" => 12.5))
      def have_sent_message(topic, **expected) # rubocop:disable Naming/PredicateName -- RSpec's `have_` style
        HaveSentMessage.new(topic, **expected)
      end

      # The matcher behind {#have_sent_message}.
      class HaveSentMessage
        include ::RSpec::Matchers::Composable

        FIELDS = %i[key payload headers].freeze
        private_constant :FIELDS

        # @param topic [String, Object]
        # @param expected [Hash]
        # @raise [ArgumentError] for an unknown keyword
        def initialize(topic, **expected)
          unknown = expected.keys - FIELDS
          raise ArgumentError, "have_sent_message takes #{FIELDS.join(", ")}; got #{unknown.join(", ")}" if unknown.any?

          @topic = topic
          @expected = expected
          @sent = []
        end

        # @param actual [Proc, Array<SentMessage>]
        # @return [Boolean]
        def matches?(actual)
          @sent = actual.is_a?(Proc) ? Testing.capture(&actual) : Array(actual)
          @sent.any? { |sent| match_one?(sent) }
        end

        # @param actual [Proc, Array<SentMessage>]
        # @return [Boolean]
        def does_not_match?(actual)
          !matches?(actual)
        end

        # @return [Boolean]
        def supports_block_expectations?
          true
        end

        # @return [Boolean]
        def supports_value_expectations?
          true
        end

        # @return [String]
        def description
          "have sent a message to #{description_of(@topic)}" +
            @expected.map { |field, value| " #{field}: #{description_of(value)}" }.join(",")
        end

        # @return [String]
        def failure_message
          "expected to #{description}, but #{sent_summary}"
        end

        # @return [String]
        def failure_message_when_negated
          "expected not to #{description}, but it was among: #{sent_summary}"
        end

        private

        def match_one?(sent)
          values_match?(@topic, sent.topic) &&
            @expected.all? { |field, value| values_match?(value, sent.public_send(field)) }
        end

        def sent_summary
          return "nothing was sent" if @sent.empty?

          "these were sent:\n#{@sent.map { |sent| "  #{sent.inspect}" }.join("\n")}"
        end
      end
    end
  end
end

RSpec.configure { |config| config.include(Prosody::Testing::Matchers) } if RSpec.respond_to?(:configure)
