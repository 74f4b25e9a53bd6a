# frozen_string_literal: true

require "fileutils"
require "open3"
require "rbconfig"
require "timeout"
require "tmpdir"

# `gem build` + `gem install --local` into a temporary GEM_HOME, then the
# installed gem used from outside the repository. Slow (a full release build of
# the extension, several minutes), so it runs only with PROSODY_TEST_GEM=1:
# `script/test --gem`. PROSODY_GEM_TEST_TARGET_DIR reuses a cargo target dir
# between runs (the installed gem is the same; the build is faster).
RSpec.describe "the built gem", :gem_install do
  root = File.expand_path("..", __dir__)
  max_installed_bytes = 25 * 1024 * 1024
  install_deadline = 40 * 60

  # A clean environment: nothing from this repository or a Bundler setup, no
  # PROSODY_* build overrides, RubyGems' default paths (where Debian's
  # ruby-async is) plus the temporary GEM_HOME.
  def self.gem_environment(gem_home)
    cleared = ENV.each_key.select do |name|
      name.start_with?("PROSODY_", "BUNDLE", "GEM_", "RUBY") || name == "CARGO_TARGET_DIR"
    end
    env = cleared.to_h { |name| [name, nil] }
    env["GEM_HOME"] = gem_home
    reused_target = ENV.fetch("PROSODY_GEM_TEST_TARGET_DIR", "")
    env["CARGO_TARGET_DIR"] = reused_target unless reused_target.empty?
    env
  end

  # Runs a command with a deadline; returns [status, output (stdout and stderr), seconds].
  def self.run_command(env, command, chdir:, deadline:)
    started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    output = +""
    status = Open3.popen2e(env, *command, chdir:) do |stdin, out, waiter|
      stdin.close
      reader = Thread.new { out.each_line { |line| output << line } }
      begin
        Timeout.timeout(deadline) { waiter.value }
      rescue Timeout::Error
        Process.kill(:KILL, waiter.pid)
        waiter.value
        raise "#{command.join(" ")} did not finish within #{deadline} s; output:\n#{output}"
      ensure
        reader.join(10)
      end
    end
    [status, output, Process.clock_gettime(Process::CLOCK_MONOTONIC) - started]
  end

  # Run by the installed gem from a directory outside the repository: a mock
  # client sends one message and its consumer receives it.
  round_trip = <<~RUBY
    require "prosody"

    native = $LOADED_FEATURES.grep(%r{/prosody/prosody_native\\.[^/]+\\z})
    puts "gem dir: \#{Gem.loaded_specs.fetch("prosody").full_gem_path}"
    puts "native: \#{native.join(", ")}"

    received = Queue.new
    handler = Class.new(Prosody::EventHandler) do
      define_method(:on_message) { |_context, message| received << [message.key, message.payload] }
    end
    client = Prosody::Client.new(mock: true, group_id: "installed-gem", subscribed_topics: "installed",
                                 source_system: "installed-gem-sender")
    client.send_message("installed", "key-1", { "n" => 1 })
    client.subscribe(handler.new)
    waiter = Thread.new { received.pop }
    message = waiter.join(60)&.value or abort "no message received within 60 s"
    puts "received: \#{message.inspect}"
    client.unsubscribe
  RUBY

  before(:context) do
    @work = Dir.mktmpdir("prosody-gem-")
    @gem_home = File.join(@work, "gem-home")
    env = self.class.gem_environment(@gem_home)
    gem_file = File.join(@work, "prosody.gem")

    status, output, = self.class.run_command(env, ["gem", "build", "prosody.gemspec", "--output", gem_file],
                                             chdir: root, deadline: 120)
    raise "gem build failed:\n#{output}" unless status.success?

    # --local: no network (only the .gem file and installed gems, such as
    # Debian's ruby-async, are used). No -V: without it RubyGems prints nothing
    # of the build, so cargo's lines in the output come from cargo_build.rb.
    @install_status, @install_output, @install_seconds = self.class.run_command(
      env, ["gem", "install", "--local", "--no-document", gem_file], chdir: @work, deadline: install_deadline
    )
    @installed_bytes = Dir.glob("**/*", File::FNM_DOTMATCH, base: @gem_home)
                          .map { |path| File.join(@gem_home, path) }
                          .select { |path| File.file?(path) && !File.symlink?(path) }
                          .sum { |path| File.size(path) }
    installed = Dir.glob(File.join(@gem_home, "gems", "prosody-*"))
    @gem_dir = installed.first
    @native_copies = Dir.glob("**/*prosody_native.{so,bundle,dylib}", base: @gem_home)
    copies = @native_copies.map { |path| "#{path}: #{File.size(File.join(@gem_home, path))} bytes" }
    warn format("gem install took %<seconds>ds; installed size %<mb>.1f MB (%<copies>s)",
                seconds: @install_seconds, mb: @installed_bytes / 1024.0 / 1024, copies: copies.join(", "))
  end

  after(:context) { FileUtils.rm_rf(@work) if @work }

  it "installs with gem install --local" do
    expect(@install_status).to be_success, "gem install failed:\n#{@install_output}"
    expect(@gem_dir).not_to be_nil
  end

  it "shows cargo's progress while the extension builds" do
    expect(@install_output).to include("prosody: building the native extension with cargo")
    expect(@install_output).to match(/^\s+Compiling prosody-ruby /)
    expect(@install_output).to match(/^prosody: built in \d+m\d\ds$/)
  end

  it "installs one copy of the extension, in the gem's lib dir, and no build tree" do
    extension = "prosody_native.#{RbConfig::CONFIG["DLEXT"]}"
    expect(@native_copies).to eq(["gems/#{File.basename(@gem_dir)}/lib/prosody/#{extension}"])
    expect(Dir.exist?(File.join(@gem_dir, "ext", "prosody", "target"))).to be(false)
  end

  it "has an extension without debug info that keeps its symbols (for backtraces)" do
    skip "readelf checks an ELF library" unless RbConfig::CONFIG["DLEXT"] == "so"

    sections, status = Open3.capture2e("readelf", "--section-headers", "--wide",
                                       File.join(@gem_dir, "lib", "prosody", "prosody_native.so"))
    expect(status).to be_success, sections
    expect(sections).to include(".symtab")
    expect(sections).not_to include(".debug_info")
  end

  it "takes at most 25 MB installed" do
    expect(@installed_bytes).to be <= max_installed_bytes,
                                "installed size #{@installed_bytes} bytes; largest files:\n" +
                                Dir.glob("**/*", base: @gem_home).map { |path| File.join(@gem_home, path) }
                                   .select { |path| File.file?(path) }.max_by(5) { |path| File.size(path) }
                                   .map { |path| "#{File.size(path)} #{path}" }.join("\n")
  end

  it "loads from outside the repository and sends and receives a message on the mock cluster" do
    outside = File.join(@work, "app")
    FileUtils.mkdir_p(outside)
    env = self.class.gem_environment(@gem_home)
    status, output, = self.class.run_command(env, [RbConfig.ruby, "-e", round_trip], chdir: outside, deadline: 120)
    expect(status).to be_success, "exit #{status.inspect}; output:\n#{output}"
    expect(output).to include("gem dir: #{@gem_dir}\n", "native: #{@gem_dir}/lib/prosody/prosody_native.")
    expect(output).to include('received: ["key-1", {"n"=>1}]')
  end
end
