# frozen_string_literal: true

require "socket"
require "zlib"

module ProsodySpec
  # A local HTTP endpoint standing in for a service the code under test posts
  # to (Sentry, an OTLP collector): answers every request 200 with `reply`
  # (`[content type, body]`) and pushes each request's body, decompressed,
  # onto {#bodies}.
  class HttpReceiver
    # @return [Thread::Queue] request bodies, in arrival order
    attr_reader :bodies

    def initialize(reply: ["application/json", "{}"])
      @server = TCPServer.new("127.0.0.1", 0)
      @bodies = Queue.new
      @reply = reply
      @thread = Thread.new { serve }
    end

    # @return [Integer]
    def port
      @server.addr[1]
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
        type, answer = @reply
        connection.write("HTTP/1.1 200 OK\r\nContent-Type: #{type}\r\nContent-Length: #{answer.bytesize}\r\n" \
                         "Connection: close\r\n\r\n#{answer}")
        connection.close
        @bodies << body
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
      body = Zlib.gunzip(body) if head.match?(/^content-encoding:\s*gzip/i)
      body.b
    end
  end
end
