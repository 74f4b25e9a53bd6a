# frozen_string_literal: true

require "optparse"

module Prosody
  # The `prosody` command line, parsed: what to load, which handler to run and
  # the client options. Used by {Runner}; has no side effects of its own.
  #
  # Every client option of {Configuration} is a flag named after it, with
  # dashes or underscores (`--group-id billing`, `--max_retries 5`), plus the
  # short forms `--group`, `--topics` and `--brokers`. A client option left out
  # falls back to its `PROSODY_<NAME>` environment variable (applied natively),
  # and the runner's own flags fall back to `PROSODY_REQUIRE` (comma
  # separated), `PROSODY_HANDLER`, `PROSODY_LOG_LEVEL` and `PROSODY_RAILS`
  # (`true` or `1` for `--rails`).
  #
  # @example
  #   cli = Prosody::CLI.new(%w[--require ./app.rb --handler InvoiceHandler --group billing --topics invoices])
  #   cli.handler_name   # => "InvoiceHandler"
  #   cli.client_options # => { group_id: "billing", subscribed_topics: "invoices" }
  class CLI
    # Short flag names => the option they set.
    ALIASES = { group: :group_id, topics: :subscribed_topics, brokers: :bootstrap_servers }.freeze

    # Help text for the kinds of client option.
    KIND_HINTS = {
      list: "comma separated", duration: "seconds, or e.g. 250ms, 30s, 5m", count: "at least 1",
      whole: "0 or more", port: "port, 0 (any free port) or none", fraction: "above 0, at most 1"
    }.freeze
    private_constant :KIND_HINTS

    # Help text for the on/off options (`--[no-]name`).
    FLAG_HELP = {
      mock: "Use the in-process mock Kafka cluster",
      defer: "Defer messages that fail transiently (:pipeline)",
      monopolization_enabled: "Refuse, for a while, keys that hog handler time (:pipeline)",
      telemetry_enabled: "Send lifecycle events to the telemetry topic"
    }.freeze
    private_constant :FLAG_HELP

    # Accepted by --log-level.
    LOG_LEVELS = %w[debug info warn error fatal].freeze

    # @return [Array<String>] files (or library names) to require, in order
    attr_reader :requires
    # @return [String, nil] the constant name of the handler class
    attr_reader :handler_name
    # @return [Hash{Symbol=>Object}] options for {Client.new} given on the command line (Strings, a Hash for kafka)
    attr_reader :client_options
    # @return [String] one of {LOG_LEVELS}
    attr_reader :log_level
    # @return [String, nil] `text` or `json` when given (else {Prosody.log_format}'s default)
    attr_reader :log_format

    # Values of PROSODY_RAILS that mean `--rails`.
    TRUE_VALUES = %w[1 true yes].freeze
    private_constant :TRUE_VALUES

    # @param argv [Array<String>]
    # @param env [Hash{String=>String}]
    # @raise [ConfigurationError] for an unknown flag, a missing value or a stray argument
    def initialize(argv, env: ENV)
      @requires = env.fetch("PROSODY_REQUIRE", "").split(",").map(&:strip).reject(&:empty?)
      @requires_given = false
      @handler_name = env["PROSODY_HANDLER"]
      @log_level = env.fetch("PROSODY_LOG_LEVEL", "info").downcase
      @log_format = nil
      @rails = TRUE_VALUES.include?(env.fetch("PROSODY_RAILS", "").downcase)
      @client_options = {}
      @help = false
      @version = false
      parse(argv)
    end

    # @return [Boolean] whether --help was given
    def help?
      @help
    end

    # @return [Boolean] whether --version was given
    def version?
      @version
    end

    # @return [Boolean] whether --rails was given: boot the Rails app of the
    #   current directory (config/environment.rb) before anything else
    def rails?
      @rails
    end

    # @return [String] the usage text, with every flag
    def usage
      parser.help
    end

    private

    def parse(argv)
      rest = parser.parse(argv.map { |arg| normalize(arg) })
      raise ConfigurationError, "unexpected argument `#{rest.first}` (see prosody --help)" unless rest.empty?
      raise ConfigurationError, "unknown log level `#{@log_level}` (#{LOG_LEVELS.join(", ")})" unless level_known?
      return if @log_format.nil? || Prosody::LOG_FORMATS.include?(@log_format.downcase.to_sym)

      raise ConfigurationError, "unknown log format `#{@log_format}` (#{Prosody::LOG_FORMATS.join(", ")})"
    rescue OptionParser::ParseError => e
      raise ConfigurationError, "#{e.message} (see prosody --help)"
    end

    # `--group_id=x` and `--group-id=x` are the same flag.
    def normalize(arg)
      return arg unless arg.start_with?("--")

      flag, value = arg.split("=", 2)
      value.nil? ? flag.tr("_", "-") : "#{flag.tr("_", "-")}=#{value}"
    end

    def level_known?
      LOG_LEVELS.include?(@log_level)
    end

    def parser
      @parser ||= OptionParser.new do |opts|
        opts.banner = "Usage: prosody (--require FILE | --rails) --handler CLASS [options]"
        opts.separator ""
        opts.separator "Runs a Prosody::EventHandler subclass until TERM or INT, then unsubscribes gracefully."
        opts.separator ""
        runner_flags(opts)
        opts.separator ""
        opts.separator "Client options (default: PROSODY_<NAME> from the environment, then the built-in default):"
        client_flags(opts)
      end
    end

    def runner_flags(opts)
      opts.on("-r", "--require FILE", "Load FILE (or a library) before starting; repeatable") do |file|
        @requires = [] unless @requires_given
        @requires_given = true
        @requires << file
      end
      opts.on("--rails", "Boot the Rails app in this directory (config/environment.rb) first; the default " \
                         "when config/environment.rb exists and nothing is required") { @rails = true }
      opts.on("-H", "--handler CLASS", "The Prosody::EventHandler subclass to run, e.g. Billing::Handler") do |name|
        @handler_name = name
      end
      opts.on("--log-level LEVEL", "#{LOG_LEVELS.join(", ")} (default: info)") { |level| @log_level = level.downcase }
      opts.on("--log-format FORMAT", "text or json: one JSON object per line (default: text, or " \
                                     "PROSODY_LOG_FORMAT)") { |format| @log_format = format }
      opts.on("-h", "--help", "Show this help") { @help = true }
      opts.on("-v", "--version", "Show the version") { @version = true }
    end

    def client_flags(opts)
      Configuration::OPTIONS.each do |name, kind|
        if kind == :flag
          opts.on("--[no-]#{name.to_s.tr("_", "-")}", FLAG_HELP.fetch(name)) { |flag| set(name, flag) }
        elsif name == :kafka
          opts.on("--kafka SETTING=VALUE", "A librdkafka setting; repeatable") { |pair| kafka(pair) }
        else
          # Whole-number options are Integers for Configuration (which refuses Strings).
          type = { count: [Integer], whole: [Integer], fraction: [Float] }.fetch(kind, [])
          flag = "--#{name.to_s.tr("_", "-")} VALUE"
          opts.on(flag, *type, *alias_switches(name), hint(name, kind)) do |value|
            set(name, value)
          end
        end
      end
    end

    # A choice lists its names (from the native options table); other kinds say what they take.
    def hint(name, kind)
      kind == :choice ? Native.option_choices(name.to_s).join(" | ") : KIND_HINTS.fetch(kind, "")
    end

    def alias_switches(name)
      ALIASES.filter_map { |short, option| "--#{short} VALUE" if option == name }
    end

    def set(name, value)
      @client_options[name] = value
    end

    def kafka(pair)
      setting, value = pair.split("=", 2)
      raise OptionParser::InvalidArgument, "--kafka #{pair} (expected SETTING=VALUE)" if value.nil? || setting.empty?

      (@client_options[:kafka] ||= {})[setting] = value
    end
  end
end
