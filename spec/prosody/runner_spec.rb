# frozen_string_literal: true

require "prosody/runner"
require "tmpdir"

# In-process runs of the runner; signals and exit statuses of the real
# executable are covered by spec/integration/runner_spec.rb.
RSpec.describe Prosody::Runner do
  let(:dir) { Dir.mktmpdir("prosody-runner") }
  let(:out) { StringIO.new }

  after { FileUtils.rm_rf(dir) }

  # Writes an application file and returns its path.
  def app_file(source = "# nothing to set up\n", name: "app.rb")
    File.join(dir, name).tap { |path| File.write(path, source) }
  end

  # Runs the runner with `argv`; returns its exit status and what it logged.
  def run_runner(*argv, env: {})
    status = nil
    logs = capture_logs { status = described_class.new(argv, env:, out:).run }
    [status, logs.string]
  end

  it "prints the usage for --help and the version for --version" do
    expect(run_runner("--help").first).to eq(0)
    expect(out.string).to include("Usage: prosody (--require FILE | --rails) --handler CLASS")
    expect(run_runner("--version").first).to eq(0)
    expect(out.string).to include("prosody #{Prosody::VERSION}")
  end

  {
    [] => "nothing to load",
    ["--require", "APP"] => "no handler",
    ["--require", "APP", "--handler", "ProsodySpec::NoSuchHandler"] => "`ProsodySpec::NoSuchHandler` is not defined",
    ["--require", "APP", "--handler", "ProsodySpec::FakeCompletion"] => "must be a subclass of Prosody::EventHandler",
    ["--require", "APP", "--handler", "ProsodySpec::BlockHandler", "--mode", "fastest"] => "invalid option `mode`",
    ["--unknown"] => "--unknown"
  }.each do |argv, message|
    it "exits 2 and says #{message.inspect} for #{argv.join(" ").inspect}" do
      status, logs = run_runner(*argv.map { |arg| arg == "APP" ? app_file : arg })
      expect(status).to eq(2)
      expect(logs).to include(message)
    end
  end

  it "exits 1 when the application fails to load" do
    status, logs = run_runner("--require", app_file("raise 'no database'\n", name: "broken.rb"),
                              "--handler", "ProsodySpec::BlockHandler")
    expect(status).to eq(1)
    expect(logs).to include("RuntimeError: no database")
  end

  it "subscribes the handler, and on #stop unsubscribes and returns 0" do
    topic = unique_name("runner")
    Prosody::MockCluster.create_topic(topic)
    seen = Queue.new
    stub_const("ProsodySpec::RunnerHandler", Class.new(Prosody::EventHandler) do
      define_method(:on_message) { |_context, message| seen << message.payload }
    end)
    runner = described_class.new(
      ["--require", app_file, "--handler", "ProsodySpec::RunnerHandler", "--mock", "--group", unique_name("group"),
       "--topics", topic, "--source-system", "runner-spec", "--probe-port", "none"],
      env: {}, out:
    )
    logs = capture_logs do |output|
      thread = Thread.new { runner.run }
      wait_for(description: "the runner to subscribe") { output.string.include?("running ProsodySpec::RunnerHandler") }
      mock_client.send_message(topic, "k", "hello")
      expect(next_item(seen)).to eq("hello")
      runner.stop
      expect(thread.value).to eq(0)
    end
    expect(logs.string).to include("stopping: waiting for", "stopped cleanly")
  end
end
