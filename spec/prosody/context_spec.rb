# frozen_string_literal: true

require "async"

RSpec.describe Prosody::Context do
  let(:native) { ProsodySpec::FakeNativeContext.new }
  let(:context) { described_class.new(native) }

  it "is not cancelled at first" do
    expect(context.should_cancel?).to be(false)
  end

  it "is cancelled when the native side says so" do
    native.cancelled = true
    expect(context.should_cancel?).to be(true)
  end

  it "is cancelled once the processor cancels it" do
    context.cancel!
    expect(context.should_cancel?).to be(true)
  end

  it "returns from on_cancel at once when already cancelled" do
    native.cancelled = true
    expect(context.on_cancel).to be_nil
  end

  it "suspends on_cancel's fiber until cancelled, without blocking other fibers" do
    events = []
    Async do |task|
      waiter = task.async do
        context.on_cancel
        events << :released
      end
      task.async do
        events << :other_fiber_ran
        context.cancel!
      end
      waiter.wait
    end
    expect(events).to eq(%i[other_fiber_ran released])
  end
end
