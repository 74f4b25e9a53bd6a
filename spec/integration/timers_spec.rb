# frozen_string_literal: true

# A handler schedules timers for its key through its context; on_timer runs at
# or after each one's time, through the key's queue, and only timers still
# scheduled fire. Mock mode keeps timers in memory; with database_url they live
# in PostgreSQL and survive the consumer.
RSpec.describe "timers" do
  it "fires scheduled timers through on_timer and never the cleared ones" do
    topic = unique_name("timers")
    client = mock_consumer(topic)
    script = ProsodySpec::TimerScript.new
    client.subscribe(script)
    started = Time.now
    [
      ["fires", { "op" => "schedule", "in_ms" => 200 }],
      ["past", { "op" => "schedule", "in_ms" => -5_000 }],
      ["cleared", { "op" => "schedule", "in_ms" => 300 }],
      ["cleared", { "op" => "schedule", "in_ms" => 400 }],
      ["cleared", { "op" => "list" }],
      ["cleared", { "op" => "clear" }],
      ["replaced", { "op" => "schedule", "in_ms" => 300 }],
      ["replaced", { "op" => "replace", "in_ms" => 500 }],
      ["replaced", { "op" => "list" }]
    ].each { |key, payload| client.send_message(topic, key, payload) }

    wait_for(timeout: 20, description: "three timers fire") { script.fired.size >= 3 }
    sleep 0.8 # anything wrongly left scheduled would fire within this
    fired = drain(script.fired)
    expect(fired.map(&:first)).to contain_exactly("fires", "past", "replaced")
    fired.each { |(_, due, ran)| expect(ran).to be >= due }
    expect(fired.find { |(key)| key == "fires" }[1]).to be > started
    expect(script.listed["cleared"].size).to eq(2)
    expect(script.listed["cleared"]).to all(be_a(Time))
    expect(script.listed["replaced"].size).to eq(1)
    expect(drain(script.errors)).to be_empty
  end

  it "rejects a time that is not a Time with a clear error" do
    topic = unique_name("timers-bad")
    client = mock_consumer(topic)
    script = ProsodySpec::TimerScript.new
    client.subscribe(script)
    client.send_message(topic, "k", { "op" => "bad", "at" => "tomorrow" })
    wait_for(timeout: 20, description: "the bad call fails") { !script.errors.empty? }
    error = script.errors.pop
    expect(error).to be_a(Prosody::TimerError)
    expect(error.message).to include("Time", "String")
  end

  # A timer before 1970 used to reach on_timer with `time` nil, and one past
  # 64-bit milliseconds raised a RangeError that failed the handler call.
  it "keeps a timer before 1970 at its time and refuses one past 64-bit milliseconds" do
    topic = unique_name("timers-range")
    client = mock_consumer(topic)
    script = ProsodySpec::TimerScript.new
    client.subscribe(script)
    client.send_message(topic, "old", { "op" => "schedule_at", "at_s" => -1.5 })
    client.send_message(topic, "far", { "op" => "schedule_at", "at_s" => 2**62 })
    wait_for(timeout: 20, description: "the old timer fires and the far one fails") do
      !script.fired.empty? && !script.errors.empty?
    end
    key, due, = script.fired.pop
    expect([key, due]).to eq(["old", Time.at(-1.5)])
    error = script.errors.pop
    expect(error).to be_a(Prosody::TimerError)
    expect(error.message).to include("out of range", "64-bit")
  end

  it "keeps timers in PostgreSQL across consumers when database_url is set" do
    url = ENV.fetch("PROSODY_TEST_DATABASE_URL") do
      raise "PROSODY_TEST_DATABASE_URL is not set: run the specs through ./script/test"
    end
    topic = unique_name("timers-pg")
    group = unique_name("group")
    first = mock_consumer(topic, group_id: group, database_url: url)
    script = ProsodySpec::TimerScript.new
    first.subscribe(script)
    first.send_message(topic, "later", { "op" => "schedule", "in_ms" => 1_500 })
    first.send_message(topic, "later", { "op" => "list" })
    wait_for(timeout: 20, description: "scheduled") { script.listed.key?("later") }
    first.unsubscribe

    second = mock_consumer(topic, group_id: group, database_url: url)
    again = ProsodySpec::TimerScript.new
    second.subscribe(again)
    wait_for(timeout: 20, description: "the timer fires under the second consumer") { again.fired.size == 1 }
    # A second firing would come before a timer scheduled 500 ms after the first.
    second.send_message(topic, "sentinel", { "op" => "schedule", "in_ms" => 500 })
    wait_for(timeout: 20, description: "the later timer fires") { again.fired.size >= 2 }
    expect(drain(again.fired).map(&:first)).to eq(%w[later sentinel])
    expect(script.fired).to be_empty
  end
end
