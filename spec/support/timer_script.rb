# frozen_string_literal: true

module ProsodySpec
  # A handler for the timer specs: each message's payload says what to do
  # with its key's timers; fired timers and failed calls are recorded.
  class TimerScript < Prosody::EventHandler
    attr_reader :fired, :listed, :errors

    def initialize
      super()
      @fired = Queue.new
      @listed = {}
      @errors = Queue.new
    end

    def on_message(context, message)
      payload = message.payload
      at = Time.now + (payload.fetch("in_ms", 0) / 1000.0)
      case payload["op"]
      when "schedule" then context.schedule(at)
      when "replace" then context.clear_and_schedule(at)
      when "clear" then context.clear_scheduled
      when "list" then @listed[message.key] = context.scheduled
      when "bad" then context.schedule(payload["at"])
      end
    rescue Prosody::Error => e
      @errors << e
    end

    def on_timer(_context, timer)
      @fired << [timer.key, timer.time, Time.now]
    end
  end
end
