# frozen_string_literal: true

RSpec.describe Prosody::MockCluster do
  it "reports its bootstrap address" do
    expect(described_class.bootstrap_servers).to match(/\A[\w.-]+:\d+(,[\w.-]+:\d+)*\z/)
  end

  it "creates a topic once" do
    topic = unique_name("mock")
    expect(described_class.create_topic(topic, partitions: 3)).to be(true)
    expect(described_class.create_topic(topic, partitions: 3)).to be(false)
  end

  it "rejects a bad topic name or partition count before asking the cluster" do
    expect { described_class.create_topic("", partitions: 1) }.to raise_error(ArgumentError, /name/)
    expect { described_class.create_topic("t", partitions: 0) }.to raise_error(ArgumentError, /partitions/)
  end
end
