# frozen_string_literal: true

module ProsodySpec
  # An OTLP/HTTP trace receiver for specs (an {HttpReceiver}): decodes the
  # `ExportTraceServiceRequest` bodies posted to it (protobuf) into the spans'
  # ids, names, kinds and links with a small reader of the protobuf wire format.
  class OtlpReceiver
    # What the specs look at of a span.
    Span = Struct.new(:trace_id, :span_id, :parent_span_id, :name, :kind, :links, keyword_init: true)

    # Span kinds of the OTLP protocol.
    KINDS = { 1 => :internal, 2 => :server, 3 => :client, 4 => :producer, 5 => :consumer }.freeze

    def initialize
      @http = HttpReceiver.new(reply: ["application/x-protobuf", ""])
    end

    # @return [String] the endpoint for OTEL_EXPORTER_OTLP_ENDPOINT
    def endpoint
      "http://127.0.0.1:#{@http.port}"
    end

    # The spans received since the last call.
    #
    # @return [Array<Span>]
    def spans
      Array.new(@http.bodies.size) { @http.bodies.pop }.flat_map { |body| export_request(body) }
    end

    def close
      @http.close
    end

    private

    # ExportTraceServiceRequest: 1 resource_spans; ResourceSpans: 2 scope_spans;
    # ScopeSpans: 2 spans.
    def export_request(body)
      fields(body, 1).flat_map do |resource_spans|
        fields(resource_spans, 2).flat_map { |scope_spans| fields(scope_spans, 2).map { |span| span(span) } }
      end
    end

    # Span: 1 trace_id, 2 span_id, 4 parent_span_id, 5 name, 6 kind, 13 links
    # (Link: 2 span_id).
    def span(bytes)
      values = all_fields(bytes)
      trace_id, span_id, parent_span_id = values.values_at(1, 2, 4).map { |ids| hex(ids.first) }
      Span.new(trace_id:, span_id:, parent_span_id:, name: values[5].first&.force_encoding("UTF-8"),
               kind: KINDS[values[6].first], links: values[13].map { |link| hex(fields(link, 2).first) })
    end

    def hex(bytes)
      bytes.to_s.unpack1("H*")
    end

    def all_fields(bytes)
      values = Hash.new { |hash, key| hash[key] = [] }
      each_field(bytes) { |number, value| values[number] << value }
      values
    end

    def fields(bytes, number)
      found = []
      each_field(bytes) { |field, value| found << value if field == number }
      found
    end

    # Yields each field's number and value (Integer for varints and fixed
    # widths, a binary String for length-delimited fields).
    def each_field(bytes)
      at = 0
      while at < bytes.bytesize
        tag, at = varint(bytes, at)
        number = tag >> 3
        case tag & 7
        when 0 then value, at = varint(bytes, at)
        when 1 then value = bytes.byteslice(at, 8).unpack1("Q<")
                    at += 8
        when 2
          length, at = varint(bytes, at)
          value = bytes.byteslice(at, length)
          at += length
        when 5 then value = bytes.byteslice(at, 4).unpack1("L<")
                    at += 4
        else raise ArgumentError, "unsupported protobuf wire type #{tag & 7}"
        end
        yield number, value
      end
    end

    def varint(bytes, at)
      value = 0
      shift = 0
      loop do
        byte = bytes.getbyte(at)
        at += 1
        value |= (byte & 0x7f) << shift
        return [value, at] if byte < 0x80

        shift += 7
      end
    end
  end
end
