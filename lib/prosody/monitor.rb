# frozen_string_literal: true

module Prosody
  # Instrumentation: subscribe to what the consumer and producer do.
  #
  # Events from the native core (message received, handled, failed, retried,
  # dead-lettered or skipped; partition assigned or revoked; send delivered or
  # failed) and from Ruby (`processor.died`) reach subscribers on the monitor's
  # own thread, in batches, never on the consumer's: a slow subscriber delays
  # other subscribers only. A subscriber that raises is logged and the others
  # still run. Events nobody subscribed to are not even built.
  #
  # @example
  #   Prosody.monitor.subscribe("message.failed", "message.dead_lettered") do |event|
  #     warn "#{event.name}: #{event[:topic]}/#{event[:partition]}@#{event[:offset]} #{event[:error_message]}"
  #   end
  class Monitor
    # Events the native core sends.
    NATIVE_EVENTS = Native.monitor_events.freeze
    # Events Ruby code sends: the handler thread died (see {Client#stalled?}).
    RUBY_EVENTS = %w[processor.died].freeze
    # Every event name a subscriber may name.
    EVENTS = (NATIVE_EVENTS + RUBY_EVENTS).freeze
    # Events forwarded to ActiveSupport::Notifications by {#forward_to_active_support}
    # unless told otherwise: the ones that are not per message.
    ACTIVE_SUPPORT_EVENTS = %w[
      message.failed message.retried message.dead_lettered message.skipped
      partition.assigned partition.revoked send.failed processor.died consumer.stalled
    ].freeze

    def initialize
      @lock = Mutex.new
      @subscribers = {}.freeze
      @queue = nil
      @pid = nil
      @thread = nil
      @flushed = ConditionVariable.new
      @delivered = 0
    end

    # Calls the block with an {Event} for each event named (every event when none is named).
    #
    # @param names [Array<String>] from {EVENTS}
    # @yieldparam event [Event]
    # @return [Proc] the subscriber, for {#unsubscribe}
    # @raise [ArgumentError] for an unknown event name or a missing block
    def subscribe(*names, &subscriber)
      raise ArgumentError, "Prosody.monitor.subscribe needs a block" unless subscriber

      names = names.empty? ? EVENTS : names.map(&:to_s)
      unknown = names - EVENTS
      raise ArgumentError, "unknown event #{unknown.join(", ")} (known: #{EVENTS.join(", ")})" unless unknown.empty?

      start
      change { |subscribers| names.each { |name| subscribers[name] = [*subscribers[name], subscriber] } }
      subscriber
    end

    # Stops calling `subscriber`.
    #
    # @param subscriber [Proc] what {#subscribe} returned
    # @return [void]
    def unsubscribe(subscriber)
      change do |subscribers|
        subscribers.transform_values! { |list| list - [subscriber] }
        subscribers.reject! { |_, list| list.empty? }
      end
    end

    # @param name [String]
    # @return [Boolean] whether any subscriber wants `name`
    def subscribed?(name)
      @subscribers.key?(name)
    end

    # Sends an event from Ruby code to the subscribers (on the monitor's thread).
    #
    # @param name [String] from {RUBY_EVENTS}
    # @param payload [Hash{Symbol=>Object}]
    # @return [void]
    def instrument(name, payload = {})
      return unless subscribed?(name)

      start
      @queue.push([[name, payload]])
    end

    # Forwards events to ActiveSupport::Notifications as `"<event_with_underscores>.prosody"`
    # (e.g. `message_failed.prosody`), with the event's payload.
    #
    # @param names [Array<String>] the events to forward
    # @return [Proc] the forwarding subscriber
    def forward_to_active_support(names = ACTIVE_SUPPORT_EVENTS)
      subscribe(*names) do |event|
        ::ActiveSupport::Notifications.instrument("#{event.name.tr(".", "_")}.prosody", event.payload)
      end
    end

    # Waits until what was queued before the call has reached the subscribers.
    #
    # @param timeout [Numeric] seconds
    # @return [Boolean] false when it did not happen within `timeout`
    def flush(timeout: 5)
      start
      marker = Object.new
      deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
      @lock.synchronize do
        @queue.push(marker)
        until @last_marker.equal?(marker)
          left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
          return false if left <= 0

          @flushed.wait(@lock, left)
        end
      end
      true
    end

    # Starts the thread that calls subscribers (again in a forked child, whose
    # threads did not survive the fork), and points the native core at its queue.
    #
    # @return [void]
    def start
      return if @pid == Process.pid && @thread&.alive?

      @lock.synchronize do
        next if @pid == Process.pid && @thread&.alive?

        @pid = Process.pid
        @queue = Thread::Queue.new
        Native.monitor_queue = @queue
        @thread = Thread.new(@queue) { |queue| dispatch(queue) }
        @thread.name = "prosody-monitor"
      end
    end

    private

    # Copy-on-write: the monitor's thread reads the subscriber table without the lock.
    def change
      @lock.synchronize do
        subscribers = @subscribers.transform_values(&:dup)
        yield subscribers
        @subscribers = subscribers.transform_values(&:freeze).freeze
        Native.monitor_wants(@subscribers.keys & NATIVE_EVENTS)
      end
    end

    def dispatch(queue)
      loop do
        batch = queue.pop
        next flushed(batch) unless batch.is_a?(Array)

        batch.each { |name, payload| deliver(name, payload) }
      end
    end

    def flushed(marker)
      @lock.synchronize do
        @last_marker = marker
        @flushed.broadcast
      end
    end

    def deliver(name, payload)
      subscribers = @subscribers[name] or return
      event = Event.new(name, payload)
      subscribers.each do |subscriber|
        subscriber.call(event)
      rescue StandardError => e
        Prosody.logger.add(Logger::ERROR, "Prosody.monitor subscriber for #{name} raised #{e.class}: #{e.message}",
                           "prosody")
      end
    end
  end
end
