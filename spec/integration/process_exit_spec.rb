# frozen_string_literal: true

require "open3"

# A process using Prosody must be able to end. Here a consumer's handlers keep
# failing, so Ruby and native log lines are written all the time to a stdout
# that is read slowly (log writes block, and handler fibers park holding the
# logger's lock); then the main thread returns without unsubscribing, or a
# handler calls `exit`. Ruby kills the bridge thread at exit. A bridge job used
# to swallow that kill when it landed inside the logger call, which kept the
# thread, and with it the process, alive forever.
RSpec.describe "Process exit while handlers fail and log" do
  fixture = File.expand_path("../fixtures/exit_while_handling.rb", __dir__)

  # Seconds a process may take to end once it said "ready".
  exit_deadline = 5

  # Runs the fixture; returns its exit status (nil if it had to be killed after
  # `exit_deadline`), its stderr, and then its threads (see kill_hung).
  define_method(:run_fixture) do |behaviour|
    Open3.popen3(RbConfig.ruby, fixture, behaviour) do |stdin, stdout, stderr, process|
      stdin.close
      slow_reader = Thread.new do
        loop do
          stdout.readpartial(1024)
          sleep(0.005) # about 200 KB/s
        end
      rescue IOError
        nil
      end
      ready = stderr.gets
      raise "the fixture ended before it got ready (status #{process.value.inspect})" unless ready

      ended = process.join(exit_deadline)
      threads = ended ? "" : kill_hung(process.pid)
      slow_reader.join
      [ended && process.value, ready + stderr.read, threads]
    end
  end

  # The native stack of every thread of a process that did not end, so a hang
  # that shows up once in CI says which thread held the process (gdb is
  # installed by script/setup).
  # Returns the dump, having killed the process.
  define_method(:kill_hung) do |pid|
    dump, = Open3.capture2e("gdb", "-p", pid.to_s, "-batch", "-ex", "thread apply all bt 30")
    "\nthreads of the process still alive:\n#{dump}"
  rescue SystemCallError => e
    "\n(no thread dump: #{e.message})"
  ensure
    Process.kill("KILL", pid)
  end

  # Runs the fixture `runs` times; each must end in time, without a Ruby [BUG], with `status`.
  define_method(:expect_runs) do |behaviour, runs:, status:, moment:|
    runs.times do |run|
      ended, errors, threads = run_fixture(behaviour)
      expect(ended).not_to be_nil, "run #{run + 1} was still alive #{exit_deadline}s after #{moment}#{threads}"
      expect(errors).not_to include("[BUG]")
      expect(ended.exitstatus).to eq(status)
    end
  end

  it "ends within #{exit_deadline}s when the main thread returns, 20 runs in a row" do
    expect_runs("failing", runs: 20, status: 0, moment: "its main thread returned")
  end

  it "stops the client and exits with the handler's status when a handler calls exit" do
    expect_runs("exit", runs: 3, status: 3, moment: "a handler called exit")
  end
end
