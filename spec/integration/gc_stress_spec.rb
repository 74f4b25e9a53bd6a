# frozen_string_literal: true

# Ruby objects crossing the native bridge (messages, contexts, completions,
# result queues, the processor) stay alive while native code holds them: a
# short send-and-consume run with GC.stress on (a full GC at every allocation
# opportunity) neither crashes nor loses messages.
RSpec.describe "GC stress" do
  it "sends and consumes 20 messages with GC.stress on" do
    topic = unique_name("gc-stress")
    client = mock_consumer(topic)
    seen = Queue.new
    client.subscribe(handler { |_context, message| seen << message.payload.fetch("n") })
    begin
      GC.stress = true
      20.times { |index| client.send_message(topic, "k#{index % 4}", { "n" => index, "pad" => "x" * index }) }
      wait_for(timeout: 120, interval: 0.05, description: "20 messages under GC.stress") { seen.size >= 20 }
    ensure
      GC.stress = false
    end
    expect(Array.new(seen.size) { seen.pop }).to match_array((0...20).to_a)
  end
end
