# frozen_string_literal: true

# Message-id deduplication: a payload with an "id" is handled at most once per
# topic, key and id. A message is remembered only after its handler succeeded;
# skips count under client.skip_counts[:duplicates]. idempotence_cache_size: 0
# turns it off. (Restarts against PostgreSQL, TTL and version changes are
# covered by the Rust suite, crates/prosody/tests/consumer_dedup.rs.)
# All messages share one partition and arrive in order per key, so once the
# marker on the last key is handled, everything before it on that key was too.
RSpec.describe "message-id deduplication" do
  let(:topic) { unique_name("dedup") }

  it "handles an id once per key, and the same id under another key" do
    client = mock_consumer(topic)
    handled = Queue.new
    client.subscribe(handler { |_context, message| handled << [message.key, message.payload["id"]] })
    [%w[a m-1], %w[a m-1], %w[b m-1], %w[a m-2]].each do |key, id|
      client.send_message(topic, key, { "id" => id })
    end
    client.send_message(topic, "a", { "id" => "last" })

    seen = handled_until(handled, %w[a last])
    wait_for(description: "the other key handled") { seen.concat(drain(handled)).include?(%w[b m-1]) }
    expect(seen.sort).to eq([%w[a last], %w[a m-1], %w[a m-2], %w[b m-1]])
    expect(client.skip_counts[:duplicates]).to eq(1)
  end

  it "handles a message again when its first attempt failed" do
    client = mock_consumer(topic, retry_base: "10ms", defer_base: "10ms")
    attempts = Queue.new
    failed = false
    client.subscribe(handler do |_context, message|
      attempts << message.payload["n"]
      unless failed
        failed = true
        raise Prosody::TransientError, "first attempt fails"
      end
    end)
    client.send_message(topic, "a", { "id" => "m-1", "n" => 1 })
    client.send_message(topic, "a", { "id" => "m-1", "n" => 2 })
    client.send_message(topic, "a", { "id" => "m-3", "n" => 3 })

    seen = handled_until(attempts, 3)
    expect(seen).to eq([1, 1, 3])
    expect(client.skip_counts[:duplicates]).to eq(1)
  end

  it "handles every copy when idempotence_cache_size is 0" do
    client = mock_consumer(topic, idempotence_cache_size: 0)
    handled = Queue.new
    client.subscribe(handler { |_context, message| handled << message.payload["n"] })
    3.times { |n| client.send_message(topic, "a", { "id" => "same", "n" => n }) }

    expect(handled_until(handled, 2)).to eq([0, 1, 2])
    expect(client.skip_counts[:duplicates]).to eq(0)
  end
end
