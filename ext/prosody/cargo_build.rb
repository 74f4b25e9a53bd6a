# frozen_string_literal: true

# Runs cargo for the Makefile extconf.rb writes, and shows cargo's output while it
# runs.
#
# Usage: ruby cargo_build.rb INSTALLER_PID -- CARGO_COMMAND...
#
# RubyGems captures everything `make` prints and shows it only if the build fails
# (with `gem install -V`, once the build is over), so the several-minute cargo
# build would look hung. Each line cargo prints goes to stdout (RubyGems keeps it
# in gem_make.out) and also, live, to the first of these that can be opened:
# - PROSODY_BUILD_OUTPUT, a path, if set (set it empty to show nothing live);
# - the stderr of INSTALLER_PID, the `gem install` (or Bundler) process, through
#   /proc on Linux, if that process is still an ancestor of this one; skipped when
#   that stderr is a regular file (`gem install 2>log`), whose writer would
#   overwrite what is appended behind its back;
# - /dev/tty.

require "English"

BANNER = "prosody: building the native extension with cargo (a release build of the Rust core and " \
         "librdkafka, about 6-7 CPU-minutes: 3-10 minutes). Progress:"

def open_live(path)
  io = File.open(path, "a")
  io.sync = true
  io
rescue SystemCallError
  nil
end

# Whether pid is an ancestor of this process (so it is still the installer that
# ran extconf.rb, not a process that got its pid since).
def ancestor?(pid)
  current = Process.ppid
  while current > 1
    return true if current == pid

    stat = File.read("/proc/#{current}/stat")
    # "pid (command) state ppid ...": the command may hold spaces and parentheses.
    current = Integer(stat[(stat.rindex(")") + 2)..].split.fetch(1))
  end
  false
rescue SystemCallError, ArgumentError, IndexError
  false
end

def installer_stderr(installer_pid)
  path = "/proc/#{installer_pid}/fd/2"
  path if installer_pid.positive? && ancestor?(installer_pid) && File.exist?(path) && !File.file?(path)
end

def live_output(installer_pid)
  if ENV.key?("PROSODY_BUILD_OUTPUT")
    requested = ENV.fetch("PROSODY_BUILD_OUTPUT")
    return requested.empty? ? nil : open_live(requested)
  end

  [installer_stderr(installer_pid), "/dev/tty"].compact.each do |path|
    io = open_live(path)
    return io if io
  end
  nil
end

# Writes to stdout and to the live output; a live output that stops accepting
# writes (its reader went away) is dropped, the build goes on.
class Tee
  def initialize(live)
    @live = live
  end

  def puts(line)
    $stdout.puts(line)
    $stdout.flush
    return unless @live

    begin
      @live.puts(line)
    rescue SystemCallError, IOError
      @live = nil
    end
  end
end

separator = ARGV.index("--")
abort "usage: ruby cargo_build.rb INSTALLER_PID -- CARGO_COMMAND..." unless separator == 1 && ARGV.size > 2

command = ARGV[(separator + 1)..]
out = Tee.new(live_output(Integer(ARGV.first, exception: false) || 0))
started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
out.puts(BANNER)
IO.popen(command, err: %i[child out]) do |cargo|
  cargo.each_line { |line| out.puts("  #{line.chomp}") }
end
status = $CHILD_STATUS
seconds = (Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).round
verdict = status.success? ? "built" : "cargo failed (#{status})"
out.puts(format("prosody: %<verdict>s in %<minutes>dm%<seconds>02ds",
                verdict:, minutes: seconds / 60, seconds: seconds % 60))
exit(status.success? ? 0 : 1)
