# frozen_string_literal: true

require "prosody/testing"

# Prosody.client: the app-wide client, built lazily from Prosody.client_options
# once per process (the fork case is covered by spec/integration/rails_spec.rb,
# Puma cluster mode).
RSpec.describe "Prosody.client" do
  around do |example|
    previous = Prosody.client_options
    Prosody.reset_client!
    example.run
  ensure
    Prosody.reset_client!
    Prosody.client_options = previous
  end

  it "is built once from client_options and shared by every thread" do
    topic = unique_name("app-client")
    Prosody::MockCluster.create_topic(topic)
    Prosody.client_options = { mock: true, source_system: "app-client-spec", probe_port: false }
    clients = Array.new(4) { Thread.new { Prosody.client } }.map(&:value)
    expect(clients.uniq.size).to eq(1)
    expect(clients.first.source_system).to eq("app-client-spec")
    expect { Prosody.client.send_message(topic, "k", { "n" => 1 }) }.to have_sent_message(topic, key: "k")
  end

  it "checks the options when they are set, and refuses them once the client exists" do
    expect { Prosody.client_options = { group: "x" } }
      .to raise_error(Prosody::ConfigurationError, /unknown option `group`/)
    Prosody.client_options = Prosody::Configuration.new(mock: true, source_system: "app-client-spec")
    Prosody.client
    expect { Prosody.client_options = { mock: true } }.to raise_error(Prosody::StateError, /already created/)
  end

  it "builds a new client after reset_client!" do
    Prosody.client_options = { mock: true, source_system: "first" }
    first = Prosody.client
    Prosody.reset_client!
    Prosody.client_options = { mock: true, source_system: "second" }
    expect(Prosody.client).not_to equal(first)
    expect(Prosody.client.source_system).to eq("second")
  end
end
