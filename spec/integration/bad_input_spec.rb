# frozen_string_literal: true

# Bad input is refused with a clear Prosody error and never breaks the client:
# a payload that is not JSON, a nil key and invalid options raise, and the same
# client goes on sending and consuming afterwards.
RSpec.describe "bad input" do
  let(:topic) { unique_name("bad-input") }
  let(:client) { mock_consumer(topic) }

  it "refuses a payload that is not JSON and keeps working" do
    seen = Queue.new
    client.subscribe(handler { |_context, message| seen << message.payload })
    expect { client.send_message(topic, "k", Object.new) }
      .to raise_error(Prosody::InvalidMessageError, /Object.*not a JSON value/)
    expect { client.send_message(topic, "k", { "deep" => [Float::INFINITY] }) }
      .to raise_error(Prosody::InvalidMessageError, /Infinity/)
    client.send_message(topic, "k", { "ok" => true })
    expect(seen.pop).to eq("ok" => true)
  end

  it "refuses a nil key with a message saying so" do
    expect { client.send_message(topic, nil, { "a" => 1 }) }
      .to raise_error(Prosody::InvalidMessageError, "key must be a non-empty String, got nil")
    expect(client.send_message(topic, "k", { "a" => 1 })).to be_nil
  end

  it "refuses invalid headers" do
    expect { client.send_message(topic, "k", {}, headers: { "n" => 1 }) }
      .to raise_error(Prosody::InvalidMessageError, /header `n`/)
  end

  {
    { bogus_option: true } => "bogus_option",
    { max_concurrency: 0 } => "max_concurrency",
    { commit_interval: "soon" } => "commit_interval"
  }.each do |options, name|
    it "raises a ConfigurationError naming `#{name}` for #{options.inspect}" do
      expect { Prosody::Client.new(mock: true, group_id: "g", subscribed_topics: topic, **options) }
        .to raise_error(Prosody::ConfigurationError) { |error| expect(error.message).to include("`#{name}`") }
    end
  end
end
