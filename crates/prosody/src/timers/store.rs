//! The storage contract every timer store meets.

use std::fmt;
use std::sync::Arc;

use crate::store::StoreFuture;

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

/// Durable storage for per-key timers.
///
/// A timer is a `(scope, key, at_ms)` triple; `at_ms` is milliseconds since the
/// Unix epoch. A key may hold many timers, but at most one per millisecond:
/// scheduling the same time twice is one timer. Stores only store: firing,
/// retrying and in-memory windows belong to the consumer.
///
/// A timer may also carry the `traceparent` of the handler call that
/// scheduled it (the `*_traced` methods), so its firing's span can continue
/// or link to that call's trace. A store that keeps none may leave those
/// methods to their defaults: its timers then fire in traces of their own.
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
    /// by time then key: what the consumer loads to fire soon. With `after`,
    /// only timers strictly after that `(at_ms, key)` in (time, key) order: the
    /// next page when a window holds more than `limit` timers.
    fn due<'a>(
        &'a self,
        scope: &'a PartitionScope,
        after: Option<(i64, &'a str)>,
        before_ms: i64,
        limit: usize,
    ) -> StoreFuture<'a, Vec<(String, i64)>>;

    /// [`schedule`](Self::schedule), keeping `trace_parent` with a new timer.
    /// A timer already at `at_ms` keeps the trace context it has: the first
    /// scheduler's. The default drops `trace_parent`.
    fn schedule_traced<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
        at_ms: i64,
        trace_parent: Option<&'a str>,
    ) -> StoreFuture<'a, bool> {
        let _ = trace_parent;
        self.schedule(scope, key, at_ms)
    }

    /// [`clear_and_schedule`](Self::clear_and_schedule), the remaining timer
    /// carrying `trace_parent` (replacing the trace context of one already at
    /// `at_ms`: the timer is the caller's now). The default drops `trace_parent`.
    fn clear_and_schedule_traced<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
        at_ms: i64,
        trace_parent: Option<&'a str>,
    ) -> StoreFuture<'a, u64> {
        let _ = trace_parent;
        self.clear_and_schedule(scope, key, at_ms)
    }

    /// [`due`](Self::due), each timer as `(key, at_ms, traceparent)`: the
    /// W3C `traceparent` stored with it, if the call that scheduled it was
    /// traced. The default has none.
    fn due_traced<'a>(
        &'a self,
        scope: &'a PartitionScope,
        after: Option<(i64, &'a str)>,
        before_ms: i64,
        limit: usize,
    ) -> StoreFuture<'a, Vec<(String, i64, Option<String>)>> {
        let due = self.due(scope, after, before_ms, limit);
        Box::pin(async move {
            Ok(due
                .await?
                .into_iter()
                .map(|(key, at_ms)| (key, at_ms, None))
                .collect())
        })
    }
}
