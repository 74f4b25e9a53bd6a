//! Durable per-key timers: the storage layer.
//!
//! A handler schedules work for its key at a future time; the consumer loads
//! the timers of its partitions that are due soon and fires them through the
//! key's queue, deleting each only after `on_timer` succeeds. This module only
//! stores them, behind [`TimerStore`]:
//!
//! - [`MemoryStore`]: in process memory, for mock mode and tests;
//! - [`crate::PostgresStore`]: durable, behind `database_url`; the timer
//!   table and queries are in `postgres.rs`, the connection in `crate::store`.

mod memory;
pub(crate) mod postgres;
mod store;

pub use memory::MemoryStore;
pub use store::{PartitionScope, TimerStore};
