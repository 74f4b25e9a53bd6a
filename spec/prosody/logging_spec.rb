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

  # Only what `Prosody.logger=` asks for: `add` and `level`.
  let(:recorder) do
    Class.new do
      attr_reader :lines

      def initialize(level)
        @level = level
        @lines = Queue.new
      end

      attr_reader :level

      def add(severity, message = nil, progname = nil)
        @lines << [severity, message, progname]
      end
    end
  end

  it "does not send native lines below the logger's level" do
    logger = recorder.new(Logger::ERROR)
    Prosody.logger = logger
    client = mock_consumer(unique_name("logging"))
    client.subscribe(handler { |_context, _message| nil })
    # Log lines and results share the bridge's FIFO: lines logged before
    # unsubscribe answered have been delivered by the time it returns.
    client.unsubscribe
    expect(logger.lines.size).to eq(0)
  end

  # Prosody's own Ruby lines used `#error` and the like, which such a logger
  # lacks: the NoMethodError ended the handler's worker instead.
  it "writes Prosody's own lines (a handler's failure) through #add alone" do
    logger = recorder.new(Logger::INFO)
    Prosody.logger = logger
    topic = unique_name("logging")
    client = mock_consumer(topic, retry_base: 0.005, defer_base: 0.005)
    client.subscribe(handler { |_context, _message| raise "boom" })
    client.send_message(topic, "k", { "n" => 1 })
    failure = nil
    until failure
      severity, message, = next_item(logger.lines, description: "the handler's failure line at ERROR")
      failure = message if severity == Logger::ERROR && message.to_s.include?("RuntimeError: boom")
    end
    expect(failure).to include("handler failed for topic=#{topic}")
  end
end
