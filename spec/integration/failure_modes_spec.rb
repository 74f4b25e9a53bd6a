# frozen_string_literal: true

# What happens to a message whose handler keeps failing, in each mode, read
# back from the failure topic by a second consumer:
# - low_latency retries a transient failure max_retries times, then writes the
#   message (original key, payload, headers) to failure_topic with headers
#   naming the error, the failure kind, where it came from and how many
#   attempts were made; a permanent failure goes there at once;
# - pipeline retries transient failures past max_retries (until they succeed)
#   and dead-letters only permanent ones;
# - best_effort retries max_retries times, then logs and skips; nothing is
#   dead-lettered.
# In every mode the other keys keep flowing, and a later message of the failed
# key is handled once its predecessor was given up on.
RSpec.describe "failure modes" do
  let(:topic) { unique_name("failures") }
  let(:failure_topic) { "#{topic}.dead" }
  let(:attempts) { Hash.new(0) }
  let(:handled) { [] } # [key, offset] pairs, appended by the processor thread

  # A handler that fails according to the payload: "transient" raises IOError
  # every time, "permanent" raises Prosody::PermanentError, {"fail_times" => n}
  # raises IOError on the first n attempts; otherwise it records the key.
  def failing_handler
    handler do |_context, message|
      attempt = (attempts[[message.key, message.offset]] += 1)
      fail_as(message, attempt)
      handled << [message.key, message.offset]
    end
  end

  def fail_as(message, attempt)
    case message.payload["fail"]
    when "transient" then raise IOError, "disk unavailable for #{message.key}"
    when "permanent" then raise Prosody::PermanentError, "invalid invoice #{message.key}"
    end
    raise IOError, "not yet (#{message.key})" if attempt <= message.payload.fetch("fail_times", 0)
  end

  def consumer(mode, **options)
    Prosody::MockCluster.create_topic(failure_topic)
    mock_consumer(topic, mode:, max_retries: 2, retry_base: 0.005, defer_base: 0.005, failure_topic:, **options)
  end

  # Waits until `key` was handled; returns the offset handled first.
  def handled_offset(key)
    wait_for(description: "#{key} handled") { handled.find { |handled_key, _| handled_key == key } }.last
  end

  # Sends a marker straight to the failure topic and returns the dead letters
  # that arrived before it: everything written there so far.
  def dead_letters_so_far(dead_letters)
    mock_client.send_message(failure_topic, "marker", "marker")
    letters = []
    loop do
      letter = next_item(dead_letters, description: "the marker on the failure topic")
      break if letter.key == "marker"

      letters << letter
    end
    letters
  end

  describe "low_latency" do
    it "dead-letters a transient failure after max_retries, and a permanent one at once" do
      client = consumer(:low_latency)
      dead_letters = collect(failure_topic)
      capture_logs do
        client.subscribe(failing_handler)
        client.send_message(topic, "flaky", { "fail" => "transient" }, headers: { "trace" => "abc" })
        client.send_message(topic, "poison", { "fail" => "permanent" })
        client.send_message(topic, "healthy", { "n" => 1 })
        client.send_message(topic, "flaky", { "n" => 2 })

        letters = Array.new(2) { next_item(dead_letters, description: "a dead letter") }.sort_by(&:key)
        flaky, poison = letters

        expect(flaky.topic).to eq(failure_topic)
        expect(flaky.payload).to eq("fail" => "transient")
        expect(flaky.headers).to include(
          "trace" => "abc",
          "prosody-error-class" => "IOError",
          "prosody-error-message" => "disk unavailable for flaky",
          "prosody-failure-kind" => "transient",
          "prosody-original-topic" => topic,
          "prosody-original-partition" => "0",
          "prosody-original-offset" => "0",
          "prosody-attempts" => "3"
        )
        expect(poison.payload).to eq("fail" => "permanent")
        expect(poison.headers).to include(
          "prosody-error-class" => "Prosody::PermanentError",
          "prosody-error-message" => "invalid invoice poison",
          "prosody-failure-kind" => "permanent",
          "prosody-original-offset" => "1",
          "prosody-attempts" => "1"
        )

        expect(handled_offset("healthy")).to eq(2)
        expect(handled_offset("flaky")).to eq(3)
        expect(attempts).to include(["flaky", 0] => 3, ["poison", 1] => 1)
      end
    end
  end

  describe "pipeline" do
    it "retries transient failures past max_retries and dead-letters only permanent ones" do
      client = consumer(:pipeline)
      dead_letters = collect(failure_topic)
      capture_logs do
        client.subscribe(failing_handler)
        client.send_message(topic, "flaky", { "fail_times" => 5 })
        client.send_message(topic, "poison", { "fail" => "permanent" })
        client.send_message(topic, "healthy", { "n" => 1 })

        expect(handled_offset("flaky")).to eq(0)
        expect(handled_offset("healthy")).to eq(2)
        expect(attempts[["flaky", 0]]).to eq(6)

        letters = dead_letters_so_far(dead_letters)
        expect(letters.map(&:key)).to eq(["poison"])
        expect(letters.first.headers).to include(
          "prosody-error-class" => "Prosody::PermanentError",
          "prosody-failure-kind" => "permanent",
          "prosody-original-topic" => topic,
          "prosody-original-offset" => "1",
          "prosody-attempts" => "1"
        )
      end
    end
  end

  describe "best_effort" do
    it "gives up after max_retries, logs and skips, and dead-letters nothing" do
      client = consumer(:best_effort)
      dead_letters = collect(failure_topic)
      capture_logs(level: Logger::INFO) do |logs|
        client.subscribe(failing_handler)
        client.send_message(topic, "flaky", { "fail" => "transient" })
        client.send_message(topic, "poison", { "fail" => "permanent" })
        client.send_message(topic, "flaky", { "n" => 2 })
        client.send_message(topic, "poison", { "n" => 3 })

        expect(handled_offset("flaky")).to eq(2)
        expect(handled_offset("poison")).to eq(3)
        expect(dead_letters_so_far(dead_letters)).to be_empty
        # Native log lines come through the bridge thread, a little after the event.
        [/skipping message after failure \(IOError\): disk unavailable for flaky/,
         /skipping message after failure \(Prosody::PermanentError\): invalid invoice poison/].each do |line|
          wait_for(description: "a log line matching #{line.inspect}") { logs.string.match?(line) }
        end
      end

      expect(attempts).to include(["flaky", 0] => 3, ["poison", 1] => 1)
    end
  end
end
