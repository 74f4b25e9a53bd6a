# frozen_string_literal: true

module Prosody
  # Client options, checked once when built.
  #
  # Every option is a keyword argument; an option left out (or nil) falls back to
  # the environment variable `PROSODY_<UPPER_NAME>` and then to its default, both
  # applied by the native side. This class checks names and types so mistakes
  # surface where they are made; range checks that need the final value (after
  # the environment fallback) happen natively and raise the same error class.
  #
  # @example
  #   config = Prosody::Configuration.new(
  #     bootstrap_servers: "kafka:9092",
  #     group_id: "billing",
  #     subscribed_topics: %w[invoices payments],
  #     commit_interval: "500ms"
  #   )
  #   client = Prosody::Client.new(config)
  class Configuration
    # Option name => kind of value it takes. The kinds are checked by {#convert}.
    OPTIONS = {
      bootstrap_servers: :list,
      group_id: :name,
      subscribed_topics: :list,
      source_system: :name,
      mock: :flag,
      max_concurrency: :count,
      max_uncommitted: :count,
      commit_interval: :duration,
      poll_interval: :duration,
      send_timeout: :duration,
      shutdown_timeout: :duration,
      kafka: :settings
    }.freeze

    # Settings in the `kafka` passthrough whose values are never shown by {#inspect}.
    SECRET_SETTING = /password|secret|token|key|pem|jaas|credential/i
    private_constant :SECRET_SETTING

    # @param options [Hash{Symbol=>Object}] see the options table in the README
    # @raise [ConfigurationError] naming the first unknown or ill-typed option
    def initialize(**options)
      @values = {}
      options.each do |name, value|
        kind = OPTIONS.fetch(name) { raise unknown(name) }
        converted = convert(name, kind, value)
        @values[name] = converted unless converted.nil?
      end
      @values.freeze
      freeze
    end

    # @param name [Symbol, String]
    # @return [Object, nil] the converted value of an option that was set
    def [](name)
      @values[name.to_sym]
    end

    # @param name [Symbol, String]
    # @return [Boolean] whether the option was given (environment fallbacks are not visible here)
    def set?(name)
      @values.key?(name.to_sym)
    end

    # A new configuration with `options` laid over these.
    #
    # @param options [Hash{Symbol=>Object}]
    # @return [Configuration]
    # @raise [ConfigurationError]
    def merge(**options)
      self.class.new(**@values.merge(options))
    end

    # @return [Hash{Symbol=>Object}] the options that were set
    def to_h
      @values.dup
    end

    # The form the native client takes: String keys, only the options that were set.
    #
    # @return [Hash{String=>Object}]
    def to_native
      @values.transform_keys(&:to_s)
    end

    # Shows the options; values of secret-looking `kafka` settings are masked.
    #
    # @return [String]
    def inspect
      shown = @values.to_h do |name, value|
        name == :kafka ? [name, mask(value)] : [name, value]
      end
      "#<#{self.class.name} #{shown.map { |name, value| "#{name}=#{value.inspect}" }.join(" ")}>"
    end
    alias to_s inspect

    private

    def unknown(name)
      ConfigurationError.new("unknown option `#{name}` (known options: #{OPTIONS.keys.join(", ")})")
    end

    def invalid(name, reason)
      ConfigurationError.new("invalid option `#{name}`: #{reason}")
    end

    def convert(name, kind, value)
      return nil if value.nil?

      case kind
      when :name then name_value(name, value)
      when :list then list_value(name, value)
      when :flag then flag_value(name, value)
      when :count then count_value(name, value)
      when :duration then duration_value(name, value)
      else settings_value(name, value)
      end
    end

    def name_value(name, value)
      text = textual(value) or raise invalid(name, "expected a String, got #{value.class}")
      raise invalid(name, "must not be empty") if text.strip.empty?

      text
    end

    # A String stays a String (the native side splits commas); an Array becomes Array<String>.
    def list_value(name, value)
      return name_value(name, value) unless value.is_a?(Array)

      value.map do |item|
        text = textual(item) or raise invalid(name, "expected Strings, got a #{item.class} in the list")
        raise invalid(name, "contains an empty entry") if text.strip.empty?

        text
      end.freeze
    end

    def flag_value(name, value)
      return value if [true, false].include?(value)

      raise invalid(name, "expected true or false, got #{value.inspect}")
    end

    # Integers are checked here; Strings (e.g. from ENV) are parsed natively.
    def count_value(name, value)
      case value
      when String then value
      when Integer
        raise invalid(name, "must be at least 1, got #{value}") if value < 1

        value
      else raise invalid(name, "expected a whole number, got #{value.class}")
      end
    end

    # Seconds as a Float; Strings like "250ms" or "5m" are parsed natively.
    def duration_value(name, value)
      case value
      when String, Symbol then value.to_s
      when Numeric
        seconds = value.to_f
        unless seconds.finite? && seconds >= 0
          raise invalid(name, "expected a finite, non-negative number of seconds, got #{value}")
        end

        seconds
      else raise invalid(name, "expected seconds (Numeric) or a String like \"250ms\", got #{value.class}")
      end
    end

    def settings_value(name, value)
      raise invalid(name, "expected a Hash of librdkafka settings, got #{value.class}") unless value.is_a?(Hash)

      value.to_h do |key, setting|
        key_text = textual(key) or raise invalid(name, "setting names must be Strings, got #{key.class}")
        [key_text, setting_text(name, key_text, setting)]
      end.freeze
    end

    def setting_text(name, key, setting)
      case setting
      when String, Symbol, Integer, Float, true, false then setting.to_s
      else raise invalid(name, "setting `#{key}` must be a String, Number or Boolean, got #{setting.class}")
      end
    end

    def textual(value)
      case value
      when String then value
      when Symbol then value.to_s
      end
    end

    def mask(settings)
      settings.to_h { |key, value| [key, key.match?(SECRET_SETTING) ? "[FILTERED]" : value] }
    end
  end
end
