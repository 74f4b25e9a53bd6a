# frozen_string_literal: true

module ProsodySpec
  # Helpers included in every example group.
  module Helpers
    # A topic (or group) name no other example uses.
    #
    # @param prefix [String]
    # @return [String]
    def unique_name(prefix = "spec")
      "#{prefix}-#{SecureRandom.hex(6)}"
    end

    # @return [Float] seconds on the monotonic clock
    def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)

    # Polls `condition` until it is truthy; fails the example at the deadline.
    #
    # @param timeout [Numeric] seconds
    # @param interval [Numeric] seconds between polls
    # @param description [String, nil] what was awaited, for the failure message
    # @return [Object] the truthy value
    def wait_for(timeout: 15, interval: 0.01, description: nil)
      deadline = now + timeout
      loop do
        result = yield
        return result if result

        if now > deadline
          raise RSpec::Expectations::ExpectationNotMetError,
                "timed out after #{timeout}s waiting for #{description || "the condition"}"
        end

        sleep(interval)
      end
    end

    # A loopback port nothing listens on (bound, then released).
    #
    # @return [Integer]
    def free_port
      server = TCPServer.new("127.0.0.1", 0)
      server.addr[1]
    ensure
      server&.close
    end

    # A client on the mock cluster whose topic exists; unsubscribed after the example.
    # A producer-only client (no group_id) gets a source_system, which the
    # native side requires to name it in the source-system header. The send
    # timeout is generous because a fresh client's first send waits for the
    # idempotent producer's id, which librdkafka retries on a 500ms timer.
    #
    # @param topic [String, nil] created with `partitions` partitions when given
    # @param partitions [Integer]
    # @param options [Hash] more client options (group_id, subscribed_topics, ...)
    # @return [Prosody::Client]
    def mock_client(topic: nil, partitions: 1, **options)
      Prosody::MockCluster.create_topic(topic, partitions:) if topic
      options = { source_system: "prosody-spec" }.merge(options) unless options.key?(:group_id)
      # Many clients run at once here; probe servers would fight over port 8000.
      options = { send_timeout: 10, probe_port: false }.merge(options)
      client = Prosody::Client.new(mock: true, **options)
      clients << client
      client
    end

    # A consumer of `topic` in its own group (topic created first). Its
    # source_system differs from its group so that it sees what it sends itself
    # (by default a group skips its own messages: loop prevention).
    #
    # @return [Prosody::Client]
    def mock_consumer(topic, partitions: 1, **options)
      mock_client(topic:, partitions:, group_id: unique_name("group"), subscribed_topics: topic,
                  source_system: "prosody-spec", **options)
    end

    # Subscribes a consumer of `topic` (in its own group) that pushes every
    # message it receives onto the returned Queue; used to read back what a
    # client sent, e.g. to a failure topic.
    #
    # @return [Thread::Queue] of Prosody::Message
    def collect(topic, partitions: 1)
      received = Queue.new
      mock_consumer(topic, partitions:).subscribe(handler { |_context, message| received << message })
      received
    end

    # The next item of `queue`, waiting up to `timeout` seconds for it.
    #
    # @return [Object]
    def next_item(queue, timeout: 15, description: "the next item")
      wait_for(timeout:, description:) do
        queue.pop(true)
      rescue ThreadError
        nil
      end
    end

    # Everything in `queue` right now, without waiting.
    #
    # @return [Array]
    def drain(queue)
      Array.new(queue.size) { queue.pop }
    end

    # What `handled` received until `last` arrived (waits for it), in order.
    #
    # @return [Array]
    def handled_until(handled, last)
      seen = []
      wait_for(description: "#{last.inspect} handled") do
        seen.concat(drain(handled))
        seen.include?(last)
      end
      seen
    end

    # A handler that runs the block for each message.
    #
    # @return [ProsodySpec::BlockHandler]
    def handler(&)
      BlockHandler.new(&)
    end

    # Runs the block with Prosody.logger writing to a StringIO; returns what was logged.
    #
    # @return [StringIO]
    def capture_logs(level: Logger::DEBUG)
      previous = Prosody.logger
      output = StringIO.new
      Prosody.logger = Logger.new(output, level:)
      yield output
      output
    ensure
      Prosody.logger = previous
    end

    # Sends `count` messages from as many fibers at once, inside Async; keys
    # cycle through `keys`. Returns once every send was acknowledged.
    #
    # @return [void]
    def send_concurrently(client, topic, count, keys:, payload: ->(index) { { "seq" => index } })
      Async do |task|
        count.times.map do |index|
          task.async { client.send_message(topic, keys[index % keys.size], payload.call(index)) }
        end.each(&:wait)
      end.wait # re-raises a failed send (a top-level Async task keeps its error)
    end

    # @return [Array<Prosody::Client>]
    def clients
      @clients ||= []
    end

    # Unsubscribes every client made by {#mock_client}.
    def cleanup_clients
      clients.each(&:unsubscribe)
      clients.clear
    end
  end
end
