//! Where deferred messages are kept: the [`DeferStore`] contract and
//! [`MemoryDeferred`], the store of mock mode (PostgreSQL: `postgres.rs`).

use std::collections::{BTreeMap, HashMap};
use std::future::ready;
use std::sync::{Mutex, PoisonError};

use crate::store::StoreFuture;
use crate::timers::PartitionScope;

/// One deferred message: where it is in Kafka, its key, how often it failed,
/// and when it is retried next (ms since the epoch).
///
/// Only the first deferred message of a key has been tried; the messages
/// deferred behind it are stored with `attempt` 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeferredRecord {
    pub(crate) key: String,
    pub(crate) offset: i64,
    pub(crate) attempt: u32,
    pub(crate) retry_at_ms: i64,
}

/// Durable storage of a partition's deferred messages, by [`PartitionScope`],
/// so the partition's next owner (after a rebalance or a restart) finds them.
pub(crate) trait DeferStore: Send + Sync {
    /// Every deferred message of the partition, by offset.
    fn load<'a>(&'a self, scope: &'a PartitionScope) -> StoreFuture<'a, Vec<DeferredRecord>>;

    /// Stores a deferred message, replacing the record of the same offset.
    fn put<'a>(
        &'a self,
        scope: &'a PartitionScope,
        record: &'a DeferredRecord,
    ) -> StoreFuture<'a, ()>;

    /// Forgets the deferred message at `offset` (it ran, or was given up on).
    fn remove<'a>(&'a self, scope: &'a PartitionScope, offset: i64) -> StoreFuture<'a, ()>;
}

/// Deferred messages in process memory: one per process in mock mode, so they
/// move between clients on rebalance the way they would with PostgreSQL.
#[derive(Debug, Default)]
pub(crate) struct MemoryDeferred {
    partitions: Mutex<HashMap<PartitionScope, BTreeMap<i64, DeferredRecord>>>,
}

impl MemoryDeferred {
    fn partitions(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<PartitionScope, BTreeMap<i64, DeferredRecord>>> {
        self.partitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl DeferStore for MemoryDeferred {
    fn load<'a>(&'a self, scope: &'a PartitionScope) -> StoreFuture<'a, Vec<DeferredRecord>> {
        let records = self
            .partitions()
            .get(scope)
            .map(|records| records.values().cloned().collect())
            .unwrap_or_default();
        Box::pin(ready(Ok(records)))
    }

    fn put<'a>(
        &'a self,
        scope: &'a PartitionScope,
        record: &'a DeferredRecord,
    ) -> StoreFuture<'a, ()> {
        self.partitions()
            .entry(scope.clone())
            .or_default()
            .insert(record.offset, record.clone());
        Box::pin(ready(Ok(())))
    }

    fn remove<'a>(&'a self, scope: &'a PartitionScope, offset: i64) -> StoreFuture<'a, ()> {
        let mut partitions = self.partitions();
        if let Some(records) = partitions.get_mut(scope) {
            records.remove(&offset);
            if records.is_empty() {
                partitions.remove(scope);
            }
        }
        Box::pin(ready(Ok(())))
    }
}
