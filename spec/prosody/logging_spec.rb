# frozen_string_literal: true

RSpec.describe "Prosody.logger" do
  around do |example|
    previous = Prosody.logger
    example.run
  ensure
    Prosody.logger = previous
  end

  it "refuses something that is not a logger" do
    expect { Prosody.logger = Object.new }.to raise_error(ArgumentError, /logger/)
  end

  it "receives native log lines with progname prosody" do
    output = StringIO.new
    Prosody.logger = Logger.new(output, level: Logger::INFO)
    topic = unique_name("logging")
    client = mock_consumer(topic)
    client.subscribe(handler { |_context, _message| nil })
    wait_for(description: "the subscribe log line") { output.string.include?("subscribed") }
    expect(output.string).to match(/INFO -- prosody: subscribed/)
  end

  it "does not send native lines below the logger's level" do
    recorder = Class.new do
      attr_reader :lines

      def initialize
        @lines = Queue.new
      end

      def level
        Logger::ERROR
      end

      def add(severity, message = nil, progname = nil)
        @lines << [severity, message, progname]
      end
    end.new
    Prosody.logger = recorder
    client = mock_consumer(unique_name("logging"))
    client.subscribe(handler { |_context, _message| nil })
    # Log lines and results share the bridge's FIFO: lines logged before
    # unsubscribe answered have been delivered by the time it returns.
    client.unsubscribe
    expect(recorder.lines.size).to eq(0)
  end
end
