//! State stores: where timers and deduplication records live, and what the
//! stores share.
//!
//! - [`StoreError`] and [`StoreFuture`]: what every store call returns;
//! - [`PostgresStore`]: one PostgreSQL connection, opened on first use and
//!   replaced when it breaks (`postgres.rs`); schema migrations under one
//!   advisory lock (`migrate.rs`); a writer that batches concurrent writes into
//!   one statement (`writer.rs`).
//!
//! Each kind of state keeps its own schema and queries next to its logic:
//! `timers/postgres.rs` (table `prosody_timers`) and `dedup/postgres.rs`
//! (table `prosody_dedup`). The in-memory stores live there too.

mod error;
mod migrate;
mod postgres;
mod writer;

pub(crate) use error::query_error;
pub use error::{StoreError, StoreFuture};
pub(crate) use migrate::Schema;
pub(crate) use postgres::Postgres;
pub use postgres::PostgresStore;
pub(crate) use writer::Batch;
