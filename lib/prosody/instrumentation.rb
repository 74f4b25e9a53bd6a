# frozen_string_literal: true

# The process-wide monitor, and the integrations it feeds when their libraries are loaded.
module Prosody
  @monitor = nil
  @monitor_lock = Mutex.new
  @integrations = []

  class << self
    # Where instrumentation events go; see {Monitor}.
    #
    # @return [Monitor]
    def monitor
      @monitor || @monitor_lock.synchronize { @monitor ||= Monitor.new }
    end

    # The W3C `traceparent` a send made here continues: the current
    # OpenTelemetry span's when the `opentelemetry-api` gem is loaded and one is
    # current, else the attempt span of the handler call this fiber runs; nil
    # otherwise (or when tracing is off). See {TraceContext}.
    #
    # @return [String, nil]
    def current_traceparent
      TraceContext.current_traceparent
    end

    # Connects the monitor to error reporting (sentry-ruby, see {SentryReporter})
    # and to ActiveSupport::Notifications (see {Monitor#forward_to_active_support})
    # when those libraries are loaded. Every {Client.new} calls it, so loading them
    # before or after Prosody both work; each is connected once per process.
    #
    # @return [void]
    def install_integrations
      monitor = self.monitor
      install_integration(:sentry, defined?(::Sentry)) { SentryReporter.new.subscribe(monitor) }
      install_integration(:active_support, defined?(::ActiveSupport::Notifications)) do
        monitor.forward_to_active_support
      end
      # Spans still buffered at exit would be lost: export them first.
      install_integration(:trace_flush, Native.tracing?) { at_exit { Native.flush_traces } }
    end

    private

    def install_integration(name, available)
      return unless available

      @monitor_lock.synchronize do
        next if @integrations.include?(name)

        @integrations << name
      end or return
      yield
    end
  end
end
