# frozen_string_literal: true

module Prosody
  # One log line with fields: what Prosody passes to the logger as the message
  # when a line has context (a handler call's topic, partition, offset and key;
  # a native line's fields). Reads as text everywhere a String is expected
  # (`to_s`, `to_str`, `inspect`, so any formatter prints it); a
  # {JsonLogFormatter} writes the fields as JSON fields instead.
  class LogLine
    # @return [Object] what was logged (a String, an Exception, anything)
    attr_reader :message
    # @return [Hash{Symbol=>Object}] the line's fields, in order
    attr_reader :fields

    # @param message [Object]
    # @param fields [Hash{Symbol=>Object}]
    # @param tags_first [Boolean] as text, the fields as tags before the message
    #   (a handler's lines) or in parentheses after it (native lines)
    def initialize(message, fields, tags_first: true)
      @message = message
      @fields = fields
      @tags_first = tags_first
      freeze
    end

    # The message alone, as text (an exception with its class and backtrace).
    #
    # @return [String]
    def text
      case message
      when ::String then message
      when ::Exception then ([+"#{message.message} (#{message.class})"] + (message.backtrace || [])).join("\n")
      else message.inspect
      end
    end

    # `[topic=orders partition=0 offset=7 key="acct-9"] charged`, or for a
    # native line `subscribed (group_id=billing, topics=["orders"])`.
    #
    # @return [String]
    def to_s
      return text if fields.empty?
      return "#{text} (#{fields.map { |name, value| "#{name}=#{value}" }.join(", ")})" unless @tags_first

      tags = fields.map { |name, value| "#{name}=#{name == :key ? value.to_s.inspect : value}" }
      "[#{tags.join(" ")}] #{text}"
    end
    alias to_str to_s
    alias inspect to_s
  end
end
