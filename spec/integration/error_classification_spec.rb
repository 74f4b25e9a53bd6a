# frozen_string_literal: true

# Classifying errors with the class macros, end to end in pipeline mode with a
# failure topic: an exception a parent handler class declared `permanent` is
# raised by a subclass's own on_message, so the message goes straight to the
# failure topic after one attempt (prosody-attempts "1"), with the
# classification in the headers; an unclassified exception of the same
# subclass stays transient and is retried until it succeeds, never
# dead-lettered.
RSpec.describe "permanent and transient class macros" do
  let(:topic) { unique_name("classified") }
  let(:failure_topic) { "#{topic}.dead" }

  let(:base_handler) do
    Class.new(Prosody::EventHandler) do
      permanent :on_message, KeyError

      def initialize(attempts, handled)
        super()
        @attempts = attempts
        @handled = handled
      end
    end
  end

  let(:invoice_handler) do
    Class.new(base_handler) do
      transient :on_message, Errno::ECONNRESET

      def on_message(_context, message)
        attempt = (@attempts[message.key] += 1)
        raise IOError, "ledger busy" if message.payload["busy_until"].to_i >= attempt

        @handled << [message.key, message.payload.fetch("amount")] # KeyError without an amount
      end
    end
  end

  it "sends a permanent error straight to the failure topic and retries the rest" do
    Prosody::MockCluster.create_topic(failure_topic)
    dead_letters = collect(failure_topic)
    client = mock_consumer(topic, mode: :pipeline, max_retries: 0, retry_base: 0.005, defer_base: 0.005, failure_topic:)
    attempts = Hash.new(0)
    handled = Queue.new

    capture_logs do
      client.subscribe(invoice_handler.new(attempts, handled))
      client.send_message(topic, "no-amount", { "currency" => "EUR" })
      client.send_message(topic, "busy", { "busy_until" => 2, "amount" => 5 })

      letter = next_item(dead_letters, description: "the dead letter")
      expect(letter.key).to eq("no-amount")
      expect(letter.payload).to eq("currency" => "EUR")
      expect(letter.headers).to include(
        "prosody-error-class" => "Prosody::PermanentError",
        "prosody-failure-kind" => "permanent",
        "prosody-original-topic" => topic,
        "prosody-original-offset" => "0",
        "prosody-attempts" => "1"
      )
      expect(letter.headers["prosody-error-message"]).to start_with("KeyError: key not found: \"amount\"")

      expect(next_item(handled, description: "the busy key handled")).to eq(["busy", 5])
      expect(attempts).to eq("no-amount" => 1, "busy" => 3)
      expect(dead_letters).to be_empty
    end
  end
end
