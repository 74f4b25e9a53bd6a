# frozen_string_literal: true

RSpec.describe Prosody::Client do
  let(:topic) { unique_name("client") }

  describe ".new" do
    it "takes keyword options" do
      client = mock_client(group_id: "billing", subscribed_topics: topic)
      expect(client.config[:group_id]).to eq("billing")
    end

    it "takes a Configuration, with keyword options laid over it" do
      config = Prosody::Configuration.new(mock: true, group_id: "billing")
      client = described_class.new(config, source_system: "ledger")
      expect(client.source_system).to eq("ledger")
      expect(client.config[:group_id]).to eq("billing")
    end

    it "needs a source system when it has no group" do
      expect { described_class.new(mock: true) }.to raise_error(Prosody::ConfigurationError, /`source_system`/)
    end

    it "defaults the source system to the group id" do
      expect(mock_client(group_id: "billing").source_system).to eq("billing")
    end

    it "rejects something that is not a Configuration" do
      expect { described_class.new({ mock: true }) }.to raise_error(Prosody::ConfigurationError, /Configuration/)
    end

    {
      { no_such_option: 1 } => "no_such_option",
      { max_concurrency: 0 } => "max_concurrency",
      { max_concurrency: "x" } => "max_concurrency",
      { commit_interval: "soon" } => "commit_interval",
      { send_timeout: "10 parsecs" } => "send_timeout",
      { max_uncommitted: "-3" } => "max_uncommitted",
      { mock: "maybe" } => "mock"
    }.each do |options, name|
      it "raises a ConfigurationError naming `#{name}` for #{options.inspect}" do
        expect { described_class.new(mock: true, group_id: "billing", **options) }
          .to raise_error(Prosody::ConfigurationError, /`#{name}`/)
      end
    end
  end

  describe "#send_message" do
    let(:client) { mock_client(topic:) }

    it "returns nil once the broker acknowledged" do
      expect(client.send_message(topic, "k", { "a" => 1 })).to be_nil
    end

    it "refuses a nil or empty key with a clear message" do
      expect do
        client.send_message(topic, nil,
                            {})
      end.to raise_error(Prosody::InvalidMessageError, /key must be a non-empty String, got nil/)
      expect { client.send_message(topic, "", {}) }.to raise_error(Prosody::InvalidMessageError, /key/)
      expect { client.send_message(topic, :k, {}) }.to raise_error(Prosody::InvalidMessageError, /key.*Symbol/)
    end

    it "refuses a missing topic" do
      expect { client.send_message(nil, "k", {}) }.to raise_error(Prosody::InvalidMessageError, /topic/)
    end

    it "refuses a payload that is not JSON, and keeps working" do
      expect { client.send_message(topic, "k", Object.new) }.to raise_error(Prosody::InvalidMessageError, /Object/)
      expect do
        client.send_message(topic, "k", { "a" => [1, Float::NAN] })
      end.to raise_error(Prosody::InvalidMessageError)
      expect { client.send_message(topic, "k", { 1 => "a" }) }.to raise_error(Prosody::InvalidMessageError)
      expect(client.send_message(topic, "k", { "still" => "works" })).to be_nil
    end

    it "refuses headers that are not a Hash of Strings" do
      expect do
        client.send_message(topic, "k", {}, headers: [])
      end.to raise_error(Prosody::InvalidMessageError, /headers/)
      expect do
        client.send_message(topic, "k", {}, headers: { "n" => 1 })
      end.to raise_error(Prosody::InvalidMessageError, /n/)
    end
  end

  describe "consumer lifecycle" do
    it "is :unconfigured for a producer-only client" do
      expect(mock_client.consumer_state).to eq(:unconfigured)
    end

    it "goes :configured -> :running -> :configured" do
      client = mock_consumer(topic)
      expect(client.consumer_state).to eq(:configured)
      client.subscribe(handler { |_context, _message| nil })
      expect(client.consumer_state).to eq(:running)
      wait_for(description: "a partition assignment") { client.assigned_partitions == 1 }
      client.unsubscribe
      expect(client.consumer_state).to eq(:configured)
      expect(client.assigned_partitions).to eq(0)
    end

    it "can subscribe again after unsubscribing" do
      client = mock_consumer(topic)
      seen = Queue.new
      client.subscribe(handler { |_context, message| seen << message.payload })
      client.unsubscribe
      client.subscribe(handler { |_context, message| seen << message.payload })
      client.send_message(topic, "k", "again")
      expect(wait_for { seen.pop(true) rescue nil }).to eq("again") # rubocop:disable Style/RescueModifier
    end

    it "refuses a handler that is not an EventHandler" do
      client = mock_consumer(topic)
      expect { client.subscribe(->(_c, _m) {}) }.to raise_error(Prosody::ConfigurationError, /EventHandler/)
      expect(client.consumer_state).to eq(:configured)
    end

    it "refuses to subscribe twice, and keeps the first subscription" do
      client = mock_consumer(topic)
      seen = Queue.new
      client.subscribe(handler { |_context, message| seen << message.key })
      expect { client.subscribe(handler { |_context, _message| nil }) }.to raise_error(Prosody::StateError)
      client.send_message(topic, "still-first", {})
      expect(seen.pop).to eq("still-first")
    end

    it "refuses to subscribe without a group or topics" do
      client = mock_client(topic:)
      expect { client.subscribe(handler { |_context, _message| nil }) }.to raise_error(Prosody::ConfigurationError)
      expect(client.consumer_state).to eq(:unconfigured)
    end

    it "treats unsubscribe without a subscription as done" do
      expect(mock_consumer(topic).unsubscribe).to be_nil
    end

    it "refuses to unsubscribe from inside a handler" do
      client = mock_consumer(topic)
      errors = Queue.new
      client.subscribe(handler do |_context, _message|
        client.unsubscribe
      rescue Prosody::StateError => e
        errors << e
      end)
      client.send_message(topic, "k", {})
      expect(errors.pop.message).to include("inside a handler")
    end

    it "reports partition statistics while running" do
      client = mock_consumer(topic)
      client.subscribe(handler { |_context, _message| nil })
      stats = wait_for(description: "partition stats") { client.partition_stats.first }
      expect(stats).to include(topic:, partition: 0)
      expect(stats.keys).to include(:buffered, :max_buffered, :full, :fills, :drains, :finished)
    end

    it "reports the fair scheduler's queue and rejections" do
      client = mock_consumer(topic)
      expect(client.qos_stats).to eq(waiting: 0, waiting_retries: 0, max_waiting: 0, waited: 0, tracked_keys: 0,
                                     rejections: 0)
      client.subscribe(handler { |_context, _message| nil })
      expect(client.qos_stats.keys).to eq(%i[waiting waiting_retries max_waiting waited tracked_keys rejections])
    end
  end
end
