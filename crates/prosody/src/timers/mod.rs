//! Durable per-key timers: the storage layer.
//!
//! A handler schedules work for its key at a future time; the consumer loads
//! the timers of its partitions that are due soon and fires them through the
//! key's queue, deleting each only after `on_timer` succeeds. This module only
//! stores them, behind [`TimerStore`]:
//!
//! - [`MemoryStore`]: in process memory, for mock mode and tests;
//! - [`PostgresStore`]: durable, behind `database_url`.

mod memory;
mod postgres;
mod store;

pub use memory::MemoryStore;
pub use postgres::PostgresStore;
#[allow(unused_imports)] // for the other PostgreSQL-backed components
pub(crate) use postgres::{migrate, SCHEMA_LOCK_KEY};
pub use store::{PartitionScope, StoreError, StoreFuture, TimerStore};
