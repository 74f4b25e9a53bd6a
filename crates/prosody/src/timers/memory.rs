//! [`MemoryStore`]: timers in process memory, for mock mode and tests.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::ready;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::store::{PartitionScope, TimerStore};
use crate::store::StoreFuture;

/// Timers in process memory: not durable, gone when the process exits.
///
/// Meant for mock mode and tests. Behaves like the PostgreSQL store in every
/// other respect (idempotence, ordering), so code tested against it holds with
/// the durable one. Every call completes immediately; no lock is held across an
/// await.
#[derive(Debug, Default)]
pub struct MemoryStore {
    partitions: Mutex<BTreeMap<PartitionScope, Partition>>,
}

/// One partition's timers, indexed both ways: by key for `scheduled` and
/// `clear`, by time for `due` (with each timer's scheduler's `traceparent`).
#[derive(Debug, Default)]
struct Partition {
    by_key: HashMap<String, BTreeSet<i64>>,
    by_time: BTreeMap<(i64, String), Option<String>>,
}

impl Partition {
    /// Adds a timer; one already there keeps its trace context.
    fn insert(&mut self, key: &str, at_ms: i64, trace_parent: Option<&str>) -> bool {
        let added = self.by_key.entry(key.to_owned()).or_default().insert(at_ms);
        if added {
            self.by_time
                .insert((at_ms, key.to_owned()), trace_parent.map(str::to_owned));
        }
        added
    }

    fn remove(&mut self, key: &str, at_ms: i64) -> bool {
        let Some(times) = self.by_key.get_mut(key) else {
            return false;
        };
        let removed = times.remove(&at_ms);
        if times.is_empty() {
            self.by_key.remove(key);
        }
        if removed {
            self.by_time.remove(&(at_ms, key.to_owned()));
        }
        removed
    }

    fn clear(&mut self, key: &str) -> u64 {
        let Some(times) = self.by_key.remove(key) else {
            return 0;
        };
        for &at_ms in &times {
            self.by_time.remove(&(at_ms, key.to_owned()));
        }
        times.len() as u64
    }

    fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A panic while holding the lock cannot leave a half-made change behind
    /// (every change is a few infallible collection calls), so a poisoned lock
    /// is still consistent and safe to use.
    fn lock(&self) -> MutexGuard<'_, BTreeMap<PartitionScope, Partition>> {
        self.partitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `change` on `scope`'s partition, dropping the partition if it ends empty.
    fn change<T>(&self, scope: &PartitionScope, change: impl FnOnce(&mut Partition) -> T) -> T {
        let mut partitions = self.lock();
        let partition = partitions.entry(scope.clone()).or_default();
        let result = change(partition);
        if partition.is_empty() {
            partitions.remove(scope);
        }
        result
    }

    /// The timers `due` returns, each made into a `T` by `timer`.
    fn range<T>(
        &self,
        scope: &PartitionScope,
        after: Option<(i64, &str)>,
        before_ms: i64,
        limit: usize,
        timer: impl Fn(&(i64, String), &Option<String>) -> T,
    ) -> Vec<T> {
        let partitions = self.lock();
        let Some(partition) = partitions.get(scope) else {
            return Vec::new();
        };
        // The empty string is the least key, so `(before_ms, "")` excluded ends
        // the range just before the first timer at `before_ms`.
        let end = (before_ms, String::new());
        let start = match after {
            Some((at_ms, key)) => {
                let start = (at_ms, key.to_owned());
                if start >= end {
                    return Vec::new();
                }
                Bound::Excluded(start)
            }
            None => Bound::Unbounded,
        };
        partition
            .by_time
            .range((start, Bound::Excluded(end)))
            .take(limit)
            .map(|(time_and_key, trace_parent)| timer(time_and_key, trace_parent))
            .collect()
    }
}

