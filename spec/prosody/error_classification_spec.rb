# frozen_string_literal: true

RSpec.describe Prosody::ErrorClassification do
  # A handler class whose on_message raises the exception it is given as the message.
  def raising_handler(parent = Prosody::EventHandler, &macros)
    Class.new(parent) do
      def on_message(_context, error) = raise(error)
      class_eval(&macros) if macros
    end
  end

  # What calling on_message with `error` raises.
  def raised_by(klass, error, method_name: :on_message)
    klass.new.public_send(method_name, nil, error)
  rescue Exception => e # rubocop:disable Lint/RescueException
    e
  else
    raise "expected #{klass} to raise"
  end

  let(:validation_error) { Class.new(ArgumentError) }

  it "re-raises a permanent exception as PermanentError, keeping the original" do
    klass = raising_handler { permanent :on_message, KeyError }
    original = KeyError.new("no account 42")
    original.set_backtrace(["app/handler.rb:7:in `charge'"])

    error = raised_by(klass, original)
    expect(error).to be_a(Prosody::PermanentError)
    expect(error.message).to eq("KeyError: no account 42")
    expect(error.cause).to be(original)
    expect(error.backtrace.first).to eq("app/handler.rb:7:in `charge'")
  end

  it "re-raises a transient exception as TransientError" do
    klass = raising_handler { transient :on_message, IOError }
    error = raised_by(klass, IOError.new("closed stream"))
    expect(error).to be_a(Prosody::TransientError)
    expect(error.message).to eq("IOError: closed stream")
    expect(error.cause).to be_a(IOError)
  end

  it "matches subclasses of a listed class, like rescue" do
    klass = raising_handler { permanent :on_message, ArgumentError }
    expect(raised_by(klass, validation_error.new("bad"))).to be_a(Prosody::PermanentError)
  end

  it "leaves unclassified exceptions unchanged (the core treats them as transient)" do
    klass = raising_handler { permanent :on_message, KeyError }
    original = RuntimeError.new("database is down")
    expect(raised_by(klass, original)).to be(original)
    expect(klass.error_classification(:on_message, original)).to be_nil
  end

  it "never reclassifies PermanentError or TransientError raised by the handler" do
    klass = raising_handler { transient :on_message, StandardError }
    permanent = Prosody::PermanentError.new("poison")
    expect(raised_by(klass, permanent)).to be(permanent)
  end

  it "lets cancellation (Async::Stop) through untouched" do
    klass = raising_handler { permanent :on_message, StandardError }
    stop = Async::Stop.new
    expect(raised_by(klass, stop)).to be(stop)
  end

  it "works when the macro comes after the method definition" do
    klass = Class.new(Prosody::EventHandler) do
      def on_message(_context, error) = raise(error)
      permanent :on_message, KeyError
    end
    expect(raised_by(klass, KeyError.new("k"))).to be_a(Prosody::PermanentError)
  end

  it "classifies on_timer separately from on_message" do
    klass = Class.new(Prosody::EventHandler) do
      permanent :on_timer, KeyError
      def on_message(_context, error) = raise(error)
      def on_timer(_context, error) = raise(error)
    end
    expect(raised_by(klass, KeyError.new("t"), method_name: :on_timer)).to be_a(Prosody::PermanentError)
    expect(raised_by(klass, KeyError.new("m"))).to be_a(KeyError)
  end

  it "lets the latest rule of a class win" do
    klass = raising_handler do
      permanent :on_message, StandardError
      transient :on_message, IOError
    end
    expect(raised_by(klass, IOError.new("retry me"))).to be_a(Prosody::TransientError)
    expect(raised_by(klass, KeyError.new("give up"))).to be_a(Prosody::PermanentError)
  end

  describe "inheritance" do
    let(:parent) { raising_handler { permanent :on_message, KeyError } }

    it "applies the parent's rules to a subclass that overrides the method" do
      child = Class.new(parent) do
        def on_message(_context, error) = raise(error)
      end
      expect(raised_by(child, KeyError.new("k"))).to be_a(Prosody::PermanentError)
    end

    it "applies the parent's rules to a subclass that calls super" do
      child = Class.new(parent) do
        def on_message(context, error)
          raise ArgumentError, "expected an exception to raise" unless error.is_a?(Exception)

          super
        end
      end
      expect(raised_by(child, KeyError.new("k"))).to be_a(Prosody::PermanentError)
    end

    it "lets a subclass add rules without changing the parent" do
      child = Class.new(parent) do
        permanent :on_message, IOError
        def on_message(_context, error) = raise(error)
      end
      expect(raised_by(child, IOError.new("io"))).to be_a(Prosody::PermanentError)
      expect(raised_by(child, KeyError.new("k"))).to be_a(Prosody::PermanentError)
      expect(raised_by(parent, IOError.new("io"))).to be_a(IOError)
    end

    it "lets a subclass reclassify what its parent declared" do
      child = Class.new(parent) { transient :on_message, KeyError }
      expect(raised_by(child, KeyError.new("k"))).to be_a(Prosody::TransientError)
      expect(raised_by(parent, KeyError.new("k"))).to be_a(Prosody::PermanentError)
    end

    it "reaches subclasses defined before the parent's macro" do
      base = raising_handler
      child = Class.new(base) do
        def on_message(_context, error) = raise(error)
      end
      base.permanent :on_message, KeyError
      expect(raised_by(child, KeyError.new("k"))).to be_a(Prosody::PermanentError)
    end

    it "keeps unclassified errors unchanged in subclasses" do
      child = Class.new(parent) { permanent :on_message, IOError }
      original = ZeroDivisionError.new("divided by 0")
      expect(raised_by(child, original)).to be(original)
    end
  end

  describe "declarations" do
    it "rejects methods other than on_message and on_timer" do
      expect { raising_handler { permanent :on_mesage, KeyError } }.to raise_error(ArgumentError, /on_mesage/)
    end

    it "needs at least one exception class" do
      expect { raising_handler { transient :on_message } }.to raise_error(ArgumentError, /at least one/)
    end

    it "rejects things that are not exception classes" do
      expect { raising_handler { permanent :on_message, "KeyError" } }.to raise_error(ArgumentError, /KeyError/)
      expect { raising_handler { permanent :on_message, String } }.to raise_error(ArgumentError, /String/)
    end

    it "reports the classification of an exception" do
      klass = raising_handler do
        permanent :on_message, KeyError
        transient :on_message, IOError
      end
      expect(klass.error_classification(:on_message, KeyError.new)).to eq(:permanent)
      expect(klass.error_classification(:on_message, IOError.new)).to eq(:transient)
      expect(klass.error_classification(:on_timer, KeyError.new)).to be_nil
    end
  end

  it "classifies errors of handlers run by the processor, which report them to the core" do
    klass = Class.new(Prosody::EventHandler) do
      permanent :on_message, KeyError
      def on_message(_context, message) = message.payload.fetch("amount")
    end
    processor = Prosody::AsyncTaskProcessor.new(klass.new).start
    completion = ProsodySpec::FakeCompletion.new
    logs = capture_logs do
      processor.submit(1, ProsodySpec::FakeNativeContext.new, Prosody::Message.new("t", 0, 1, "k", nil, {}, {}),
                       completion)
      completion.outcome
    end
    expect(completion.outcome).to be_a(Prosody::PermanentError)
    expect(completion.outcome.message).to include("KeyError", "amount")
    expect(logs.string).to include("Prosody::PermanentError: KeyError")
  ensure
    processor&.stop
  end
end
