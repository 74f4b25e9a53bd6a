# frozen_string_literal: true

require "open3"
require "timeout"

# README's Ruby quick start, run as written in a child process: it must handle
# the message it sent (a quick start whose own message is skipped by the loop
# guard would wait forever and be killed at the deadline).
RSpec.describe "README Ruby quick start" do
  let(:readme) { File.read(File.expand_path("../../README.md", __dir__)) }
  let(:code) do
    section = readme.split("## Ruby quick start", 2).fetch(1)
    section[/```ruby\n(.*?)```/m, 1] or raise "no ```ruby block under \"## Ruby quick start\" in README.md"
  end

  it "runs as written and handles the message it sent" do
    lib = File.expand_path("../../lib", __dir__)
    env = ENV.to_h.select { |name, _| name.start_with?("PROSODY_") }.transform_values { nil }
    output = +""
    status = nil
    Open3.popen2e(env, RbConfig.ruby, "-I#{lib}", "-e", code) do |stdin, out, waiter|
      stdin.close
      reader = Thread.new { out.each_line { |line| output << line } }
      begin
        Timeout.timeout(60) { status = waiter.value }
      rescue Timeout::Error
        Process.kill(:KILL, waiter.pid)
        waiter.value
        raise "the quick start did not finish within 60 s; output:\n#{output}"
      ensure
        reader.join(5)
      end
    end
    expect(status).to be_success, "exit #{status.inspect}; output:\n#{output}"
    expect(output).to include("customer-42: order 7", "handled order 7")
  end
end
