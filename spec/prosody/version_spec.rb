# frozen_string_literal: true

RSpec.describe "Prosody::VERSION" do
  it "is the version Cargo builds" do
    cargo = File.read(File.expand_path("../../Cargo.toml", __dir__))
    expect(cargo).to include(%(version = "#{Prosody::VERSION}"))
  end
end
