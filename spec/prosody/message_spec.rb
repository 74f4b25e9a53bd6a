# frozen_string_literal: true

RSpec.describe Prosody::Message do
  subject(:message) do
    described_class.new("invoices", 2, 41, "acct-1", Time.at(1_700_000_000), { "amount" => 5 }, { "origin" => "web" })
  end

  it "exposes the record's fields" do
    expect(message).to have_attributes(
      topic: "invoices", partition: 2, offset: 41, key: "acct-1",
      timestamp: Time.at(1_700_000_000), payload: { "amount" => 5 }, headers: { "origin" => "web" }
    )
  end

  it "is frozen, headers included" do
    expect(message).to be_frozen
    expect(message.headers).to be_frozen
  end

  it "accepts a missing timestamp" do
    expect(described_class.new("t", 0, 0, "k", nil, nil, {}).timestamp).to be_nil
  end

  it "builds its timestamp, to the nanosecond, from the nanoseconds the native side stores" do
    native = described_class.allocate
    native.instance_variable_set(:@timestamp, 1_700_000_000_123_456_789)
    expect(native.timestamp).to eq(Time.at(1_700_000_000, 123_456_789, :nsec))
    expect(native.timestamp.nsec).to eq(123_456_789)
  end

  it "converts to a Hash" do
    expect(message.to_h).to eq(
      topic: "invoices", partition: 2, offset: 41, key: "acct-1",
      timestamp: Time.at(1_700_000_000), payload: { "amount" => 5 }, headers: { "origin" => "web" }
    )
  end

  it "compares by value" do
    twin = described_class.new("invoices", 2, 41, "acct-1", Time.at(1_700_000_000), { "amount" => 5 },
                               { "origin" => "web" })
    expect(message).to eq(twin)
    expect(message.hash).to eq(twin.hash)
    expect(message).not_to eq(described_class.new("invoices", 2, 42, "acct-1", nil, nil, {}))
  end

  it "shows where it came from but not its payload" do
    expect(message.inspect).to include("invoices/2@41", '"acct-1"')
    expect(message.inspect).not_to include("amount")
  end
end
