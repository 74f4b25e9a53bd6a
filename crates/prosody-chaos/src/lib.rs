//! Fault injection for Prosody: Ruby consumer processes killed at random moments
//! while the (mock) Kafka brokers fail, then a verifier that proves no message
//! was lost and no key was handled out of order.
//!
//! # Layout
//!
//! - `bin/prosody-mock-broker.rs`: librdkafka's mock cluster in a process of its
//!   own, so it outlives the consumers, driven by [`BrokerCommand`]s on stdin
//!   ([`MockCluster`] does the FFI).
//! - `main.rs` (`prosody-chaos`): the orchestrator ([`run()`]) and the standalone
//!   verifier (`prosody-chaos verify <dir>`).
//! - [`plan`]: the seeded schedule of messages, kills and faults.
//! - `producer.rs`, `workers.rs`, `broker_process.rs`: the processes a run drives.
//! - [`CommitWatcher`]: the group's committed offsets, read without joining it.
//! - [`records`], [`manifest`]: the files workers and the orchestrator write.
//! - [`verify()`]: the checks (loss, per-key order, overlap inside a process).
//!
//! The Ruby side is `chaos/worker.rb` and `chaos/recording_handler.rb`.

mod broker_process;
mod command;
mod commits;
mod error;
pub mod manifest;
mod mock_cluster;
pub mod plan;
mod producer;
pub mod records;
mod run;
mod verify;
mod workers;

pub use broker_process::BrokerProcess;
pub use command::{ApiKey, BrokerCommand, ErrorCode};
pub use commits::{lagging, log_ends, moved_back, CommitWatcher, Lag};
pub use error::{Error, Result};
pub use mock_cluster::MockCluster;
pub use producer::Producer;
pub use run::{default_run_dir, run, verify_dir, KillCounts, RunOutcome, RunSettings};
pub use verify::{verify, Report, Violation};
pub use workers::{Worker, WorkerSetup};
