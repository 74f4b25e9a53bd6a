//! The storage contract every timer store meets, and its error type.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// The unit timers belong to: one partition of one topic as consumed by one group.
///
/// A timer is owned by whoever owns its partition, so on a rebalance the new
/// owner loads the partition's timers by this scope. Two groups consuming the
/// same topic keep separate timers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartitionScope {
    /// The consumer group (`group_id`).
    pub group: Arc<str>,
    /// The topic.
    pub topic: Arc<str>,
    /// The partition within `topic`.
    pub partition: i32,
}

impl PartitionScope {
    /// A scope for `partition` of `topic` consumed by `group`.
    pub fn new(group: impl Into<Arc<str>>, topic: impl Into<Arc<str>>, partition: i32) -> Self {
        Self {
            group: group.into(),
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for PartitionScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.group, self.topic, self.partition)
    }
}

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

/// What a timer store can fail with.
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

    /// The database holds a newer timer schema than this version of Prosody
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

/// The future every [`TimerStore`] method returns: boxed so the trait stays
/// object safe (`Arc<dyn TimerStore>`) without an async-trait dependency.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Durable storage for per-key timers.
///
/// A timer is a `(scope, key, at_ms)` triple; `at_ms` is milliseconds since the
/// Unix epoch. A key may hold many timers, but at most one per millisecond:
/// scheduling the same time twice is one timer. Stores only store: firing,
/// retrying and in-memory windows belong to the consumer.
///
/// Ordering is by time, then by key compared as bytes (Rust's `str` order), in
/// every store, so the consumer sees the same order in mock mode as with
/// PostgreSQL.
pub trait TimerStore: Send + Sync + fmt::Debug {
    /// Adds a timer. Returns true when it is new, false when the key already had
    /// a timer at `at_ms` (which is left as it is).
    fn schedule<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
        at_ms: i64,
    ) -> StoreFuture<'a, bool>;

    /// Removes the timer at `at_ms`. Returns whether it existed. This is also
    /// how a fired timer is deleted once `on_timer` has succeeded.
    fn unschedule<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
        at_ms: i64,
    ) -> StoreFuture<'a, bool>;

    /// Removes every timer of `key`; returns how many there were.
    fn clear<'a>(&'a self, scope: &'a PartitionScope, key: &'a str) -> StoreFuture<'a, u64>;

    /// Replaces every timer of `key` with one at `at_ms`, atomically: no reader
    /// and no crash sees the key with neither its old timers nor the new one.
    /// Returns how many timers were removed (not counting one already at `at_ms`).
    fn clear_and_schedule<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
        at_ms: i64,
    ) -> StoreFuture<'a, u64>;

    /// The times of `key`'s timers, earliest first.
    fn scheduled<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
    ) -> StoreFuture<'a, Vec<i64>>;

    /// At most `limit` timers of the partition with `at_ms < before_ms`, ordered
    /// by time then key: what the consumer loads to fire soon.
    fn due<'a>(
        &'a self,
        scope: &'a PartitionScope,
        before_ms: i64,
        limit: usize,
    ) -> StoreFuture<'a, Vec<(String, i64)>>;

    /// Like [`due`](Self::due) but only timers strictly after `(after_ms,
    /// after_key)` in (time, key) order: the next page when a window holds more
    /// than `limit` timers.
    fn due_after<'a>(
        &'a self,
        scope: &'a PartitionScope,
        after_ms: i64,
        after_key: &'a str,
        before_ms: i64,
        limit: usize,
    ) -> StoreFuture<'a, Vec<(String, i64)>>;
}
