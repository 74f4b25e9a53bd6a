//! The crate's one error type.

use std::path::PathBuf;

use rdkafka::error::KafkaError;

/// Why a chaos run, the mock broker or the verifier could not do its job.
///
/// These are failures of the harness (a file that cannot be read, a process that
/// does not start); what the verifier finds wrong with Prosody is reported as
/// [`crate::Violation`]s instead.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A Kafka client operation failed.
    #[error("{context}: {source}")]
    Kafka {
        /// What was being done.
        context: String,
        /// rdkafka's error.
        #[source]
        source: KafkaError,
    },
    /// librdkafka's mock cluster refused a request.
    #[error("mock cluster: {0}")]
    Mock(String),
    /// A control command for the mock broker could not be parsed.
    #[error("bad broker command `{line}`: {reason}")]
    Command {
        /// The line as received.
        line: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A line of a record file is not a record.
    #[error("{}:{line}: {reason}", path.display())]
    Record {
        /// The record file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the line.
        reason: String,
    },
    /// The mock broker process misbehaved (did not start, refused a command, died).
    #[error("mock broker process: {0}")]
    Broker(String),
    /// A worker process could not be started or stopped.
    #[error("worker: {0}")]
    Worker(String),
    /// Bad command-line arguments.
    #[error("{0}")]
    Usage(String),
    /// Something observable did not happen before its deadline.
    #[error("timed out: {0}")]
    Timeout(String),
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::Io`] maker for `map_err`, naming what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    /// An [`Error::Kafka`] maker for `map_err`, naming what was being done.
    pub fn kafka(context: impl Into<String>) -> impl FnOnce(KafkaError) -> Error {
        let context = context.into();
        move |source| Error::Kafka { context, source }
    }
}
