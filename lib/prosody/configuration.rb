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
  #
  # @example Failure handling
  #   Prosody::Configuration.new(
  #     group_id: "billing", subscribed_topics: "invoices",
  #     mode: :low_latency, max_retries: 5, retry_base: "50ms", failure_topic: "invoices.dead",
  #     timeout: 30, probe_port: 9100
  #   )
  class Configuration
    # Option name => kind of value it takes, checked by {#convert}. The native
    # core's options table is the source: a spec compares this with
    # Native.option_kinds, so a new option is added there first.
    OPTIONS = {
      bootstrap_servers: :list,
      group_id: :name,
      subscribed_topics: :list,
      allowed_events: :list,
      source_system: :name,
      mock: :flag,
      max_concurrency: :count,
      max_uncommitted: :count,
      commit_interval: :duration,
      poll_interval: :duration,
      send_timeout: :duration,
      shutdown_timeout: :duration,
      mode: :choice,
      defer: :flag,
      defer_base: :duration,
      defer_max_delay: :duration,
      defer_failure_threshold: :fraction,
      defer_failure_window: :duration,
      max_retries: :whole,
      retry_base: :duration,
      max_retry_delay: :duration,
      failure_topic: :name,
      scheduler_decay: :duration,
      scheduler_failure_share: :fraction,
      scheduler_max_wait: :duration,
      scheduler_wait_weight: :whole,
      monopolization_enabled: :flag,
      monopolization_window: :duration,
      monopolization_threshold: :fraction,
      timeout: :duration,
      stall_threshold: :duration,
      probe_port: :port,
      idempotence_cache_size: :whole,
      idempotence_version: :version,
      idempotence_ttl: :duration,
      telemetry_enabled: :flag,
      telemetry_topic: :name,
      message_spans: :choice,
      timer_spans: :choice,
      database_url: :name,
      state_store: :choice,
      kafka: :settings
    }.freeze

    # Other names options answer to (the product specification's): alias =>
    # option. A spec compares this with Native.option_aliases.
    ALIASES = { defer_enabled: :defer, scheduler_failure_weight: :scheduler_failure_share }.freeze

    # Kind of option => the private method that checks and converts its value.
    CONVERTERS = {
      name: :name_value, list: :list_value, flag: :flag_value, count: :positive_value, whole: :whole_value,
      duration: :duration_value, fraction: :fraction_value, choice: :choice_value, port: :port_value,
      settings: :settings_value, version: :version_value
    }.freeze
    private_constant :CONVERTERS

    # Failure-handling modes (see the options table), as the native core names them.
    MODES = Native.option_choices("mode").map(&:to_sym).freeze

    # Values of probe_port that turn the probe server off, besides false.
    PROBE_OFF = %w[none false off].freeze
    private_constant :PROBE_OFF

    # Options whose whole value {#inspect} never shows (they may carry credentials).
    SECRET_OPTIONS = %i[database_url].freeze
    private_constant :SECRET_OPTIONS

    # Settings in the `kafka` passthrough whose values are never shown by {#inspect}.
    SECRET_SETTING = /password|secret|token|key|pem|jaas|credential/i
    private_constant :SECRET_SETTING

    # @param options [Hash{Symbol=>Object}] see the options table in the README
    # @raise [ConfigurationError] naming the first unknown or ill-typed option,
    #   or an option given under two names (an alias in {ALIASES} sets its option)
    def initialize(**options)
      @values = {}
      given_as = {}
      options.each do |given, value|
        next if value.nil?

        name = ALIASES.fetch(given, given)
        kind = OPTIONS.fetch(name) { raise unknown(given) }
        raise twice(name, given_as[name], given) if given_as.key?(name)

        given_as[name] = given
        @values[name] = convert(name, kind, value)
      end
      @values.freeze
      freeze
    end

    # @param name [Symbol, String] an option or an alias
    # @return [Object, nil] the converted value of an option that was set
    def [](name)
      @values[option_name(name)]
    end

    # @param name [Symbol, String] an option or an alias
    # @return [Boolean] whether the option was given (environment fallbacks are not visible here)
    def set?(name)
      @values.key?(option_name(name))
    end

    # A new configuration with `options` laid over these (nil unsets one).
    #
    # @param options [Hash{Symbol=>Object}]
    # @return [Configuration]
    # @raise [ConfigurationError]
    def merge(**options)
      self.class.new(**options.compact) # refuses one option under two names
      self.class.new(**@values.merge(options.transform_keys { |name| ALIASES.fetch(name, name) }))
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
        next [name, "[FILTERED]"] if SECRET_OPTIONS.include?(name)

        name == :kafka ? [name, mask(value)] : [name, value]
      end
      "#<#{self.class.name} #{shown.map { |name, value| "#{name}=#{value.inspect}" }.join(" ")}>"
    end
    alias to_s inspect

    private

    def option_name(name)
      ALIASES.fetch(name.to_sym, name.to_sym)
    end

    def twice(name, first, second)
      invalid(name, "set twice, as `#{first}` and as `#{second}` (two names for one option); set one of them")
    end

    def unknown(name)
      ConfigurationError.new("unknown option `#{name}` (known options: #{OPTIONS.keys.join(", ")})")
    end

    def invalid(name, reason)
      ConfigurationError.new("invalid option `#{name}`: #{reason}")
    end

    def convert(name, kind, value)
      send(CONVERTERS.fetch(kind), name, value)
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

    def positive_value(name, value) = count_value(name, value, minimum: 1)

    # Zero is allowed (max_retries: give up at once; scheduler_wait_weight: a linear boost).
    def whole_value(name, value) = count_value(name, value, minimum: 0)

    # An Integer. A String is refused (`max_concurrency: "10"` is a mistake in code);
    # the `PROSODY_*` environment fallback, which is always text, is parsed natively.
    def count_value(name, value, minimum:)
      unless value.is_a?(Integer)
        raise invalid(name, "expected a whole number (Integer), got #{value.class} #{value.inspect}")
      end
      raise invalid(name, "must be at least #{minimum}, got #{value}") if value < minimum

      value
    end

    # A label such as "2" or :v2; an Integer is taken as its digits.
    def version_value(name, value)
      value.is_a?(Integer) ? value.to_s : name_value(name, value)
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

    # A share: a Numeric above 0 and at most 1, as a Float (text only from `PROSODY_*`).
    def fraction_value(name, value)
      raise invalid(name, "expected a number from 0 to 1 (Numeric), got #{value.class}") unless value.is_a?(Numeric)

      share = value.to_f
      raise invalid(name, "must be greater than 0 and at most 1, got #{value}") unless share.positive? && share <= 1

      share
    end

    # One of the names the native core lists for this option (e.g. {MODES}), as a
    # Symbol; the core also reads "low-latency" or ":best_effort" and aliases.
    def choice_value(name, value)
      text = textual(value) or raise invalid(name, "expected a Symbol or String, got #{value.class}")
      Native.option_choice(name.to_s, text).to_sym
    end

    # A port (0 picks a free one), or false / "none" for no probe server.
    def port_value(name, value)
      port = port_number(value)
      return port if port == false || (port.is_a?(Integer) && port.between?(0, 65_535))

      raise invalid(name, "expected a port number (0-65535), false or \"none\", got #{value.inspect}")
    end

    # false for "off" spellings, an Integer for digits, else the value unchanged.
    def port_number(value)
      text = textual(value)&.strip&.downcase
      return false if PROBE_OFF.include?(text)
      return Integer(text, 10) if text&.match?(/\A\d+\z/)

      value
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
