# frozen_string_literal: true

require "logger"

# Where Ruby and native log lines go: one Logger for both.
module Prosody
  @logger = nil
  @logger_lock = Mutex.new
  @log_format = nil
  @default_logger = nil
  LOG_FORMATS = %i[text json].freeze

  class << self
    # The logger Prosody writes to. Native logs (Rust, librdkafka) arrive here
    # too, with progname "prosody". Defaults to `$stdout` at INFO.
    #
    # @return [Logger]
    def logger
      @logger || @logger_lock.synchronize { @logger ||= install(default_logger) }
    end

    # Replaces the logger. Its level is passed to the native side so lines below
    # it are never formatted there; after changing the level of the logger in
    # place, assign it again so the native side sees the new level.
    #
    # @param logger [Logger] anything with `add(severity, message, progname)` and `level`
    # @return [Logger]
    # @example
    #   Prosody.logger = Logger.new($stderr, level: :warn)
    def logger=(logger)
      raise ArgumentError, "Prosody.logger must respond to #add and #level" unless loggable?(logger)

      @logger_lock.synchronize { @logger = install(logger) }
    end

    # How the default logger writes lines: `:text` (Ruby's Logger format) or
    # `:json` (one JSON object per line, see {JsonLogFormatter}). Defaults to
    # `PROSODY_LOG_FORMAT` from the environment, else `:text`.
    #
    # @return [Symbol] :text or :json
    def log_format
      @log_format ||= format_from_environment
    end

    # Sets the default logger's format (see {.log_format}); with your own
    # logger, set its formatter instead (`Prosody::JsonLogFormatter.new`).
    #
    # @param format [Symbol, String] :text or :json
    # @return [Symbol]
    # @raise [ConfigurationError] for any other format
    # @example
    #   Prosody.log_format = :json
    def log_format=(format)
      format = parse_log_format(format, "log_format")
      @logger_lock.synchronize do
        @log_format = format
        @default_logger&.formatter = formatter
      end
    end

    # Writes one of Prosody's own Ruby lines, through `add`: all a logger
    # must have (see {.logger=}), so loggers without `#error` and the like work.
    #
    # @api private
    # @param severity [Integer] a `Logger::Severity` constant
    # @param message [String]
    # @return [void]
    def log(severity, message)
      logger.add(severity, message)
    end

    # A native (Rust, librdkafka) log line: its fields tag it (see {LogLine}).
    #
    # @api private Called by the extension's log forwarding.
    # @param severity [Integer]
    # @param message [String]
    # @param fields [Array<Array(String, String)>]
    # @return [void]
    def log_native(severity, message, fields)
      line = fields.empty? ? message : LogLine.new(message, fields.to_h.transform_keys(&:to_sym), tags_first: false)
      logger.add(severity, line, "prosody")
    end

    private

    def default_logger
      @default_logger = Logger.new($stdout, level: Logger::INFO, formatter:)
    end

    # nil is Logger's own format.
    def formatter
      log_format == :json ? JsonLogFormatter.new : nil
    end

    # A bad value must not break logging: it is reported once and ignored.
    def format_from_environment
      parse_log_format(ENV.fetch("PROSODY_LOG_FORMAT", "text"), "PROSODY_LOG_FORMAT")
    rescue ConfigurationError => e
      warn("prosody: #{e.message}; writing text")
      :text
    end

    def parse_log_format(format, name)
      value = format.to_s.strip.downcase.to_sym
      return value if LOG_FORMATS.include?(value)

      raise ConfigurationError, "#{name} must be one of #{LOG_FORMATS.join(", ")}, got #{format.inspect}"
    end

    def install(logger)
      Native.log_level = Integer(logger.level)
      logger
    end

    def loggable?(logger)
      logger.respond_to?(:add) && logger.respond_to?(:level)
    end
  end
end
