# frozen_string_literal: true

# Prosody.client: the application's client, one per process.
module Prosody
  @client_config = nil
  @client = nil
  @client_pid = nil
  @client_lock = Mutex.new

  class << self
    # The application's client: one per process, created on first use from
    # {client_options} (the Railtie sets them from `config/prosody.yml`). After
    # a fork the child gets its own on first use (a client cannot cross a fork),
    # so this is safe in Puma cluster mode, Unicorn or Resque workers.
    #
    # @return [Client]
    # @raise [ConfigurationError] when the options are invalid (or, natively, incomplete)
    # @example In a controller
    #   Prosody.client.send_message("orders", order.id.to_s, order.as_json)
    def client
      @client_lock.synchronize do
        forget_client_of_parent
        @client ||= begin
          @client_pid = Process.pid
          Client.new(client_options)
        end
      end
    end

    # The options {client} is built with; empty unless set (every option then
    # comes from `PROSODY_*` and the defaults).
    #
    # @return [Configuration]
    def client_options
      @client_config || Configuration.new
    end

    # Sets the options {client} is built with, checked at once.
    #
    # @param options [Configuration, Hash{Symbol=>Object}]
    # @raise [ConfigurationError] for an unknown or ill-typed option
    # @raise [StateError] when this process already created its client (the options would not apply)
    def client_options=(options)
      config = options.is_a?(Configuration) ? options : Configuration.new(**options.to_h.transform_keys(&:to_sym))
      @client_lock.synchronize do
        forget_client_of_parent
        if @client
          raise StateError, "Prosody.client was already created in this process; set Prosody.client_options " \
                            "before its first use"
        end

        @client_config = config
      end
    end

    # Unsubscribes and forgets this process's client, so the next {client}
    # builds a new one (from the options then set). For tests and reloads.
    #
    # @return [nil]
    def reset_client!
      client = @client_lock.synchronize do
        forget_client_of_parent
        @client.tap { @client = nil }
      end
      client&.unsubscribe
      nil
    end

    private

    # A client created before a fork belongs to the parent; the child drops it.
    def forget_client_of_parent
      return if @client_pid == Process.pid

      @client = nil
      @client_pid = Process.pid
    end
  end
end
