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
      case payload["op"]
      when "clear" then context.clear_scheduled
      when "list" then @listed[message.key] = context.scheduled
      else schedule(context, payload)
      end
    rescue Prosody::Error => e
      @errors << e
    end

    def on_timer(_context, timer)
      @fired << [timer.key, timer.time, Time.now]
    end

    private

    def schedule(context, payload)
      at = Time.now + (payload.fetch("in_ms", 0) / 1000.0)
      case payload["op"]
      when "schedule" then context.schedule(at)
      when "replace" then context.clear_and_schedule(at)
      when "bad" then context.schedule(payload["at"])
      when "schedule_at" then context.schedule(Time.at(payload.fetch("at_s")))
      end
    end
  end
end