impl TimerStore for MemoryStore {
    fn schedule<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
        at_ms: i64,
    ) -> StoreFuture<'a, bool> {
        self.schedule_traced(scope, key, at_ms, None)
    }

    fn unschedule<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
        at_ms: i64,
    ) -> StoreFuture<'a, bool> {
        let removed = self.change(scope, |partition| partition.remove(key, at_ms));
        Box::pin(ready(Ok(removed)))
    }

    fn clear<'a>(&'a self, scope: &'a PartitionScope, key: &'a str) -> StoreFuture<'a, u64> {
        let removed = self.change(scope, |partition| partition.clear(key));
        Box::pin(ready(Ok(removed)))
    }

    fn clear_and_schedule<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
        at_ms: i64,
    ) -> StoreFuture<'a, u64> {
        self.clear_and_schedule_traced(scope, key, at_ms, None)
    }

    fn scheduled<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
    ) -> StoreFuture<'a, Vec<i64>> {
        let times = self
            .lock()
            .get(scope)
            .and_then(|partition| partition.by_key.get(key))
            .map(|times| times.iter().copied().collect())
            .unwrap_or_default();
        Box::pin(ready(Ok(times)))
    }

    fn due<'a>(
        &'a self,
        scope: &'a PartitionScope,
        after: Option<(i64, &'a str)>,
        before_ms: i64,
        limit: usize,
    ) -> StoreFuture<'a, Vec<(String, i64)>> {
        let due = self.range(scope, after, before_ms, limit, |(at_ms, key), _| {
            (key.clone(), *at_ms)
        });
        Box::pin(ready(Ok(due)))
    }

    fn schedule_traced<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
        at_ms: i64,
        trace_parent: Option<&'a str>,
    ) -> StoreFuture<'a, bool> {
        let added = self.change(scope, |partition| {
            partition.insert(key, at_ms, trace_parent)
        });
        Box::pin(ready(Ok(added)))
    }

    fn clear_and_schedule_traced<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
        at_ms: i64,
        trace_parent: Option<&'a str>,
    ) -> StoreFuture<'a, u64> {
        let removed = self.change(scope, |partition| {
            let kept = partition
                .by_key
                .get(key)
                .is_some_and(|times| times.contains(&at_ms));
            // Cleared too, so the remaining timer takes the caller's trace context.
            let removed = partition.clear(key) - u64::from(kept);
            partition.insert(key, at_ms, trace_parent);
            removed
        });
        Box::pin(ready(Ok(removed)))
    }

    fn due_traced<'a>(
        &'a self,
        scope: &'a PartitionScope,
        after: Option<(i64, &'a str)>,
        before_ms: i64,
        limit: usize,
    ) -> StoreFuture<'a, Vec<(String, i64, Option<String>)>> {
        let due = self.range(
            scope,
            after,
            before_ms,
            limit,
            |(at_ms, key), trace_parent| (key.clone(), *at_ms, trace_parent.clone()),
        );
        Box::pin(ready(Ok(due)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(partition: i32) -> PartitionScope {
        PartitionScope::new("group", "topic", partition)
    }

    #[tokio::test]
    async fn schedule_is_idempotent_and_scheduled_is_sorted() {
        let store = MemoryStore::new();
        let scope = scope(0);
        assert!(store.schedule(&scope, "k", 30).await.unwrap());
        assert!(store.schedule(&scope, "k", 10).await.unwrap());
        assert!(!store.schedule(&scope, "k", 30).await.unwrap());
        assert_eq!(store.scheduled(&scope, "k").await.unwrap(), vec![10, 30]);
        assert_eq!(
            store.due(&scope, None, i64::MAX, 10).await.unwrap().len(),
            2
        );
    }

    #[tokio::test]
    async fn unschedule_and_clear_keep_both_indexes_in_step() {
        let store = MemoryStore::new();
        let scope = scope(0);
        for at in [1, 2, 3] {
            store.schedule(&scope, "a", at).await.unwrap();
            store.schedule(&scope, "b", at).await.unwrap();
        }
        assert!(store.unschedule(&scope, "a", 2).await.unwrap());
        assert!(!store.unschedule(&scope, "a", 2).await.unwrap());
        assert_eq!(store.clear(&scope, "b").await.unwrap(), 3);
        assert_eq!(store.clear(&scope, "b").await.unwrap(), 0);
        assert_eq!(
            store.due(&scope, None, i64::MAX, 10).await.unwrap(),
            vec![("a".to_owned(), 1), ("a".to_owned(), 3)]
        );
        store.clear(&scope, "a").await.unwrap();
        assert!(store.lock().is_empty(), "empty partitions are dropped");
    }

    #[tokio::test]
    async fn clear_and_schedule_counts_only_replaced_timers() {
        let store = MemoryStore::new();
        let scope = scope(0);
        store.schedule(&scope, "k", 5).await.unwrap();
        store.schedule(&scope, "k", 7).await.unwrap();
        assert_eq!(store.clear_and_schedule(&scope, "k", 7).await.unwrap(), 1);
        assert_eq!(store.scheduled(&scope, "k").await.unwrap(), vec![7]);
        assert_eq!(store.clear_and_schedule(&scope, "k", 9).await.unwrap(), 1);
        assert_eq!(store.scheduled(&scope, "k").await.unwrap(), vec![9]);
    }

    #[tokio::test]
    async fn due_orders_by_time_then_key_and_pages() {
        let store = MemoryStore::new();
        let scope = scope(3);
        for (key, at) in [("b", 2), ("a", 2), ("c", 1), ("a", 9), ("d", i64::MIN)] {
            store.schedule(&scope, key, at).await.unwrap();
        }
        let due = store.due(&scope, None, 9, 3).await.unwrap();
        let expected = [("d", i64::MIN), ("c", 1), ("a", 2)];
        let expected: Vec<_> = expected
            .iter()
            .map(|(k, t)| ((*k).to_owned(), *t))
            .collect();
        assert_eq!(due, expected);
        let next = store.due(&scope, Some((2, "a")), 9, 3).await.unwrap();
        assert_eq!(next, vec![("b".to_owned(), 2)]);
        assert!(store
            .due(&scope, Some((9, "")), 9, 3)
            .await
            .unwrap()
            .is_empty());
        assert!(store
            .due(&scope, Some((10, "")), 9, 3)
            .await
            .unwrap()
            .is_empty());
        assert!(store.due(&scope, None, 9, 0).await.unwrap().is_empty());
        assert!(store
            .due(&self::scope(4), None, 9, 3)
            .await
            .unwrap()
            .is_empty());
    }
}
