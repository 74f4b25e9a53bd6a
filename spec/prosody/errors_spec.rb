# frozen_string_literal: true

RSpec.describe "Prosody errors" do
  names = %w[
    ConfigurationError InvalidMessageError SendError SendTimeoutError KafkaError StateError
    MockClusterError PermanentError TransientError CancelledError BridgeError
  ]

  it "roots every error at Prosody::Error, a StandardError" do
    expect(Prosody::Error.superclass).to eq(StandardError)
    names.each do |name|
      expect(Prosody.const_get(name)).to be < Prosody::Error
    end
  end

  it "makes a send timeout a kind of send error" do
    expect(Prosody::SendTimeoutError).to be < Prosody::SendError
  end

  it "documents when each error is raised" do
    source = File.read(File.expand_path("../../lib/prosody/errors.rb", __dir__))
    (["Error"] + names).each do |name|
      expect(source).to match(/#\s.+\n\s*class #{name} < /), "#{name} has no comment saying when it is raised"
    end
  end
end
