//! Choosing the state stores (timers, deduplication records) from
//! `state_store`, `database_url` and `mock`.

use std::sync::{Arc, OnceLock};

use tokio::sync::OnceCell;

use crate::config::{Config, StateStore};
use crate::dedup::{DedupStore, HandledId, MemoryDedup};
use crate::timers::{
    MemoryStore, PartitionScope, PostgresStore, StoreError, StoreFuture, TimerStore,
};

/// Where one consumer keeps its state.
pub(crate) struct Stores {
    /// `None` when there is no store: the first timer call then explains how
    /// to configure one.
    pub(crate) timers: Option<Arc<dyn TimerStore>>,
    /// `None` when there is no store: deduplication then relies on the
    /// in-memory cache alone.
    pub(crate) dedup: Option<Arc<dyn DedupStore>>,
}

/// The stores `config` asks for. Both live in the same place: one PostgreSQL
/// connection, or process memory.
pub(crate) fn stores(config: &Config) -> Stores {
    match (
        config.state_store,
        config.database_url.as_deref(),
        config.mock,
    ) {
        (StateStore::Memory, _, _) | (StateStore::Auto, None, true) => Stores {
            timers: Some(memory_timers()),
            dedup: Some(memory_dedup()),
        },
        (StateStore::Postgres | StateStore::Auto, Some(url), _) => {
            let postgres = Arc::new(LazyPostgres::new(url));
            Stores {
                timers: Some(Arc::clone(&postgres) as Arc<dyn TimerStore>),
                dedup: Some(postgres as Arc<dyn DedupStore>),
            }
        }
        (StateStore::Postgres, None, _) | (StateStore::Auto, None, false) => Stores {
            timers: None,
            dedup: None,
        },
    }
}

/// One memory store per process, so that timers outlive a client (and move
/// between clients on rebalance) the way they would with PostgreSQL.
fn memory_timers() -> Arc<dyn TimerStore> {
    static MEMORY: OnceLock<Arc<MemoryStore>> = OnceLock::new();
    Arc::clone(MEMORY.get_or_init(|| Arc::new(MemoryStore::new()))) as Arc<dyn TimerStore>
}

/// One per process, for the same reason as [`memory_timers`].
fn memory_dedup() -> Arc<dyn DedupStore> {
    static MEMORY: OnceLock<Arc<MemoryDedup>> = OnceLock::new();
    Arc::clone(MEMORY.get_or_init(|| Arc::new(MemoryDedup::default()))) as Arc<dyn DedupStore>
}

/// Connects on first use, so `subscribe` never waits for the database and a
/// database that is down at start-up is retried by the callers that need it.
#[derive(Debug)]
struct LazyPostgres {
    url: String,
    store: OnceCell<PostgresStore>,
}

impl LazyPostgres {
    fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            store: OnceCell::new(),
        }
    }

    async fn store(&self) -> Result<&PostgresStore, StoreError> {
        self.store
            .get_or_try_init(|| PostgresStore::connect(&self.url))
            .await
    }
}

impl TimerStore for LazyPostgres {
    fn schedule<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
        at_ms: i64,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move { self.store().await?.schedule(scope, key, at_ms).await })
    }

    fn unschedule<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
        at_ms: i64,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move { self.store().await?.unschedule(scope, key, at_ms).await })
    }

    fn clear<'a>(&'a self, scope: &'a PartitionScope, key: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(async move { self.store().await?.clear(scope, key).await })
    }

    fn clear_and_schedule<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
        at_ms: i64,
    ) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            self.store()
                .await?
                .clear_and_schedule(scope, key, at_ms)
                .await
        })
    }

    fn scheduled<'a>(
        &'a self,
        scope: &'a PartitionScope,
        key: &'a str,
    ) -> StoreFuture<'a, Vec<i64>> {
        Box::pin(async move { self.store().await?.scheduled(scope, key).await })
    }

    fn due<'a>(
        &'a self,
        scope: &'a PartitionScope,
        before_ms: i64,
        limit: usize,
    ) -> StoreFuture<'a, Vec<(String, i64)>> {
        Box::pin(async move { self.store().await?.due(scope, before_ms, limit).await })
    }

    fn due_after<'a>(
        &'a self,
        scope: &'a PartitionScope,
        after_ms: i64,
        after_key: &'a str,
        before_ms: i64,
        limit: usize,
    ) -> StoreFuture<'a, Vec<(String, i64)>> {
        Box::pin(async move {
            self.store()
                .await?
                .due_after(scope, after_ms, after_key, before_ms, limit)
                .await
        })
    }
}

impl DedupStore for LazyPostgres {
    fn contains<'a>(&'a self, handled: &'a HandledId, now_ms: i64) -> StoreFuture<'a, bool> {
        Box::pin(async move { self.store().await?.contains(handled, now_ms).await })
    }

    fn record<'a>(&'a self, handled: &'a HandledId, expires_at_ms: i64) -> StoreFuture<'a, ()> {
        Box::pin(async move { self.store().await?.record(handled, expires_at_ms).await })
    }
}
