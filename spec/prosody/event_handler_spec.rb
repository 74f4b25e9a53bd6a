# frozen_string_literal: true

RSpec.describe Prosody::EventHandler do
  it "asks subclasses to define on_message" do
    expect { described_class.new.on_message(nil, nil) }.to raise_error(NotImplementedError, /on_message/)
  end

  it "asks subclasses that use timers to define on_timer" do
    expect { described_class.new.on_timer(nil, nil) }.to raise_error(NotImplementedError, /on_timer/)
  end
end
