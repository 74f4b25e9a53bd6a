# frozen_string_literal: true

module Prosody
  # Base class of every error Prosody raises; `rescue Prosody::Error` catches them all.
  class Error < StandardError; end

  # Raised when an option is unknown, has the wrong type or an impossible value;
  # the message names the option.
  class ConfigurationError < Error; end

  # Raised by send_message when the topic, key, payload or headers cannot be sent
  # (missing key, payload that is not JSON, header that is not a String).
  class InvalidMessageError < Error; end

  # Raised by send_message when the broker refused or lost the message.
  class SendError < Error; end

  # Raised by send_message when the broker did not acknowledge within send_timeout.
  class SendTimeoutError < SendError; end

  # Raised when Kafka (librdkafka) reports a failure outside of sending.
  class KafkaError < Error; end

  # Raised when a call does not fit the client's state (e.g. subscribing twice).
  class StateError < Error; end

  # Raised when the in-process mock cluster cannot start or create a topic.
  class MockClusterError < Error; end

  # Raise (or subclass) from a handler for failures that retrying cannot fix.
  class PermanentError < Error; end

  # Raise (or subclass) from a handler for failures worth retrying; the default for other errors.
  class TransientError < Error; end

  # Named in logs and dead-letter headers (prosody-error-class) when a handler
  # ran past `timeout` and was cancelled; retried like a transient failure.
  class TimeoutError < TransientError; end

  # Reported for a handler call that was stopped by cancellation (revocation,
  # timeout, shutdown) before it finished.
  class CancelledError < Error; end

  # Raised by the timer calls of Context when given something that is not a Time.
  class TimerError < Error; end

  # Raised by the timer calls of Context when the timer store (PostgreSQL) is
  # unreachable or fails; the same call may succeed once the database is back.
  class StoreError < Error; end

  # Raised when the native bridge is unavailable (process exiting, or a client
  # used in a child after fork).
  class BridgeError < Error; end
end
