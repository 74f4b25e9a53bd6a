//! Message-id deduplication: a payload with an `id` is handled at most once per
//! (group, topic, key, id, `idempotence_version`), as far as the stores know.
//!
//! Two layers answer "was this handled already?":
//!
//! - a per-consumer LRU of the last `idempotence_cache_size` ids handled,
//!   shared by every partition of the consumer and kept across its rebalances,
//!   so the common case (a redelivery after a rebalance or a restart of the
//!   poll loop) costs no I/O;
//! - a [`DedupStore`] behind it: PostgreSQL when `database_url` is set (so the
//!   records outlive the process; table and queries in `postgres.rs`), one
//!   process-wide memory store (`memory.rs`) in mock mode.
//!
//! A message is recorded only after its handler succeeded, so a failed attempt
//! is retried and a redelivery of a failed message runs again. A store that
//! cannot answer does not hold messages up: the message is handled (at-least-
//! once wins over dedup) and a warning is logged.

mod memory;
pub(crate) mod postgres;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lru::LruCache;
use tracing::warn;

pub(crate) use memory::MemoryDedup;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::{StoreError, StoreFuture};

/// One handled message as the stores remember it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct HandledId {
    pub(crate) group: Arc<str>,
    pub(crate) topic: Arc<str>,
    pub(crate) key: Arc<str>,
    pub(crate) id: String,
    pub(crate) version: Arc<str>,
}

/// Durable records of handled message ids.
pub(crate) trait DedupStore: Send + Sync {
    /// True when `handled` was recorded and its record expires after `now_ms`.
    fn contains<'a>(&'a self, handled: &'a HandledId, now_ms: i64) -> StoreFuture<'a, bool>;

    /// Records `handled` until `expires_at_ms`, replacing an older record.
    fn record<'a>(&'a self, handled: &'a HandledId, expires_at_ms: i64) -> StoreFuture<'a, ()>;
}

/// The `id` of a payload, if it has one: a string, or a number as written.
pub(crate) fn message_id(payload: &serde_json::Value) -> Option<String> {
    match payload.get("id")? {
        serde_json::Value::String(id) => Some(id.clone()),
        serde_json::Value::Number(id) => Some(id.to_string()),
        _ => None,
    }
}

/// Cache key within one consumer: group and version never change there.
type CacheKey = (Arc<str>, Arc<str>, String);

/// One consumer's deduplication: its LRU and the store behind it.
pub(crate) struct Deduplicator {
    group: Arc<str>,
    version: Arc<str>,
    ttl: Duration,
    /// Recently handled ids and when each stops counting.
    recent: Mutex<LruCache<CacheKey, Instant>>,
    store: Option<Arc<dyn DedupStore>>,
    /// Where failed store calls are counted, once the consumer attaches its metrics.
    metrics: Option<Arc<Metrics>>,
}

impl Deduplicator {
    /// `None` when `idempotence_cache_size` is 0, which turns dedup off.
    pub(crate) fn new(config: &Config, store: Option<Arc<dyn DedupStore>>) -> Option<Self> {
        let capacity = std::num::NonZeroUsize::new(config.idempotence_cache_size)?;
        Some(Self {
            group: Arc::from(config.group_id.as_deref().unwrap_or_default()),
            version: Arc::from(config.idempotence_version.as_str()),
            ttl: config.idempotence_ttl,
            recent: Mutex::new(LruCache::new(capacity)),
            store,
            metrics: None,
        })
    }

    /// Counts failed store calls in `metrics`.
    pub(crate) fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn store_failed(&self) {
        if let Some(metrics) = &self.metrics {
            metrics.store_error();
        }
    }

