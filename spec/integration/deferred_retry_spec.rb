# frozen_string_literal: true

# Deferred retry (:pipeline, option `defer`): a key whose handler keeps failing
# transiently is set aside, so the partition's other keys keep flowing even
# when the poison key's messages outnumber max_uncommitted; once it recovers,
# its messages run in their order, none lost. partition_stats counts what is
# deferred.
RSpec.describe "deferred retry" do
  let(:topic) { unique_name("deferred") }

  def deferred(client)
    client.partition_stats.sum { |stats| stats[:deferred_messages] }
  end

  it "lets the other keys flow past a failing key and runs its messages in order once it recovers" do
    healed = false
    handled_pairs = []
    client = mock_consumer(topic, mode: :pipeline, retry_base: 0.005, max_retry_delay: 0.05,
                                  defer_base: 0.005, defer_max_delay: 0.05, max_uncommitted: 5)
    client.subscribe(handler do |_context, message|
      raise IOError, "downstream down for #{message.key}" if message.key == "poison" && !healed

      handled_pairs << [message.key, message.offset]
    end)
    capture_logs do
      110.times do |index|
        key = (index % 11).zero? ? "poison" : "key-#{index % 11}"
        client.send_message(topic, key, { "index" => index })
      end

      wait_for(description: "the 100 healthy messages handled") { handled_pairs.size == 100 }
      wait_for(description: "the poison key's 10 messages deferred") { deferred(client) == 10 }
      expect(client.partition_stats.first).to include(deferred_keys: 1, deferred_messages: 10)

      healed = true
      wait_for(description: "the poison key's messages handled") { handled_pairs.size == 110 }
      poison = handled_pairs.select { |key, _| key == "poison" }.map(&:last)
      expect(poison).to eq((0...110).step(11).to_a)
      expect(handled_pairs.uniq.size).to eq(110)
      wait_for(description: "nothing deferred any more") { deferred(client).zero? }
    end
  end
end
