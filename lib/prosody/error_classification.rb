# frozen_string_literal: true

module Prosody
  # The `permanent` and `transient` class macros of {EventHandler}.
  #
  # The core decides what to do with a failed call by the exception's class: a
  # {PermanentError} is never retried, anything else is transient. These macros
  # let a handler say which of its own exceptions are which, without rescuing
  # them itself:
  #
  #   class InvoiceHandler < Prosody::EventHandler
  #     permanent :on_message, JSON::ParserError, Invoices::Invalid
  #     transient :on_message, Net::ReadTimeout
  #
  #     def on_message(context, message) = Invoices.record(message.payload)
  #   end
  #
  # How it works: the first macro call in a class prepends a module to it (and
  # to every subclass, now or later) that wraps the classified methods. A call
  # that raises a listed exception re-raises it as {PermanentError} or
  # {TransientError}, with the original as `cause`, its class and message in
  # the new message and its backtrace kept. Because the wrapper is prepended,
  # the macro may come before or after the method's `def`, and a subclass that
  # overrides the method is still wrapped.
  #
  # Precedence: the rules of the handler's own class are checked before those
  # of its parent (so a subclass can reclassify what its parent declared), and
  # within a class the latest declaration wins. An exception no rule matches is
  # raised unchanged (transient, unless it already is a {PermanentError}), and
  # {PermanentError} / {TransientError} raised by the handler are never
  # reclassified. Only StandardError and ScriptError descendants are rescued, so
  # cancellation (`Async::Stop`) passes through untouched.
  module ErrorClassification
    # Methods the macros can classify.
    CLASSIFIABLE = %i[on_message on_timer].freeze

    # Classification => the error class a matching exception becomes.
    ERROR_CLASSES = { permanent: PermanentError, transient: TransientError }.freeze
    private_constant :ERROR_CLASSES

    # Marks exceptions raised by `method_name` as permanent: not retried; sent
    # to `failure_topic` (or logged and skipped) at once.
    #
    # @param method_name [Symbol] :on_message or :on_timer
    # @param exception_classes [Array<Module>] exception classes (or modules) to match, as `rescue` would
    # @return [void]
    # @raise [ArgumentError] for another method or something that is not an exception class
    # @example
    #   permanent :on_message, ActiveRecord::RecordInvalid, KeyError
    def permanent(method_name, *exception_classes)
      declare(:permanent, method_name, exception_classes)
    end

    # Marks exceptions raised by `method_name` as transient: retried with backoff.
    # Only needed to override a broader `permanent` rule (of this class or a
    # parent): unclassified exceptions are transient already.
    #
    # @param method_name [Symbol] :on_message or :on_timer
    # @param exception_classes [Array<Module>]
    # @return [void]
    # @raise [ArgumentError] for another method or something that is not an exception class
    # @example
    #   permanent :on_message, StandardError
    #   transient :on_message, Net::ReadTimeout
    def transient(method_name, *exception_classes)
      declare(:transient, method_name, exception_classes)
    end

    # How the macros of this class and its ancestors classify `error` raised by
    # `method_name`.
    #
    # @param method_name [Symbol]
    # @param error [Exception]
    # @return [Symbol, nil] :permanent, :transient, or nil when no rule matches
    def error_classification(method_name, error)
      own = error_rules.fetch(method_name, []).reverse_each.find { |_, matchers| matches?(matchers, error) }
      return own.first if own

      parent = superclass
      parent.error_classification(method_name, error) if parent.respond_to?(:error_classification)
    end

    # Keeps wrapping the classified methods in subclasses.
    #
    # @api private
    def inherited(subclass)
      super
      classified_methods.each { |method_name| subclass.__send__(:wrap_for_classification, method_name) }
    end

    private

    # method name => [[classification, exception classes], ...] declared in this class itself.
    def error_rules
      @error_rules ||= {}
    end

    # Methods wrapped in this class (declared here or inherited).
    def classified_methods
      @classified_methods ||= []
    end

    # Matches the way `rescue` does (Module#===).
    def matches?(matchers, error)
      case error
      when *matchers then true
      else false
      end
    end

    def declare(classification, method_name, exception_classes)
      check_declaration(method_name, exception_classes)
      (error_rules[method_name] ||= []) << [classification, exception_classes.dup.freeze]
      wrap_for_classification(method_name)
      nil
    end

    def check_declaration(method_name, exception_classes)
      unless CLASSIFIABLE.include?(method_name)
        raise ArgumentError, "only #{CLASSIFIABLE.map(&:inspect).join(" and ")} can be classified, " \
                             "got #{method_name.inspect}"
      end
      raise ArgumentError, "name at least one exception class for #{method_name}" if exception_classes.empty?

      wrong = exception_classes.reject { |matcher| exception_matcher?(matcher) }
      raise ArgumentError, "expected exception classes, got #{wrong.map(&:inspect).join(", ")}" unless wrong.empty?
    end

    # An exception class, or a module (which `rescue` matches through `===`).
    def exception_matcher?(matcher)
      matcher.is_a?(Class) ? matcher <= Exception : matcher.is_a?(Module)
    end

    # Installs the wrapper for `method_name` here and in every existing subclass
    # (later subclasses get it through {#inherited}).
    def wrap_for_classification(method_name)
      return if classified_methods.include?(method_name)

      classified_methods << method_name
      classification_wrapper.define_method(method_name) do |*args, &block|
        super(*args, &block)
      rescue PermanentError, TransientError
        raise
      rescue StandardError, ScriptError => e
        classification = self.class.error_classification(method_name, e)
        raise unless classification

        raise ERROR_CLASSES.fetch(classification), "#{e.class}: #{e.message}", e.backtrace
      end
      subclasses.each { |subclass| subclass.__send__(:wrap_for_classification, method_name) }
    end

    def classification_wrapper
      @classification_wrapper ||= Module.new.tap { |wrapper| prepend(wrapper) }
    end
  end
end
