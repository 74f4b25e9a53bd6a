# frozen_string_literal: true

require "io/wait"
require "prosody"
require "prosody/cli"

module Prosody
  # What `exe/prosody` runs: loads an application, subscribes one handler and
  # serves until told to stop.
  #
  #   prosody --require ./app.rb --handler InvoiceHandler --group billing --topics invoices
  #   prosody --rails --handler InvoiceHandler   # in a Rails app's directory
  #
  # The client it subscribes is {Prosody.client}, built from
  # {Prosody.client_options} (in a Rails app: config/prosody.yml, see
  # {Railtie}) with the command-line options laid over them, so handlers can
  # send with `Prosody.client` through the same connections.
  #
  # Signals:
  # - TERM or INT starts a graceful shutdown: {Client#unsubscribe} stops
  #   consuming, lets in-flight handlers finish (cancelling those still running
  #   near the end of shutdown_timeout), commits and leaves the group. The exit
  #   status is 0 after a clean stop.
  # - A second TERM or INT during the shutdown exits at once with status
  #   128 + the signal number, without committing what is in flight (those
  #   messages are handled again by the next owner of their partitions). One
  #   arriving within a second of the first is taken for a duplicate delivery
  #   (a wrapper forwarding the signal that the terminal also sent to the whole
  #   process group) and ignored.
  # - TSTP (Ctrl-Z) is logged and ignored: a stopped process would miss its
  #   group heartbeats and lose its partitions in a rebalance, and there is
  #   nothing to gain from pausing; stop it with TERM instead.
  #
  # Signal handlers only write the signal's name to a pipe; the main thread
  # reads the pipe and does the work, outside the trap context.
  #
  # Exit statuses: 0 clean stop (or --help / --version), 1 the application or
  # the client failed, 2 a usage or configuration error, 128 + n forced stop.
  class Runner
    # Signals that start a graceful shutdown (and, the second time, force it).
    SHUTDOWN_SIGNALS = %w[TERM INT].freeze
    # Signals that are logged and otherwise ignored.
    IGNORED_SIGNALS = %w[TSTP].freeze

    # What `--rails` requires, relative to the current directory.
    RAILS_ENVIRONMENT = "config/environment.rb"

    # A repeated shutdown signal within this many seconds is a duplicate, not a request to force exit.
    DUPLICATE_WINDOW = 1.0
    private_constant :DUPLICATE_WINDOW

    # Seconds between progress lines while a shutdown waits for handlers.
    PROGRESS_INTERVAL = 5
    private_constant :PROGRESS_INTERVAL

    # Written to the pipe by the thread that unsubscribes, when it is done.
    STOPPED = "stopped"
    private_constant :STOPPED

    # @param argv [Array<String>] command-line arguments (see {CLI})
    # @param env [Hash{String=>String}] for the runner's own PROSODY_* fallbacks
    # @param out [IO] where --help and --version print
    # @return [Integer] the exit status
    def self.run(argv = ARGV, env: ENV, out: $stdout)
      new(argv, env:, out:).run
    end

    # @param argv [Array<String>]
    # @param env [Hash{String=>String}]
    # @param out [IO]
    def initialize(argv, env: ENV, out: $stdout)
      @argv = argv
      @env = env
      @out = out
      @reader = nil
      @writer = nil
    end

    # Runs until stopped by a signal (or {#stop}).
    #
    # @return [Integer] the exit status
    def run
      cli = CLI.new(@argv, env: @env)
      return print_and_succeed(cli.usage) if cli.help?
      return print_and_succeed("prosody #{VERSION}") if cli.version?

      Prosody.log_format = cli.log_format if cli.log_format
      Prosody.logger.level = cli.log_level
      Prosody.logger = Prosody.logger # passes the level on to the native side
      serve(cli)
    rescue ConfigurationError => e
      Prosody.log(Logger::ERROR, "prosody: #{e.message}")
      2
    end

    # Asks a running {#run} to shut down gracefully, as TERM would. Safe from
    # any thread.
    #
    # @return [nil]
    def stop
      notify("TERM")
      nil
    end

    private

    def print_and_succeed(text)
      @out.puts(text)
      0
    end

    # Signals are trapped before the application loads, so a TERM while it boots
    # (a Rails app takes seconds) ends the run cleanly instead of killing it.
    def serve(cli)
      client = nil
      with_signal_pipe do
        load_application(cli)
        handler = build_handler(cli.handler_name)
        client = application_client(cli.client_options)
        stopped_while_booting || run_client(client, handler)
      end
    rescue ConfigurationError
      raise
    rescue StandardError, ScriptError => e
      Prosody.log(Logger::ERROR, "prosody: #{e.class}: #{e.message}#{" (#{e.backtrace.first})" if e.backtrace}")
      1
    ensure
      Prosody.reset_client! if client
    end

    def load_application(cli)
      requires = cli.requires
      rails = cli.rails? || (requires.empty? && File.file?(RAILS_ENVIRONMENT))
      if requires.empty? && !rails
        raise ConfigurationError, "nothing to load: pass --require FILE or --rails (or set PROSODY_REQUIRE)"
      end

      boot_rails if rails
      require_all(requires)
    end

    def require_all(requires)
      requires.each do |path|
        file = File.expand_path(path)
        require(File.file?(file) || File.file?("#{file}.rb") ? file : path)
      end
    end

    def boot_rails
      environment = File.expand_path(RAILS_ENVIRONMENT)
      unless File.file?(environment)
        raise ConfigurationError, "--rails: no #{RAILS_ENVIRONMENT} in #{Dir.pwd}; run prosody from the app's directory"
      end

      # Prosody was loaded before Rails: add the Railtie now, before the app's
      # config/application.rb configures it.
      require "rails"
      require "prosody/railtie"
      require environment
      Prosody.log(Logger::INFO, "prosody: booted the Rails app #{::Rails.application.class.name} (#{::Rails.env})")
    end

    # {Prosody.client}, with the command-line options laid over {Prosody.client_options}.
    def application_client(options)
      Prosody.client_options = Prosody.client_options.merge(**options) unless options.empty?
      Prosody.client
    end

    def build_handler(name)
      raise ConfigurationError, "no handler: pass --handler CLASS (or set PROSODY_HANDLER)" if name.nil? || name.empty?

      klass = begin
        Object.const_get(name)
      rescue NameError
        raise ConfigurationError, "handler class `#{name}` is not defined by the required files"
      end
      unless klass.is_a?(Class) && klass < EventHandler
        raise ConfigurationError, "handler `#{name}` must be a subclass of Prosody::EventHandler"
      end

      klass.new
    end

    # 0 when TERM or INT arrived before subscribing (nothing to stop), else nil.
    def stopped_while_booting
      while (signal = next_notice(timeout: 0))
        next unless SHUTDOWN_SIGNALS.include?(signal)

        Prosody.log(Logger::INFO, "prosody: SIG#{signal} while starting; exiting before subscribing")
        return 0
      end
      nil
    end

    def run_client(client, handler)
      # A handler calling `exit` stops the runner as TERM would.
      client.on_handler_exit { stop }
      client.subscribe(handler)
      Prosody.log(Logger::INFO, "prosody: running #{handler.class.name} (pid #{Process.pid}, " \
                                "source_system #{client.source_system}); TERM or INT stops it")
      wait_for_shutdown_signal
      shut_down(client)
    end

    # Blocks until TERM or INT.
    def wait_for_shutdown_signal
      loop do
        signal = next_notice
        return if SHUTDOWN_SIGNALS.include?(signal)

        Prosody.log(Logger::INFO, "prosody: SIG#{signal} ignored (use TERM or INT to stop)")
      end
    end

    def shut_down(client)
      started = monotonic
      Prosody.log(Logger::INFO, "prosody: stopping: #{waiting_on(client)}")
      stopper = Thread.new { unsubscribe(client) }
      wait_for_unsubscribe(client, started)
      error = stopper.value
      return report_failed_stop(error) if error

      Prosody.log(Logger::INFO, format("prosody: stopped cleanly in %.1fs: group left",
                                       monotonic - started))
      0
    end

    # Runs on its own thread so the main thread keeps reading signals.
    def unsubscribe(client)
      client.unsubscribe
      nil
    rescue StandardError => e
      e
    ensure
      notify(STOPPED)
    end

    def wait_for_unsubscribe(client, started)
      loop do
        notice = next_notice(timeout: PROGRESS_INTERVAL)
        case notice
        when STOPPED then return
        when nil then Prosody.log(Logger::INFO, "prosody: still stopping: #{waiting_on(client)}")
        when *SHUTDOWN_SIGNALS then repeated_signal(notice, started)
        else Prosody.log(Logger::INFO, "prosody: SIG#{notice} ignored while stopping")
        end
      end
    end

    def repeated_signal(signal, started)
      force_exit(signal) if monotonic - started >= DUPLICATE_WINDOW

      Prosody.log(Logger::INFO, "prosody: SIG#{signal} repeated within #{DUPLICATE_WINDOW}s, taken for a duplicate; " \
                                "send it again to force exit")
    end

    def waiting_on(client)
      unfinished = client.partition_stats.sum { |stats| stats[:buffered] }
      shutdown_timeout = client.config[:shutdown_timeout]
      "waiting for #{unfinished} in-flight message(s) on #{client.assigned_partitions} partition(s) " \
        "(within #{shutdown_timeout ? "#{shutdown_timeout}s" : "shutdown_timeout"}); " \
        "TERM or INT again forces exit"
    end

    def report_failed_stop(error)
      Prosody.log(Logger::ERROR, "prosody: unsubscribe failed: #{error.class}: #{error.message}")
      1
    end

    def force_exit(signal)
      status = 128 + Signal.list.fetch(signal)
      Prosody.log(Logger::WARN, "prosody: SIG#{signal} again; exiting now with status #{status} without finishing")
      $stdout.flush
      $stderr.flush
      exit!(status)
    end

    def with_signal_pipe
      @reader, @writer = IO.pipe
      previous = (SHUTDOWN_SIGNALS + IGNORED_SIGNALS).to_h { |signal| [signal, Signal.trap(signal) { notify(signal) }] }
      yield
    ensure
      previous&.each { |signal, handler| Signal.trap(signal, handler || "DEFAULT") }
      [@reader, @writer].each { |io| io&.close }
    end

    # The only thing done in trap context: never blocks, never locks.
    def notify(notice)
      @writer&.write_nonblock("#{notice}\n", exception: false)
    rescue IOError
      nil # the pipe was closed: the run is over
    end

    # The next signal name or STOPPED from the pipe; nil after `timeout` seconds.
    def next_notice(timeout: nil)
      return nil unless @reader.wait_readable(timeout)

      @reader.gets&.chomp
    end

    def monotonic
      Process.clock_gettime(Process::CLOCK_MONOTONIC)
    end
  end
end
