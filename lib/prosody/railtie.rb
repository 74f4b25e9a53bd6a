# frozen_string_literal: true

require "rails/railtie"

module Prosody
  # Rails integration, loaded by `require "prosody"` when Rails is loaded.
  #
  # - {Prosody.client} options come from `config/prosody.yml` (ERB, one section
  #   per environment plus an optional `shared` one, as `config_for` reads it),
  #   under `PROSODY_*` environment variables and explicit settings:
  #   an option set in `config.prosody` wins, then its `PROSODY_<NAME>`
  #   variable, then the file, then the default.
  # - {Prosody.logger} becomes `Rails.logger` unless `config.prosody.logger`
  #   names another logger (or `false` to leave Prosody's own).
  # - The `prosody` runner boots the app with `--rails` (or when it finds
  #   `config/environment.rb`).
  #
  # @example config/application.rb
  #   config.prosody.group_id = "billing"       # explicit: wins over the file and PROSODY_GROUP_ID
  #   config.prosody.config_file = "config/kafka.yml" # default: config/prosody.yml
  # @example config/prosody.yml
  #   production:
  #     bootstrap_servers: <%= ENV.fetch("KAFKA_BROKERS") %>
  #     subscribed_topics: [orders]
  #   test:
  #     mock: true
  class Railtie < ::Rails::Railtie
    # Settings of `config.prosody` that are not client options.
    SETTINGS = %i[config_file logger].freeze

    config.prosody = ActiveSupport::OrderedOptions.new

    initializer "prosody.logger" do |app|
      logger = app.config.prosody.logger
      Prosody.logger = logger.nil? ? ::Rails.logger : logger unless logger == false || ::Rails.logger.nil?
    end

    initializer "prosody.client_options" do |app|
      Prosody.client_options = Railtie.client_options(app)
    end

    class << self
      # The options {Prosody.client} gets in `app`, merged as described above.
      #
      # @param app [Rails::Application]
      # @param env [Hash{String=>String}]
      # @return [Hash{Symbol=>Object}]
      # @raise [ConfigurationError] for a file that cannot be read or is not a mapping of options
      def client_options(app, env: ENV)
        from_file = file_options(app).reject { |name, _| env.key?("PROSODY_#{name.to_s.upcase}") }
        explicit = app.config.prosody.to_h.transform_keys(&:to_sym).except(*SETTINGS)
        from_file.merge(explicit)
      end

      private

      def file_options(app)
        path = Pathname(app.config.prosody.config_file || "config/prosody.yml").expand_path(app.root)
        return {} unless path.file?

        options = read(app, path) || {} # nil: no section for this environment
        unless options.is_a?(Hash)
          raise ConfigurationError, "#{path}: the #{::Rails.env} section must be a mapping of Prosody options"
        end

        options.to_h.transform_keys(&:to_sym)
      end

      def read(app, path)
        app.config_for(path)
      rescue StandardError => e
        raise ConfigurationError, "cannot read #{path}: #{e.class}: #{e.message}"
      end
    end
  end
end
