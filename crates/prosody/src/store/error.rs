//! What every state store call returns: [`StoreError`] in a [`StoreFuture`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A driver's error, kept as the source of a [`StoreError`] so the driver's
/// types stay out of Prosody's API. Shared, so one failure of a batched write
/// can be reported to every caller in the batch.
pub(crate) type ErrorSource = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// An error that is only a message, for failures the driver did not report.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Reason(pub(crate) String);

/// `error` as an [`ErrorSource`].
pub(crate) fn source(error: impl std::error::Error + Send + Sync + 'static) -> ErrorSource {
    Arc::new(error)
}

/// What a state store (timers, deduplication records) can fail with.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database cannot be reached or cannot serve right now: connection
    /// refused or lost, server shutting down, timeout, too many connections.
    /// Retriable: the store reconnects on the next call.
    #[error("state store unavailable ({operation}): {source}")]
    Unavailable {
        /// What the store was doing.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: ErrorSource,
    },

    /// The store is configured wrongly: a malformed `database_url`, an
    /// unsupported TLS mode, bad credentials, a missing database. Never contains
    /// the URL itself, which may hold a password.
    #[error("invalid database_url: {reason}")]
    Configuration {
        /// What is wrong.
        reason: String,
    },

    /// The database holds a newer schema (of timers or deduplication records) than this version of Prosody
    /// understands; upgrade Prosody rather than risk writing an old layout.
    #[error(
        "timer schema version {found} is newer than the supported {supported}; upgrade prosody"
    )]
    SchemaTooNew {
        /// The version recorded in the database.
        found: i32,
        /// The newest version this build knows.
        supported: i32,
    },

    /// The database rejected a statement for a reason retrying will not fix.
    #[error("state store query failed ({operation}): {source}")]
    Query {
        /// What the store was doing.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: ErrorSource,
    },
}

impl StoreError {
    /// True when the same call may succeed later (the database is down or
    /// overloaded); false for configuration and schema problems and for
    /// statements the database rejects.
    pub fn is_retriable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// The future every store method returns ([`crate::TimerStore`] and the
/// deduplication store): boxed so the traits stay object safe
/// (`Arc<dyn TimerStore>`) without an async-trait dependency.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A [`StoreError::Query`] for `operation` caused by `error`.
pub(crate) fn query_error(
    operation: &'static str,
    error: impl std::error::Error + Send + Sync + 'static,
) -> StoreError {
    StoreError::Query {
        operation,
        source: source(error),
    }
}
