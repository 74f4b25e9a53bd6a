# frozen_string_literal: true

require "json"
require "open3"
require "rbconfig"

# End-to-end traces from Ruby: a child process with OTEL_EXPORTER_OTLP_ENDPOINT
# set sends a message from Ruby, handles it in a Ruby handler that sends a
# reply, and exits; the spans it exports reach an OTLP/HTTP receiver here.
RSpec.describe "traces from Ruby" do
  traceparent = /\A00-(?<trace>\h{32})-(?<span>\h{16})-\h{2}\z/
  let(:traceparent) { traceparent }

  def run_traced(receiver, extra_env = {})
    source = unique_name("traced")
    replies = unique_name("traced-replies")
    env = { "OTEL_EXPORTER_OTLP_ENDPOINT" => receiver.endpoint, "OTEL_SERVICE_NAME" => "prosody-ruby-spec",
            "TOPIC" => source, "REPLIES" => replies }.merge(extra_env)
    [source, replies, run_fixture(env)]
  end

  # Runs the fixture with a deadline; returns what its handler saw.
  def run_fixture(env)
    lib = File.expand_path("../../lib", __dir__)
    fixture = File.expand_path("../fixtures/traced_round_trip.rb", __dir__)
    Open3.popen3(env, RbConfig.ruby, "-I", lib, fixture) do |stdin, stdout, stderr, child|
      stdin.close
      finish(child, stderr)
      seen = JSON.parse(stdout.read.lines.last)
      expect(seen["error"]).to be_nil
      seen
    end
  end

  def finish(child, stderr)
    unless child.join(60)
      Process.kill(:KILL, child.pid)
      raise "the traced child did not finish within 60 s: #{stderr.read}"
    end
    expect(child.value).to be_success, -> { stderr.read }
  end

  # Waits until the receiver has the spans named `names`; returns them by name.
  def exported(receiver, names)
    spans = exported_all(receiver, names)
    spans.transform_values(&:first)
  end

  # Waits until the receiver has `names` (a name twice: two such spans); returns each name's spans.
  def exported_all(receiver, names)
    spans = Hash.new { |hash, name| hash[name] = [] }
    wait_for(timeout: 20, description: "spans #{names.join(", ")}") do
      receiver.spans.each { |span| spans[span.name] << span }
      names.tally.all? { |name, count| spans[name].size >= count }
    end
    spans
  end

  let(:receiver) { ProsodySpec::OtlpReceiver.new }

  after { receiver.close }

  it "continues a Ruby send's trace through the Ruby handler into the handler's own send" do
    source, replies, seen = run_traced(receiver)
    spans = exported(receiver, ["#{source} publish", "#{source} process", "handler", "#{replies} publish"])
    send, process, attempt, reply = spans.values_at("#{source} publish", "#{source} process", "handler",
                                                    "#{replies} publish")

    expect(send).to have_attributes(kind: :producer, parent_span_id: "")
    expect(process).to have_attributes(kind: :consumer, parent_span_id: send.span_id, trace_id: send.trace_id)
    expect(attempt).to have_attributes(parent_span_id: process.span_id, trace_id: send.trace_id)
    expect(reply).to have_attributes(kind: :producer, parent_span_id: attempt.span_id, trace_id: send.trace_id)
    expect(seen["trace_context"]).to match(traceparent)
    expect(seen["trace_context"][traceparent, :span]).to eq(attempt.span_id)
    expect(seen["trace_context"][traceparent, :trace]).to eq(send.trace_id)
    expect(seen["current"]).to eq(seen["trace_context"])
  end

  it "runs the handler inside the extracted context when the opentelemetry-api gem is loaded (stand-in)" do
    source, replies, seen = run_traced(receiver, "OTEL_STAND_IN" => "1")
    spans = exported(receiver, ["handler", "#{replies} publish"])
    attempt, reply = spans.values_at("handler", "#{replies} publish")
    user_span = seen["user_span"][traceparent, :span]

    expect(seen["open_telemetry_current"]).to eq(seen["trace_context"])
    expect(seen["trace_context"][traceparent, :span]).to eq(attempt.span_id)
    expect(reply.parent_span_id).to eq(user_span)
    expect(reply.trace_id).to eq(attempt.trace_id)
    expect(source).not_to eq(replies)
  end

  it "links a retried attempt's span to the first attempt's" do
    source, _replies, = run_traced(receiver, "FAIL_FIRST" => "1")
    spans = exported_all(receiver, ["#{source} process", "handler", "handler"])
    first, retried = spans["handler"].sort_by { |span| span.links.size }

    expect(retried.links).to eq([first.span_id])
    expect([first.parent_span_id, retried.parent_span_id]).to all(eq(spans["#{source} process"].first.span_id))
  end

  it "traces a deferred retry as a new consumer span of the same trace" do
    source, _replies, seen = run_traced(receiver, "FAIL_FIRST" => "1", "DEFER" => "1")
    spans = exported_all(receiver, ["#{source} publish", "#{source} process", "#{source} process", "handler",
                                    "handler"])
    send = spans["#{source} publish"].first
    processes = spans["#{source} process"]

    expect(processes.map(&:parent_span_id)).to all(eq(send.span_id))
    expect(spans["handler"].map(&:parent_span_id)).to match_array(processes.map(&:span_id))
    expect(seen["trace_context"][traceparent, :trace]).to eq(send.trace_id)
  end

  it "exports from a forked child (a Puma worker) whose parent had started tracing" do
    source, replies, seen = run_traced(receiver, "FORK" => "1")
    spans = exported(receiver, ["#{source} publish", "#{source} process", "handler", "#{replies} publish"])

    expect(spans["#{source} process"].parent_span_id).to eq(spans["#{source} publish"].span_id)
    expect(spans["#{replies} publish"].parent_span_id).to eq(spans["handler"].span_id)
    expect(seen["trace_context"][traceparent, :span]).to eq(spans["handler"].span_id)
  end
end
