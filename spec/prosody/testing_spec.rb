# frozen_string_literal: true

require "prosody/testing"

RSpec.describe Prosody::Testing do
  let(:classified_handler) do
    Class.new(Prosody::EventHandler) do
      permanent :on_message, KeyError
      transient :on_message, StopIteration

      def on_message(context, message)
        case message.payload.fetch("do")
        when "ok" then context.schedule(Time.at(1_700_000_000))
        when "key" then {}.fetch(:missing)
        when "stop" then raise StopIteration, "done"
        when "plain" then raise ArgumentError, "bad"
        when "permanent" then raise Prosody::PermanentError, "invalid"
        when "exit" then exit(3)
        end
      end
    end
  end

  describe ".deliver" do
    it "reports :ok and gives the handler a real Context whose timers are inspectable" do
      result = described_class.deliver(classified_handler.new, topic: "orders", key: "k", payload: { do: "ok" })
      expect(result).to be_ok
      expect(result.error).to be_nil
      expect(result.context).to be_a(Prosody::Context)
      expect(result.context.scheduled).to eq([Time.at(1_700_000_000)])
      expect(result.timers.scheduled("k")).to eq([Time.at(1_700_000_000)])
      expect(result.subject).to have_attributes(topic: "orders", key: "k", partition: 0, offset: 0,
                                                payload: { "do" => "ok" })
    end

    it "classifies like the consumer: macros, PermanentError, unclassified errors are transient" do
      outcomes = %w[key stop plain permanent].to_h do |action|
        result = described_class.deliver(classified_handler.new, topic: "t", key: "k", payload: { "do" => action })
        [action, [result.outcome, result.error.class, result.error.cause&.class]]
      end
      expect(outcomes).to eq(
        "key" => [:permanent, Prosody::PermanentError, KeyError],
        "stop" => [:transient, Prosody::TransientError, StopIteration],
        "plain" => [:transient, ArgumentError, nil],
        "permanent" => [:permanent, Prosody::PermanentError, nil]
      )
    end

    it "reports the same exception the consumer's processor reports for each call" do
      processor = Prosody::AsyncTaskProcessor.new(classified_handler.new).start
      capture_logs do # the processor logs each failure
        %w[ok key stop plain permanent].each do |action|
          completion = ProsodySpec::FakeCompletion.new
          message = Prosody::Message.new("t", 0, 0, "k", nil, { "do" => action }, {})
          native = described_class::NativeContext.new("k", described_class::Timers.new)
          processor.submit(1, native, message, completion)
          consumer = completion.outcome
          testing = described_class.deliver(classified_handler.new, topic: "t", key: "k", payload: { "do" => action })
          expect([testing.error.class, testing.error&.message]).to eq([consumer.class, consumer&.message]), action
          expect(testing.permanent?).to eq(consumer.is_a?(Prosody::PermanentError)), action
        end
      ensure
        processor.stop
      end
    end

    it "turns exit into a transient cancellation, as the consumer runs the message again" do
      result = described_class.deliver(classified_handler.new, topic: "t", key: "k", payload: { "do" => "exit" })
      expect(result).to be_transient
      expect(result.error).to be_a(Prosody::CancelledError)
    end

    it "runs the handler in a fiber, at top level or inside a running reactor" do
      sleeper = handler do |context, _message|
        Async::Task.current.sleep(0.01)
        context.schedule(Time.at(5))
      end
      expect(described_class.deliver(sleeper, topic: "t", key: "k", payload: nil)).to be_ok
      inside = Async { described_class.deliver(sleeper, topic: "t", key: "k", payload: nil) }.wait
      expect(inside).to be_ok
      expect(inside.context.scheduled).to eq([Time.at(5)])
    end

    it "raises TimerError from the context for a time that is not a Time, as the real context does" do
      result = described_class.deliver(handler { |context, _| context.schedule(5) }, topic: "t", key: "k", payload: 1)
      expect(result).to be_transient
      expect(result.error).to be_a(Prosody::TimerError)
    end

    it "shares timers across deliveries given the same store, per key" do
      timers = described_class::Timers.new
      rescheduler = handler do |context, message|
        context.clear_and_schedule(Time.at(message.payload))
        context.schedule(Time.at(message.payload + 10))
        context.unschedule(Time.at(message.payload + 10)) if message.payload > 100
      end
      described_class.deliver(rescheduler, topic: "t", key: "a", payload: 1, timers:)
      described_class.deliver(rescheduler, topic: "t", key: "b", payload: 2, timers:)
      described_class.deliver(rescheduler, topic: "t", key: "a", payload: 200, timers:)
      expect(timers.scheduled("a")).to eq([Time.at(200)])
      expect(timers.scheduled("b")).to eq([Time.at(2), Time.at(12)])
    end
  end

  describe ".fire_timers" do
    let(:reminder) do
      Class.new(Prosody::EventHandler) do
        attr_reader :fired

        def initialize(fail_times: 0)
          super()
          @fired = []
          @fail_times = fail_times
        end

        def on_message(context, message)
          message.payload.each { |at| context.schedule(Time.at(at)) }
        end

        def on_timer(context, timer)
          @fired << [timer.key, timer.time.to_i, context.scheduled.map(&:to_i)]
          raise IOError, "mail server down" if (@fail_times -= 1) >= 0
        end
      end
    end

    it "fires due timers earliest first, listed while they run, deleted once handled" do
      handler = reminder.new
      result = described_class.deliver(handler, topic: "t", key: "k", payload: [30, 10, 20])
      fired = described_class.fire_timers(handler, result, now: Time.at(20))
      expect(fired.map(&:outcome)).to eq(%i[ok ok])
      expect(fired.map { |call| call.subject.time.to_i }).to eq([10, 20])
      expect(handler.fired).to eq([["k", 10, [10, 20, 30]], ["k", 20, [20, 30]]])
      expect(result.context.scheduled).to eq([Time.at(30)])
      expect(described_class.fire_timers(handler, result.timers, now: nil).map(&:outcome)).to eq([:ok])
      expect(result.context.scheduled).to be_empty
    end

    it "keeps a timer whose call failed transiently, to be retried" do
      handler = reminder.new(fail_times: 1)
      result = described_class.deliver(handler, topic: "t", key: "k", payload: [10])
      first = described_class.fire_timers(handler, result)
      expect(first.map(&:outcome)).to eq([:transient])
      expect(first.first.error).to be_a(IOError)
      expect(result.context.scheduled).to eq([Time.at(10)])
      expect(described_class.fire_timers(handler, result).map(&:outcome)).to eq([:ok])
      expect(result.context.scheduled).to be_empty
    end
  end

  describe ".capture and have_sent_message" do
    let(:topic) { unique_name("capture") }

    it "returns what clients sent inside the block, from any thread, as a consumer decodes it" do
      client = mock_client(topic:)
      client.send_message(topic, "before", { "n" => 0 })
      sent = described_class.capture do
        client.send_message(topic, "k1", { n: 1 }, headers: { "origin" => "spec" })
        Thread.new { client.send_message(topic, "k2", [2]) }.join
      end
      client.send_message(topic, "after", { "n" => 3 })
      expect(sent.map(&:to_h)).to contain_exactly(
        { topic:, key: "k1", payload: { "n" => 1 }, headers: { "origin" => "spec" }, client: },
        { topic:, key: "k2", payload: [2], headers: {}, client: }
      )
    end

    it "does not record a send the client refused" do
      client = mock_client(topic:)
      sent = described_class.capture do
        expect { client.send_message(topic, nil, {}) }.to raise_error(Prosody::InvalidMessageError)
      end
      expect(sent).to be_empty
    end

    it "matches a block or a list with values and composed matchers, and says what was sent otherwise" do
      client = mock_client(topic:)
      expect { client.send_message(topic, "order-7", { total: 12.5, lines: 2 }) }
        .to have_sent_message(topic, key: "order-7", payload: hash_including("total" => 12.5))
      expect { client.send_message(topic, "order-8", {}) }.not_to have_sent_message(topic, key: "order-7")

      sent = described_class.capture { client.send_message(topic, "order-9", { "total" => 1 }) }
      expect(sent).to have_sent_message(a_string_starting_with("capture-"), key: /order-\d/)

      matcher = have_sent_message(topic, payload: hash_including("total" => 99))
      expect(matcher.matches?(sent)).to be(false)
      expect(matcher.failure_message).to include("order-9", '{"total"=>1}')
      expect(have_sent_message(topic).matches?([])).to be(false)
      expect { have_sent_message(topic, body: 1) }.to raise_error(ArgumentError, /key, payload, headers/)
    end
  end
end
