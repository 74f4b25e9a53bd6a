# frozen_string_literal: true

require "json"
require "time"

module Prosody
  # A `Logger` formatter writing one JSON object per line: `time` (UTC,
  # ISO 8601 with microseconds), `level`, `progname`, `message`, then the
  # line's fields ({LogLine#fields}: topic, partition, offset, key...) and, for
  # an exception, `error_class` and `backtrace`. `Prosody.log_format = :json`
  # puts it on the default logger; give it to your own logger with
  # `logger.formatter = Prosody::JsonLogFormatter.new`.
  class JsonLogFormatter
    # @param severity [String]
    # @param time [Time]
    # @param progname [String, nil]
    # @param message [Object] a String, an Exception, a {LogLine}, anything
    # @return [String] one line, newline-terminated
    def call(severity, time, progname, message)
      entry = { "time" => time.utc.iso8601(6), "level" => severity }
      entry["progname"] = progname if progname
      fields = {}
      if message.is_a?(LogLine)
        fields = message.fields
        message = message.message
      end
      describe(entry, message)
      fields.each { |name, value| entry[name.to_s] = plain(value) }
      "#{JSON.generate(entry)}\n"
    end

    private

    def describe(entry, message)
      case message
      when ::String
        entry["message"] = message.scrub
      when ::Exception
        entry["message"] = message.message.to_s.scrub
        entry["error_class"] = message.class.name
        entry["backtrace"] = message.backtrace if message.backtrace
      else
        entry["message"] = message.inspect.scrub
      end
    end

    def plain(value)
      case value
      when ::String then value.scrub
      when ::Integer, ::Float, true, false, nil then value
      when ::Time then value.utc.iso8601(3)
      else value.to_s
      end
    end
  end
end
