# frozen_string_literal: true

require "logger"

# Where Ruby and native log lines go: one Logger for both.
module Prosody
  @logger = nil
  @logger_lock = Mutex.new

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

    private

    def default_logger
      Logger.new($stdout, level: Logger::INFO)
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
