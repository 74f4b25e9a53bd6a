//! Mapping Rust errors to the `Prosody::Error` hierarchy (defined in lib/prosody/errors.rb).
//!
//! This is the one place that decides which Ruby class a failure becomes.

use magnus::{exception::ExceptionClass, prelude::*, Error, Exception, Ruby, Value};

/// Ruby exception classes the native code raises, by name under `Prosody`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Base,
    Configuration,
    InvalidMessage,
    Send,
    SendTimeout,
    Kafka,
    State,
    MockCluster,
    Store,
    Bridge,
    /// A handler call that did not run to its end (the processor stopped).
    Cancelled,
    /// A handler call that ran past its `timeout`.
    Timeout,
}

impl Kind {
    /// Every kind, so `classes::init` can resolve them all at load.
    pub(crate) const ALL: [Self; 12] = [
        Self::Base,
        Self::Configuration,
        Self::InvalidMessage,
        Self::Send,
        Self::SendTimeout,
        Self::Kafka,
        Self::State,
        Self::MockCluster,
        Self::Store,
        Self::Bridge,
        Self::Cancelled,
        Self::Timeout,
    ];

    pub(crate) fn class_name(self) -> &'static str {
        match self {
            Self::Base => "Error",
            Self::Configuration => "ConfigurationError",
            Self::InvalidMessage => "InvalidMessageError",
            Self::Send => "SendError",
            Self::SendTimeout => "SendTimeoutError",
            Self::Kafka => "KafkaError",
            Self::State => "StateError",
            Self::MockCluster => "MockClusterError",
            Self::Store => "StoreError",
            Self::Bridge => "BridgeError",
            Self::Cancelled => "CancelledError",
            Self::Timeout => "TimeoutError",
        }
    }
}

fn class(ruby: &Ruby, kind: Kind) -> ExceptionClass {
    crate::classes::error(ruby, kind)
}

/// A Ruby error of the given kind, ready to return from a native method.
pub(crate) fn error(ruby: &Ruby, kind: Kind, message: impl Into<String>) -> Error {
    Error::new(class(ruby, kind), message.into())
}

/// The Ruby error for a core error.
pub(crate) fn from_core(ruby: &Ruby, error: &prosody::Error) -> Error {
    self::error(ruby, kind_of(error), error.to_string())
}

fn kind_of(error: &prosody::Error) -> Kind {
    match error {
        prosody::Error::Configuration { .. } => Kind::Configuration,
        prosody::Error::Kafka(_) => Kind::Kafka,
        prosody::Error::SendTimeout { .. } => Kind::SendTimeout,
        prosody::Error::Payload(_) | prosody::Error::InvalidMessage(_) => Kind::InvalidMessage,
        prosody::Error::AlreadySubscribed => Kind::State,
        prosody::Error::Mock(_) => Kind::MockCluster,
        prosody::Error::Store(_) => Kind::Store,
        prosody::Error::NoRuntime => Kind::Bridge,
        prosody::Error::Thread { .. } => Kind::Base,
        _ => Kind::Base,
    }
}

/// The Ruby class that logs and dead-letter headers name for a failure the
/// core found itself rather than one a Ruby handler raised (see
/// `EventHandler::failure_class`).
pub(crate) fn failure_class(kind: prosody::FailureKind) -> String {
    let name = match kind {
        prosody::FailureKind::Timeout => Kind::Timeout.class_name(),
        prosody::FailureKind::BadInput => Kind::InvalidMessage.class_name(),
        _ => Kind::Base.class_name(),
    };
    format!("Prosody::{name}")
}

/// The Ruby class name of `kind`, with its namespace, for messages and headers.
pub(crate) fn qualified_name(kind: Kind) -> String {
    format!("Prosody::{}", kind.class_name())
}

/// An exception object (not raised) for a core error, to push onto a result queue.
/// Broker failures while sending become `SendError`, so `rescue Prosody::SendError`
/// catches every way a send can fail.
pub(crate) fn exception_for(ruby: &Ruby, error: &prosody::Error, sending: bool) -> Value {
    let kind = match (kind_of(error), sending) {
        (Kind::Kafka, true) => Kind::Send,
        (kind, _) => kind,
    };
    exception(ruby, kind, error.to_string())
}

/// An exception instance of the given kind (falls back to RuntimeError, which cannot fail).
pub(crate) fn exception(ruby: &Ruby, kind: Kind, message: String) -> Value {
    class(ruby, kind)
        .new_instance((message.clone(),))
        .or_else(|_| {
            ruby.exception_runtime_error()
                .new_instance((message.clone(),))
        })
        .map(|exception: Exception| exception.as_value())
        .unwrap_or_else(|_| ruby.str_new(&message).as_value())
}
