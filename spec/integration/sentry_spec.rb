# frozen_string_literal: true

require "json"
require "open3"
require "rbconfig"

# With sentry-ruby loaded (Debian ruby-sentry-ruby) and initialised, a message
# skipped after its retries reaches Sentry through sentry-ruby's own HTTP
# transport, tagged so it can be found; the failed attempts before it ride
# along as breadcrumbs. The DSN points at a local HTTP server standing in for
# Sentry.
RSpec.describe "error reporting to Sentry" do
  # The first item of type "event" in the envelopes received.
  def captured_event(bodies)
    loop do
      lines = next_item(bodies, timeout: 30, description: "an envelope from sentry-ruby").lines
      lines.each_cons(2) do |header, item|
        return JSON.parse(item) if JSON.parse(header)["type"] == "event"
      rescue JSON::ParserError
        next
      end
    end
  end

  it "captures a message skipped after failing, with its tags and the failed attempts as breadcrumbs" do
    sentry = ProsodySpec::HttpReceiver.new
    topic = unique_name("sentry")
    env = { "SENTRY_DSN" => "http://public@127.0.0.1:#{sentry.port}/42", "TOPIC" => topic }
    lib = File.expand_path("../../lib", __dir__)
    fixture = File.expand_path("../fixtures/sentry_capture.rb", __dir__)
    Open3.popen3(env, RbConfig.ruby, "-I", lib, fixture) do |stdin, stdout, stderr, worker|
      expect(stdout.gets).to eq("subscribed\n"), -> { stderr.read.to_s }
      event = captured_event(sentry.bodies)
      stdin.close
      expect(worker.value).to be_success, -> { stderr.read }

      expect(event["tags"]).to include(
        "prosody.topic" => topic, "prosody.partition" => match(/\A[0-3]\z/), "prosody.offset" => "0",
        "prosody.key" => "acct-9",
        "prosody.group_id" => "billing", "prosody.mode" => "best_effort", "prosody.error_class" => "ArgumentError"
      )
      expect(event["message"]).to include("message.skipped").and include("card declined")
      crumbs = event.dig("breadcrumbs", "values").select { |crumb| crumb["category"] == "prosody" }
      expect(crumbs.size).to eq(2)
      expect(crumbs.first["message"]).to include("message.failed")
    end
  ensure
    sentry&.close
  end
end
