# frozen_string_literal: true

require "socket"

module ProsodySpec
  # An OTLP/HTTP trace receiver for specs: accepts `POST /v1/traces` bodies
  # (protobuf `ExportTraceServiceRequest`) and decodes the spans' ids, names
  # and kinds with a small reader of the protobuf wire format.
  class OtlpReceiver
    # What the specs look at of a span.
    Span = Struct.new(:trace_id, :span_id, :parent_span_id, :name, :kind, :links, keyword_init: true)

    # Span kinds of the OTLP protocol.
    KINDS = { 1 => :internal, 2 => :server, 3 => :client, 4 => :producer, 5 => :consumer }.freeze

    attr_reader :spans

    def initialize
      @server = TCPServer.new("127.0.0.1", 0)
      @spans = Queue.new
      @thread = Thread.new { serve }
    end

    # @return [String] the endpoint for OTEL_EXPORTER_OTLP_ENDPOINT
    def endpoint
      "http://127.0.0.1:#{@server.addr[1]}"
    end

    def close
      @server.close
      @thread.join(1)
    end

    private

    def serve
      loop do
        connection = @server.accept
        body = read_request(connection)
        connection.write("HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n" \
                         "Connection: close\r\n\r\n")
        connection.close
        export_request(body).each { |span| @spans << span }
      end
    rescue IOError, Errno::EBADF
      nil
    end

    def read_request(connection)
      head = +""
      head << connection.readpartial(4096) until head.include?("\r\n\r\n")
      head, body = head.split("\r\n\r\n", 2)
      length = head[/^content-length:\s*(\d+)/i, 1].to_i
      body << connection.read(length - body.bytesize) while body.bytesize < length
      body.b
    end

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
