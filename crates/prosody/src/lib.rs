//! Prosody: a Kafka consumer and producer that runs different keys of one partition
//! concurrently while keeping each key strictly in order.
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
//! - `timers`: durable per-key timer storage ([`TimerStore`], [`MemoryStore`]).
//! - `store`: what the state stores share: [`StoreError`], [`StoreFuture`] and
//!   [`PostgresStore`] (connection, migrations, batching writer).
//! - `state`: which stores timers and deduplication records use.
//! - `error`: [`Error`], the crate's one error type.

mod client;
pub mod config;
mod consumer;
mod dedup;
mod duration;
mod error;
mod handler;
mod message;
pub mod mock;
mod probe;
mod producer;
mod state;
mod store;
mod timers;

pub use client::Client;
pub use config::{Config, ConfigBuilder, Mode, OptionValue, StateStore};
pub use consumer::{ConsumerState, PartitionStats, SkipCounts};
pub use error::{Error, Result};
pub use handler::{ClassifyError, Context, EventHandler, FailureKind};
pub use message::{Header, Message, Timer};
pub use producer::{Producer, SOURCE_SYSTEM_HEADER};
pub use store::{PostgresStore, StoreError, StoreFuture};
pub use timers::{MemoryStore, PartitionScope, TimerStore};
