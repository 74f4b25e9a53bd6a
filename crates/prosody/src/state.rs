//! Choosing the state stores (timers, deduplication records, deferred
//! messages) from `state_store`, `database_url` and `mock`.

use std::sync::{Arc, OnceLock};

use crate::config::{Config, StateStore};
use crate::consumer::defer::{DeferStore, MemoryDeferred};
use crate::dedup::{DedupStore, MemoryDedup};
use crate::store::PostgresStore;
use crate::timers::{MemoryStore, TimerStore};

/// Where one consumer keeps its state.
pub(crate) struct Stores {
    /// `None` when there is no store: the first timer call then explains how
    /// to configure one.
    pub(crate) timers: Option<Arc<dyn TimerStore>>,
    /// `None` when there is no store: deduplication then relies on the
    /// in-memory cache alone.
    pub(crate) dedup: Option<Arc<dyn DedupStore>>,
    /// `None` when there is no durable store: a deferred message whose offset
    /// was committed would be lost with the process, so failing messages are
    /// then retried in place. The memory store counts as durable in mock mode
    /// only, where it is one per process (as the mock cluster is).
    pub(crate) deferred: Option<Arc<dyn DeferStore>>,
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
            deferred: config.mock.then(memory_deferred),
        },
        (StateStore::Postgres | StateStore::Auto, Some(url), _) => {
            // Connects on first use, so `subscribe` never waits for the database
            // and a database that is down at start-up is retried by the callers
            // that need it.
            let postgres = Arc::new(PostgresStore::lazy(url));
            Stores {
                timers: Some(Arc::clone(&postgres) as Arc<dyn TimerStore>),
                dedup: Some(Arc::clone(&postgres) as Arc<dyn DedupStore>),
                deferred: Some(postgres as Arc<dyn DeferStore>),
            }
        }
        (StateStore::Postgres, None, _) | (StateStore::Auto, None, false) => Stores {
            timers: None,
            dedup: None,
            deferred: None,
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

/// One per process, for the same reason as [`memory_timers`].
fn memory_deferred() -> Arc<dyn DeferStore> {
    static MEMORY: OnceLock<Arc<MemoryDeferred>> = OnceLock::new();
    Arc::clone(MEMORY.get_or_init(|| Arc::new(MemoryDeferred::default()))) as Arc<dyn DeferStore>
}
