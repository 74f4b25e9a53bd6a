# frozen_string_literal: true

module Prosody
  # Sends messages and runs a handler over the subscribed topics.
  #
  # Blocking calls ({#send_message}, {#subscribe}, {#unsubscribe}) wait in a way
  # that suits the caller: inside an Async reactor they suspend only the calling
  # fiber; on a plain thread (Puma, Sidekiq) they block only that thread.
  #
  # @example Produce
  #   client = Prosody::Client.new(bootstrap_servers: "kafka:9092")
  #   client.send_message("invoices", "acct-42", { "amount" => 1200 })
  #
  # @example Consume
  #   client = Prosody::Client.new(bootstrap_servers: "kafka:9092", group_id: "billing", subscribed_topics: "invoices")
  #   client.subscribe(InvoiceHandler.new)
  #   # ... later, on shutdown:
  #   client.unsubscribe
  class Client
    # Seconds unsubscribe waits for the processor thread after the core is done.
    ABANDONED_GRACE = 0.5
    private_constant :ABANDONED_GRACE

    # @overload initialize(config)
    #   @param config [Configuration]
    # @overload initialize(**options)
    #   @param options [Hash{Symbol=>Object}] the keyword options of {Configuration}
    # @raise [ConfigurationError] naming the option at fault
    # @raise [BridgeError] when used in a child process forked after Prosody started
    def initialize(config = nil, **options)
      @config = configuration(config, options)
      Prosody.install_integrations
      Prosody.monitor.start
      @native = Native::Client.new(@config.to_native)
      @processor = nil
      @lifecycle = Mutex.new
      @exit_listener = nil
    end

    # @return [Configuration] the options this client was built with (without environment fallbacks)
    attr_reader :config

    # Sends one message and returns once the broker acknowledged it.
    #
    # @param topic [String]
    # @param key [String] messages with the same key are handled in order
    # @param payload [Object] any JSON value: Hash (String or Symbol keys), Array, String, Numeric, true, false, nil
    # @param headers [Hash{String=>String}] extra record headers; unless they
    #   carry a `traceparent`, the current trace context is added (inside a
    #   handler, or under an OpenTelemetry span: see {Prosody.current_traceparent})
    # @return [nil]
    # @raise [InvalidMessageError] for a missing key or topic, a payload that is not JSON, or bad headers
    # @raise [SendTimeoutError] when the broker did not acknowledge within send_timeout
    # @raise [SendError] when the broker refused the message
    # @example
    #   client.send_message("invoices", "acct-42", { amount: 1200 }, headers: { "origin" => "web" })
    def send_message(topic, key, payload, headers: {})
      check_text(topic, "topic")
      check_text(key, "key")
      unless headers.is_a?(Hash)
        raise InvalidMessageError, "headers must be a Hash of String => String, got #{headers.class}"
      end

      headers = TraceContext.add_to(headers)
      NativeCall.await { |queue| @native.send_message(topic, key, payload, headers, queue) }
    end

    # Starts consuming the subscribed topics with `handler`; returns once the
    # consumer has joined its group.
    #
    # @param handler [EventHandler]
    # @return [nil]
    # @raise [ConfigurationError] if group_id or subscribed_topics is missing, or handler is not an {EventHandler}
    # @raise [StateError] if this client is already subscribed
    def subscribe(handler)
      unless handler.is_a?(EventHandler)
        raise ConfigurationError, "subscribe needs a Prosody::EventHandler, got #{handler.class}"
      end

      @lifecycle.synchronize { start_processor(handler) }
      nil
    end

    # Stops consuming: in-flight handlers finish or are cancelled, progress is
    # committed and the group is left, all by one deadline: it returns within
    # shutdown_timeout plus about a second, even when the brokers are gone
    # (what could not be confirmed by then is logged and given up).
    # Does nothing when not subscribed.
    #
    # @return [nil]
    # @raise [StateError] when called from inside a handler (it would wait for itself)
    def unsubscribe
      if @processor&.processor_thread?
        raise StateError, "unsubscribe cannot be called from inside a handler; call it from another thread or fiber"
      end

      @lifecycle.synchronize { stop_processor }
      nil
    end

    # @return [Symbol] :unconfigured (producer only), :configured (can subscribe) or :running (subscribed)
    def consumer_state
      @native.consumer_state
    end

    # @return [Integer] partitions currently assigned to this client
    def assigned_partitions
      @native.assigned_partitions
    end

    # @return [String] the `source-system` header written on every sent message
    def source_system
      @native.source_system
    end

    # True while a partition has work but has finished nothing for
    # `stall_threshold` (the probe server's `/livez` then answers 503).
    #
    # @return [Boolean]
    def stalled?
      @native.stalled?
    end
    alias is_stalled? stalled?

    # The port the HTTP probe server (`/readyz`, `/livez`) listens on. With
    # `probe_port: 0` this is the free port that was picked.
    #
    # @return [Integer, nil] nil when not subscribed or when probes are off
    def probe_port
      @native.probe_port
    end

    # Messages the consumer skipped without calling the handler, since the last {#subscribe}.
    #
    # @return [Hash{Symbol=>Integer}] :own_messages (the `source-system` header equals this
    #   consumer's group_id: loop prevention), :event_type (the payload's `type` does not
    #   start with one of `allowed_events`) and :duplicates (the payload's `id` was handled
    #   already for this topic and key: deduplication)
    def skip_counts
      @native.skip_counts
    end

    # Buffer statistics per assigned partition.
    #
    # @return [Array<Hash{Symbol=>Object}>] each with :topic, :partition, :buffered,
    #   :max_buffered, :full (the buffer is full, so the partition is not read now),
    #   :fills (times it filled), :drains (times it drained enough to be read again),
    #   :finished, and :deferred_keys and :deferred_messages (messages set aside for a
    #   later retry, `defer` option)
    def partition_stats
      @native.partition_stats
    end

    # The fair scheduler shared by every partition of the subscription, since the last {#subscribe}.
    #
    # @return [Hash{Symbol=>Integer}] :waiting (handler calls waiting for a slot now: the
    #   virtual-time queue's length), :waiting_retries (of those, retries), :max_waiting (the most
    #   ever waiting), :waited (calls that had to wait), :tracked_keys (keys whose virtual time is
    #   remembered) and :rejections (calls refused because their key monopolized handler time,
    #   `:pipeline` mode)
    def qos_stats
      @native.qos_stats
    end

    # Handlers of the current subscription that ran longer than
    # {ReactorWatchdog::DEFAULT_THRESHOLD} seconds without yielding, which
    # holds up every other handler of the process (each is also logged at WARN).
    #
    # @return [Integer] 0 when not subscribed
    def blocking_handlers
      @processor&.blocking_calls || 0
    end

    # Replaces what happens when a handler calls `exit` (or raises SystemExit).
    # By default the client unsubscribes gracefully (in-flight handlers finish,
    # progress is committed), then raises the SystemExit in the main thread, so
    # the process exits with its status as `exit` in any thread would. The block
    # runs on a thread of its own with the SystemExit. The `prosody` runner uses
    # it to stop as on TERM.
    #
    # @yieldparam error [SystemExit]
    # @return [nil]
    def on_handler_exit(&block)
      @exit_listener = block
      nil
    end

    # @return [String]
    def inspect
      "#<#{self.class.name} state=#{consumer_state} source_system=#{source_system.inspect}>"
    end

    private

    def configuration(config, options)
      case config
      when nil then Configuration.new(**options)
      when Configuration then options.empty? ? config : config.merge(**options)
      else
        raise ConfigurationError, "Prosody::Client.new takes a Configuration or keyword options, got #{config.class}"
      end
    end

    def check_text(value, name)
      return if value.is_a?(String) && !value.empty?

      shown = value.nil? ? "nil" : "#{value.class} #{value.inspect}"
      raise InvalidMessageError, "#{name} must be a non-empty String, got #{shown}"
    end

    def processor_died(cause)
      @native.processor_died
      Prosody.monitor.instrument(
        "processor.died",
        group_id: @config[:group_id], error_class: cause&.class&.name, error_message: cause&.message
      )
    end

    def start_processor(handler)
      processor = AsyncTaskProcessor.new(
        handler,
        on_exit: method(:handler_exited),
        on_death: method(:processor_died)
      ).start
      subscribed = false
      begin
        NativeCall.await { |queue| @native.subscribe(processor, queue) }
        subscribed = true
      ensure
        # Whatever stopped the subscription (an error, Async::Stop, Interrupt),
        # do not leave the processor thread behind.
        processor.stop unless subscribed
      end
      @processor = processor
    end

    # Runs on the processor thread: hand the stop to another thread, since
    # unsubscribe waits for the handlers (this one included).
    def handler_exited(error)
      listener = @exit_listener
      Thread.new do
        if listener
          listener.call(error)
        else
          unsubscribe
          Thread.main.raise(error)
        end
      rescue StandardError => e
        Prosody.log(Logger::ERROR, "stopping after a handler called exit failed: #{e.class}: #{e.message}")
      end
    end

    def stop_processor
      NativeCall.await { |queue| @native.unsubscribe(queue) }
    ensure
      processor = @processor
      @processor = nil
      # The core has waited for the handlers (within shutdown_timeout); any still
      # running ignored cancellation and were abandoned, so do not wait for them.
      if processor && !processor.stop(timeout: ABANDONED_GRACE)
        Prosody.log(Logger::WARN,
                    "handlers that ignored cancellation are still running; leaving them in the background")
      end
    end
  end
end
