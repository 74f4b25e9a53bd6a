# frozen_string_literal: true

module ProsodySpec
  # Watches handler calls for per-key order and overlap, and measures how many
  # calls run at once. Thread-safe; handlers wrap their work in {#track}.
  class OrderTracker
    def initialize
      @lock = Mutex.new
      @active = {}
      @last_offset = {}
      @per_key = Hash.new(0)
      @in_flight = 0
      @max_in_flight = 0
      @handled = 0
      @violations = []
    end

    def track(message)
      enter(message)
      begin
        yield
      ensure
        leave(message)
      end
    end

    # @return [Array<String>] descriptions of order or overlap violations
    def violations
      @lock.synchronize { @violations.dup }
    end

    # @return [Integer] the most calls seen running at once
    def max_in_flight
      @lock.synchronize { @max_in_flight }
    end

    # @return [Integer] calls finished
    def handled
      @lock.synchronize { @handled }
    end

    # @return [Hash{String=>Integer}] calls finished per key
    def per_key
      @lock.synchronize { @per_key.dup }
    end

    private

    def enter(message)
      @lock.synchronize do
        key = message.key
        @violations << "key #{key}: offset #{message.offset} started while #{@active[key]} ran" if @active.key?(key)
        last = @last_offset[key]
        @violations << "key #{key}: offset #{message.offset} came after #{last}" if last && message.offset <= last
        @active[key] = message.offset
        @last_offset[key] = message.offset
        @in_flight += 1
        @max_in_flight = [@max_in_flight, @in_flight].max
      end
    end

    def leave(message)
      @lock.synchronize do
        @active.delete(message.key) if @active[message.key] == message.offset
        @in_flight -= 1
        @handled += 1
        @per_key[message.key] += 1
      end
    end
  end
end
