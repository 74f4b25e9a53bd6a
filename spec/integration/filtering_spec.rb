# frozen_string_literal: true

# Messages a consumer skips without calling its handler, counted in
# client.skip_counts:
# - allowed_events: only payloads whose "type" starts with one of the
#   prefixes are handled ("user." matches "user.created" but neither
#   "admin.user.created" nor "users.created"); a payload without a "type" is
#   handled. Skips count under :event_type.
# - loop prevention: every sent message carries a source-system header (the
#   source_system option, by default the group_id); a consumer skips messages
#   whose header equals its group_id, so a service that consumes the topics it
#   writes to never sees its own messages. Skips count under :own_messages.
#   With a source_system different from its group, a client sees its own.
# All messages share one key, so once the last one is handled every earlier
# one has been handled or skipped.
RSpec.describe "message filtering" do
  let(:topic) { unique_name("filtering") }

  describe "allowed_events" do
    it "handles only payloads whose type starts with an allowed prefix, or that have no type" do
      client = mock_consumer(topic, allowed_events: ["user."])
      handled = Queue.new
      client.subscribe(handler { |_context, message| handled << message.payload })
      [
        { "type" => "user.created", "id" => 1 },
        { "type" => "admin.user.created", "id" => 2 },
        { "type" => "users.created", "id" => 3 },
        { "id" => 4 },
        "no type at all",
        { "type" => "user.deleted", "id" => 5 }
      ].each { |payload| client.send_message(topic, "k", payload) }

      seen = handled_until(handled, { "type" => "user.deleted", "id" => 5 })
      expect(seen).to eq(
        [{ "type" => "user.created", "id" => 1 }, { "id" => 4 }, "no type at all",
         { "type" => "user.deleted", "id" => 5 }]
      )
      expect(client.skip_counts).to eq(event_type: 2, own_messages: 0, duplicates: 0)
    end

    it "handles every type when not set" do
      client = mock_consumer(topic)
      handled = Queue.new
      client.subscribe(handler { |_context, message| handled << message.payload["type"] })
      %w[user.created admin.user.created].each { |type| client.send_message(topic, "k", { "type" => type }) }
      expect(handled_until(handled, "admin.user.created")).to eq(%w[user.created admin.user.created])
      expect(client.skip_counts[:event_type]).to eq(0)
    end
  end

  describe "loop prevention" do
    let(:group) { unique_name("billing") }

    it "skips the consumer's own messages when its source_system is its group_id" do
      client = mock_client(topic:, group_id: group, subscribed_topics: topic)
      expect(client.source_system).to eq(group)
      other = mock_client(source_system: "ledger")
      same_name = mock_client(source_system: group)
      handled = Queue.new
      client.subscribe(handler { |_context, message| handled << [message.payload, message.headers["source-system"]] })

      3.times { |index| client.send_message(topic, "k", "own #{index}") }
      same_name.send_message(topic, "k", "another client naming this group")
      other.send_message(topic, "k", "from the ledger")

      seen = handled_until(handled, ["from the ledger", "ledger"])
      expect(seen).to eq([["from the ledger", "ledger"]])
      wait_for(description: "four own messages counted") { client.skip_counts[:own_messages] == 4 }
      expect(client.skip_counts[:event_type]).to eq(0)
    end

    it "sees its own messages when its source_system differs from its group_id" do
      client = mock_client(topic:, group_id: group, subscribed_topics: topic, source_system: "billing-api")
      handled = Queue.new
      client.subscribe(handler { |_context, message| handled << [message.payload, message.headers["source-system"]] })

      client.send_message(topic, "k", "own")
      expect(next_item(handled)).to eq(%w[own billing-api])
      expect(client.skip_counts[:own_messages]).to eq(0)
    end
  end
end
