# frozen_string_literal: true

module Prosody
  # W3C trace context on the Ruby side: which handler call the current fiber
  # runs, the `traceparent` a send from here continues, and the bridge to the
  # `opentelemetry-api` gem when it is loaded.
  #
  # The native core opens the spans (see README "Traces"); a handler's
  # {Context#trace_context} is its attempt span's `traceparent`. A
  # {Client#send_message} made in the handler's fiber writes it, so the sent
  # message's trace continues the handler's. With the `opentelemetry-api` gem
  # loaded, the handler runs inside the extracted context (its own spans are
  # children of the attempt), and a send continues whatever span is current
  # there, or in a Rails request.
  class TraceContext
    TRACEPARENT = "traceparent"
    TRACESTATE = "tracestate"
    CURRENT = :prosody_current_context
    private_constant :CURRENT

    class << self
      # Runs the block as the handler call of `context`: {.current_traceparent}
      # answers from it, and with OpenTelemetry loaded its span is current.
      #
      # @api private Called by the processor around each handler call.
      # @param context [Context]
      # @return [Object] the block's value
      def within(context, &)
        fiber_locals = Thread.current
        previous = fiber_locals[CURRENT]
        fiber_locals[CURRENT] = context
        traceparent = open_telemetry? && context.trace_context
        traceparent ? with_open_telemetry(traceparent, &) : yield
      ensure
        fiber_locals[CURRENT] = previous
      end

      # The `traceparent` a send made here would continue: OpenTelemetry's
      # current span when that gem is loaded and has one, else the handler
      # call this fiber runs (nil outside handlers, or when tracing is off).
      #
      # @return [String, nil]
      def current_traceparent
        current_headers[TRACEPARENT]
      end

      # `headers` with the current trace context added, unless they carry a
      # `traceparent` already (the caller's choice wins).
      #
      # @api private Used by {Client#send_message}.
      # @param headers [Hash{String=>String}]
      # @return [Hash{String=>String}]
      def add_to(headers)
        return headers if headers.key?(TRACEPARENT)

        trace = current_headers
        trace.empty? ? headers : headers.merge(trace)
      end

      private

      def current_headers
        carrier = {}
        ::OpenTelemetry.propagation.inject(carrier) if open_telemetry?
        return carrier.slice(TRACEPARENT, TRACESTATE) if carrier.key?(TRACEPARENT)

        traceparent = Thread.current[CURRENT]&.trace_context
        traceparent ? { TRACEPARENT => traceparent } : {}
      end

      def with_open_telemetry(traceparent, &)
        extracted = ::OpenTelemetry.propagation.extract({ TRACEPARENT => traceparent })
        ::OpenTelemetry::Context.with_current(extracted, &)
      end

      # The opentelemetry-api gem is optional: detected when it is loaded.
      def open_telemetry?
        !defined?(::OpenTelemetry::Context).nil? && ::OpenTelemetry.respond_to?(:propagation)
      end
    end
  end
end
