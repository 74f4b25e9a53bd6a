# frozen_string_literal: true

require "logger"

module Prosody
  # The logger a handler gets from {Context#logger}: {Prosody.logger} with
  # each line tagged with the call's topic, partition, offset and key. Answers
  # the usual `Logger` calls (`info`, `warn { ... }`, `add`, `info?`, ...);
  # lines below the logger's level are not built.
  class MessageLogger
    # @param subject [Message, Timer, nil]
    # @return [Hash{Symbol=>Object}] the fields that locate it
    def self.tags(subject)
      case subject
      when Message then { topic: subject.topic, partition: subject.partition, offset: subject.offset, key: subject.key }
      when Timer then { key: subject.key, timer: subject.time }
      else {}
      end
    end

    # @return [Hash{Symbol=>Object}] the fields every line carries
    attr_reader :tags

    # @param logger [Logger] where lines go
    # @param tags [Hash{Symbol=>Object}]
    def initialize(logger, tags)
      @logger = logger
      @tags = tags.freeze
    end

    # @return [Integer] the underlying logger's level
    def level
      @logger.level
    end

    # Logs like `Logger#add`, with the tags.
    #
    # @param severity [Integer, nil]
    # @param message [Object, nil]
    # @param progname [String, nil]
    # @return [true]
    def add(severity, message = nil, progname = nil)
      severity ||= Logger::UNKNOWN
      return true if severity < level

      if message.nil?
        if block_given?
          message = yield
        else
          message = progname
          progname = nil
        end
      end
      @logger.add(severity, LogLine.new(message, @tags), progname)
      true
    end
    alias log add

    { debug: Logger::DEBUG, info: Logger::INFO, warn: Logger::WARN, error: Logger::ERROR,
      fatal: Logger::FATAL, unknown: Logger::UNKNOWN }.each do |name, severity|
      define_method(name) { |progname = nil, &block| add(severity, nil, progname, &block) }
      define_method(:"#{name}?") { level <= severity }
    end
  end
end
