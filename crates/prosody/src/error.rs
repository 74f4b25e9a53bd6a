//! The crate's one error type.

use std::time::Duration;

use rdkafka::error::KafkaError;

use crate::store::StoreError;

/// Everything that can go wrong in Prosody's own API.
///
/// Handler failures are not in here: a handler reports them through its own
/// error type (see [`crate::ClassifyError`]), and Prosody decides what to do
/// with them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An option is missing, malformed or impossible. `option` is the option's name.
    #[error("invalid option `{option}`: {reason}")]
    Configuration {
        /// The option at fault, as spelled in the options table.
        option: String,
        /// What is wrong with it.
        reason: String,
    },

    /// librdkafka reported an error.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),

    /// The broker did not acknowledge a message within `send_timeout`.
    #[error("sending to `{topic}` timed out after {timeout:?}")]
    SendTimeout {
        /// Destination topic.
        topic: String,
        /// The configured `send_timeout`.
        timeout: Duration,
    },

    /// A message cannot be sent as given (e.g. it sets the `source-system`
    /// header, which Prosody writes itself from the `source_system` option).
    #[error("invalid message: {0}")]
    InvalidMessage(String),

    /// A payload could not be encoded as JSON.
    #[error("payload is not valid JSON: {0}")]
    Payload(#[from] serde_json::Error),

    /// `subscribe` was called while a subscription is running.
    #[error("already subscribed; call unsubscribe first")]
    AlreadySubscribed,

    /// The client was built outside a tokio runtime, or its runtime is gone.
    #[error("no tokio runtime: create the client from inside a tokio runtime")]
    NoRuntime,

    /// The in-process mock cluster could not be started or changed.
    #[error("mock cluster: {0}")]
    Mock(String),

    /// A thread Prosody needs could not be started (the process is out of
    /// threads or memory).
    #[error("cannot start the {name} thread: {source}")]
    Thread {
        /// The thread's name.
        name: &'static str,
        /// Why the operating system refused.
        #[source]
        source: std::io::Error,
    },

    /// The state store (timers, deduplication records) failed; see [`StoreError::is_retriable`].
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Error {
    pub(crate) fn config(option: &str, reason: impl Into<String>) -> Self {
        Self::Configuration {
            option: option.to_owned(),
            reason: reason.into(),
        }
    }

    /// True when trying the same operation again may succeed (timeouts,
    /// transient broker errors); false for bad input and bad configuration.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::SendTimeout { .. } => true,
            Self::Store(error) => error.is_retriable(),
            Self::Kafka(error) => error.rdkafka_error_code().is_some_and(|code| {
                !matches!(
                    code,
                    rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge
                        | rdkafka::types::RDKafkaErrorCode::InvalidMessage
                        | rdkafka::types::RDKafkaErrorCode::TopicAuthorizationFailed
                )
            }),
            _ => false,
        }
    }
}

/// Shorthand for results carrying [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
