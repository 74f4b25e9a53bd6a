//! Prosody: a Kafka consumer and producer that runs different keys of one partition
//! concurrently while keeping each key strictly in order.
//!
//! # Example
//!
//! Handle and send JSON messages (the README's Rust quick start, which lists the
//! dependencies it needs: `tokio` with `macros` and `rt-multi-thread`, `serde_json`,
//! `thiserror`):
//!
//! ```
#![doc = include_str!("../examples/readme.rs")]
//! ```
//!
//! # Layout
//! - [`config`]: options, `PROSODY_*` environment fallbacks, validation ([`Config`]).
//! - `client`: [`Client`], one producer plus at most one subscription.
//! - `producer`: [`Producer`], JSON messages with the `source-system` header.
//! - `consumer`: the poll thread, per-partition managers, per-key queues, offset tracking.
//! - `handler`: the [`EventHandler`] trait users implement and its [`Context`].
//! - `message`: [`Message`], what handlers receive.
//! - [`mock`]: the in-process mock Kafka cluster behind `mock: true`.
//! - `probe`: the `/readyz` and `/livez` HTTP probe server.
//! - `dedup`: message-id deduplication (an LRU per consumer, records in the state store).
//! - `timers`: durable per-key timer storage (memory, or PostgreSQL with `database_url`).
//! - `store`: what the state stores share: [`StoreError`], the PostgreSQL connection,
//!   migrations and batching writer.
//! - `state`: which stores timers and deduplication records use.
//! - `error`: [`Error`], the crate's one error type.

mod client;
pub mod config;
mod consumer;
mod dedup;
mod duration;
mod error;
pub mod events;
mod handler;
mod message;
mod metrics;
pub mod mock;
mod probe;
mod producer;
mod state;
mod store;
mod telemetry;
mod timers;
pub mod traces;

pub use client::Client;
pub use config::{Config, ConfigBuilder, Mode, OptionValue, SpanRelation, StateStore};
pub use consumer::{ConsumerState, PartitionStats, QosStats, SkipCounts};
pub use error::{Error, Result};
pub use events::{Event, EventKind, Observer};
pub use handler::{ClassifyError, Context, EventHandler, FailureKind, HandlerSlot};
pub use message::{Header, Message, Timer};
pub use metrics::Format as MetricsFormat;
pub use producer::{Producer, SOURCE_SYSTEM_HEADER};
pub use store::StoreError;
// Not part of the documented API: a `Client` cannot take a store (it picks one from the
// `state_store` and `database_url` options), so these traits and types are not something
// a user implements or passes anywhere. They stay reachable, hidden, for this crate's
// integration tests (tests/timers_store.rs) and for prosody-bench, which exercise the
// stores directly.
#[doc(hidden)]
pub use store::{PostgresStore, StoreFuture};
#[doc(hidden)]
pub use timers::{MemoryStore, PartitionScope, TimerStore};