    fn handled_id(&self, topic: &Arc<str>, key: &Arc<str>, id: &str) -> HandledId {
        HandledId {
            group: Arc::clone(&self.group),
            topic: Arc::clone(topic),
            key: Arc::clone(key),
            id: id.to_owned(),
            version: Arc::clone(&self.version),
        }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, LruCache<CacheKey, Instant>> {
        self.recent.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// True when this message id was handled already and its record has not expired.
    pub(crate) async fn seen(&self, topic: &Arc<str>, key: &Arc<str>, id: &str) -> bool {
        let cache_key = (Arc::clone(topic), Arc::clone(key), id.to_owned());
        {
            let mut recent = self.recent();
            match recent.get(&cache_key) {
                Some(until) if *until > Instant::now() => return true,
                Some(_) => {
                    recent.pop(&cache_key);
                }
                None => {}
            }
        }
        let Some(store) = &self.store else {
            return false;
        };
        let handled = self.handled_id(topic, key, id);
        match store.contains(&handled, now_ms()).await {
            Ok(found) => found,
            Err(error) => {
                self.store_failed();
                warn!(topic = %topic, key = %key, id, "cannot look up the message id; handling the message (it may have been handled before): {}", describe(&error));
                false
            }
        }
    }

    /// Remembers a message id whose handler succeeded.
    pub(crate) async fn record(&self, topic: &Arc<str>, key: &Arc<str>, id: &str) {
        let cache_key = (Arc::clone(topic), Arc::clone(key), id.to_owned());
        self.recent().put(cache_key, Instant::now() + self.ttl);
        let Some(store) = &self.store else {
            return;
        };
        let handled = self.handled_id(topic, key, id);
        let expires_at_ms =
            now_ms().saturating_add(i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX));
        if let Err(error) = store.record(&handled, expires_at_ms).await {
            self.store_failed();
            warn!(topic = %topic, key = %key, id, "cannot record the handled message id; a redelivery after a restart will run again: {}", describe(&error));
        }
    }
}

fn describe(error: &StoreError) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Milliseconds since the Unix epoch: records are compared across processes.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::OptionValue;

    fn config(options: &[(&str, OptionValue)]) -> Config {
        let mut builder = Config::builder().mock(true).group_id("g");
        for (name, value) in options {
            builder = builder.set(name, value.clone()).unwrap();
        }
        builder.build_with_env(Vec::new()).unwrap()
    }

    #[test]
    fn ids_are_strings_or_numbers() {
        assert_eq!(message_id(&json!({"id": "a-1"})), Some("a-1".to_owned()));
        assert_eq!(message_id(&json!({"id": 42})), Some("42".to_owned()));
        assert_eq!(message_id(&json!({"id": null})), None);
        assert_eq!(message_id(&json!({"id": {"nested": 1}})), None);
        assert_eq!(message_id(&json!({"type": "x"})), None);
        assert_eq!(message_id(&json!([1])), None);
    }

    #[test]
    fn cache_size_zero_turns_dedup_off() {
        let config = config(&[("idempotence_cache_size", OptionValue::Int(0))]);
        assert!(Deduplicator::new(&config, None).is_none());
    }

    #[tokio::test]
    async fn the_cache_remembers_by_topic_key_and_id() {
        let dedup = Deduplicator::new(&config(&[]), None).unwrap();
        let (topic, key, other) = (Arc::from("t"), Arc::from("k"), Arc::from("other"));
        assert!(!dedup.seen(&topic, &key, "1").await);
        dedup.record(&topic, &key, "1").await;
        assert!(dedup.seen(&topic, &key, "1").await);
        assert!(!dedup.seen(&topic, &other, "1").await, "other key");
        assert!(!dedup.seen(&other, &key, "1").await, "other topic");
        assert!(!dedup.seen(&topic, &key, "2").await, "other id");
    }

    #[tokio::test]
    async fn the_cache_forgets_the_least_recent_and_the_expired() {
        let dedup = Deduplicator::new(
            &config(&[
                ("idempotence_cache_size", OptionValue::Int(2)),
                ("idempotence_ttl", "200ms".into()),
            ]),
            None,
        )
        .unwrap();
        let (topic, key) = (Arc::from("t"), Arc::from("k"));
        for id in ["1", "2", "3"] {
            dedup.record(&topic, &key, id).await;
        }
        assert!(!dedup.seen(&topic, &key, "1").await, "evicted");
        assert!(dedup.seen(&topic, &key, "3").await);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(!dedup.seen(&topic, &key, "3").await, "expired");
    }

    #[tokio::test]
    async fn the_store_answers_what_the_cache_forgot() {
        let store: Arc<dyn DedupStore> = Arc::new(MemoryDedup::default());
        let config = config(&[]);
        let (topic, key) = (Arc::from("t"), Arc::from("k"));
        Deduplicator::new(&config, Some(Arc::clone(&store)))
            .unwrap()
            .record(&topic, &key, "1")
            .await;
        let restarted = Deduplicator::new(&config, Some(Arc::clone(&store))).unwrap();
        assert!(restarted.seen(&topic, &key, "1").await);
        let new_version = self::config(&[("idempotence_version", "2".into())]);
        let upgraded = Deduplicator::new(&new_version, Some(store)).unwrap();
        assert!(
            !upgraded.seen(&topic, &key, "1").await,
            "a version change forgets"
        );
    }
}
