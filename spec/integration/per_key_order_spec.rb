# frozen_string_literal: true

# Inside one partition, messages with different keys run at the same time while
# messages with the same key run one at a time, in offset order. 2000 messages
# over 32 keys on a single partition go through a handler that sleeps a random
# few milliseconds (fiber-friendly: Kernel#sleep yields under Async), so calls
# overlap; every key's offsets must still arrive strictly increasing and never
# overlap, and the partition must really run many calls at once.
RSpec.describe "per-key order under concurrency" do
  it "keeps each key in offset order while running keys concurrently within a partition" do
    topic = unique_name("order")
    keys = Array.new(32) { |index| "key-#{index}" }
    total = 2000
    client = mock_consumer(topic, max_concurrency: 32)
    send_concurrently(client, topic, total, keys:)

    tracker = ProsodySpec::OrderTracker.new
    client.subscribe(handler { |_context, message| tracker.track(message) { sleep(rand * 0.005) } })
    wait_for(timeout: 60, description: "#{total} messages handled") { tracker.handled >= total }

    expect(tracker.violations).to be_empty
    expect(tracker.handled).to eq(total)
    expect(tracker.per_key).to eq(Array.new(total) { |index| keys[index % keys.size] }.tally)
    expect(tracker.max_in_flight).to be >= 8
    expect(tracker.max_in_flight).to be <= 32
  end
end
