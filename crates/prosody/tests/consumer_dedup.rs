//! Message-id deduplication: a payload with an `id` is handled at most once per
//! (topic, key, id), within one consumer (the in-memory cache) and across
//! restarts (the state store: memory in mock mode, PostgreSQL with
//! `database_url`).
//!
//! The PostgreSQL tests need `PROSODY_TEST_DATABASE_URL` (set by
//! `./script/test`); they fail rather than skip without it.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prosody::{ClassifyError, Client, ConfigBuilder, Context, EventHandler, Message, OptionValue};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use support::{client, config, database_url, lock, produce, topic, unique, wait_until, Record};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Flaky(String);

impl ClassifyError for Flaky {}

/// Records every call as (key, id); fails the first `failures` calls.
#[derive(Clone, Default)]
struct Recorder {
    calls: Arc<Mutex<Vec<(String, Value)>>>,
    failures: Arc<AtomicUsize>,
}

impl Recorder {
    fn failing_first(failures: usize) -> Self {
        let recorder = Self::default();
        recorder.failures.store(failures, Ordering::SeqCst);
        recorder
    }

    fn calls(&self) -> Vec<(String, Value)> {
        lock(&self.calls).clone()
    }

    fn count(&self) -> usize {
        lock(&self.calls).len()
    }
}

impl EventHandler for Recorder {
    type Error = Flaky;

    async fn on_message(&self, _context: Context, message: Message) -> Result<(), Flaky> {
        lock(&self.calls).push((message.key().to_owned(), message.payload()["id"].clone()));
        let failing = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(1)
            })
            .is_ok();
        if failing {
            return Err(Flaky("first attempt fails".to_owned()));
        }
        Ok(())
    }
}

fn message(key: &str, id: &str, n: u32) -> Record {
    Record::json(key, &json!({ "id": id, "n": n }))
}

fn fast_retries(builder: ConfigBuilder) -> ConfigBuilder {
    builder
        .set("retry_base", "10ms".into())
        .expect("retry_base is an option")
}

/// Handles everything on `topic` with a fresh client of `group`, until the
/// handler has been called `calls` times and `duplicates` skips are counted.
async fn consume(
    builder: ConfigBuilder,
    recorder: &Recorder,
    calls: usize,
    duplicates: u64,
) -> Arc<Client> {
    let client = client(builder);
    client.subscribe(recorder.clone()).expect("subscribe");
    let watched = Arc::clone(&client);
    wait_until(
        &format!("{calls} handler calls and {duplicates} duplicates skipped"),
        || recorder.count() >= calls && watched.skip_counts().duplicates >= duplicates,
    )
    .await;
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_id_is_handled_once_per_key() {
    let topic = topic("dedup-once", 1);
    produce(
        &topic,
        [
            message("a", "m-1", 1),
            message("a", "m-1", 2),
            message("b", "m-1", 3),
            message("a", "m-2", 4),
            // A marker to know the consumer got past everything above.
            message("z", "last", 5),
        ],
    );
    let recorder = Recorder::default();
    let client = consume(config(&unique("dedup-once"), &topic), &recorder, 4, 1).await;
    let skips = client.skip_counts();
    client.unsubscribe().await.expect("unsubscribe");

    let calls = recorder.calls();
    let mut ids: Vec<(&str, &str)> = calls
        .iter()
        .map(|(key, id)| (key.as_str(), id.as_str().unwrap_or_default()))
        .collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        [("a", "m-1"), ("a", "m-2"), ("b", "m-1"), ("z", "last")],
        "the repeated (a, m-1) was skipped; the same id under key b was handled"
    );
    assert_eq!(skips.duplicates, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_attempt_is_not_recorded() {
    let topic = topic("dedup-retry", 1);
    produce(&topic, [message("a", "m-1", 1), message("a", "m-1", 2)]);
    let recorder = Recorder::failing_first(1);
    let client = consume(
        fast_retries(config(&unique("dedup-retry"), &topic)),
        &recorder,
        2,
        1,
    )
    .await;
    client.unsubscribe().await.expect("unsubscribe");
    assert_eq!(
        recorder.count(),
        2,
        "the failed first attempt was retried, and only the successful one recorded \
         (so the second copy was skipped): {:?}",
        recorder.calls()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_size_zero_turns_dedup_off() {
    let topic = topic("dedup-off", 1);
    produce(&topic, [message("a", "m-1", 1), message("a", "m-1", 2)]);
    let recorder = Recorder::default();
    let builder = config(&unique("dedup-off"), &topic)
        .set("idempotence_cache_size", OptionValue::Int(0))
        .expect("idempotence_cache_size is an option");
    let client = consume(builder, &recorder, 2, 0).await;
    let skips = client.skip_counts();
    client.unsubscribe().await.expect("unsubscribe");
    assert_eq!(recorder.count(), 2);
    assert_eq!(skips.duplicates, 0);
}

/// In mock mode the records live in process memory and outlive a client: a
/// new client of the same group skips redelivered messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mock_mode_remembers_across_clients() {
    let topic = topic("dedup-mock-restart", 1);
    let group = unique("dedup-mock-restart");
    produce(&topic, [message("a", "m-1", 1)]);
    let first = Recorder::default();
    consume(config(&group, &topic), &first, 1, 0)
        .await
        .unsubscribe()
        .await
        .expect("unsubscribe");

    reset_offsets(&group, &topic);
    let second = Recorder::default();
    let client = consume(config(&group, &topic), &second, 0, 1).await;
    client.unsubscribe().await.expect("unsubscribe");
    assert_eq!(second.count(), 0, "redelivered message skipped");
}

fn durable(builder: ConfigBuilder) -> ConfigBuilder {
    builder
        .set("database_url", database_url().into())
        .expect("database_url is an option")
}

/// Restarts (a new client, so an empty in-memory cache) with the PostgreSQL
/// store: a redelivered message is skipped; with a new idempotence_version it
/// is handled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_remembers_across_restarts_until_the_version_changes() {
    let topic = topic("dedup-pg", 1);
    let group = unique("dedup-pg");
    produce(&topic, [message("a", "m-1", 1), message("b", "m-2", 2)]);

    let first = Recorder::default();
    consume(durable(config(&group, &topic)), &first, 2, 0)
        .await
        .unsubscribe()
        .await
        .expect("unsubscribe");

    reset_offsets(&group, &topic);
    let restarted = Recorder::default();
    let client = consume(durable(config(&group, &topic)), &restarted, 0, 2).await;
    client.unsubscribe().await.expect("unsubscribe");
    assert_eq!(restarted.count(), 0, "both redelivered messages skipped");

    reset_offsets(&group, &topic);
    let upgraded = Recorder::default();
    let builder = durable(config(&group, &topic))
        .set("idempotence_version", "2".into())
        .expect("idempotence_version is an option");
    let client = consume(builder, &upgraded, 2, 0).await;
    client.unsubscribe().await.expect("unsubscribe");
    assert_eq!(upgraded.count(), 2, "a new version forgets the old records");
}

/// A record counts only until `idempotence_ttl` has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_records_expire_after_the_ttl() {
    // Each offset reset and client start joins the group, which the mock
    // coordinator holds for about two seconds: the check within the TTL needs
    // room for two of them.
    const TTL: Duration = Duration::from_secs(10);
    let topic = topic("dedup-ttl", 1);
    let group = unique("dedup-ttl");
    produce(&topic, [message("a", "m-1", 1)]);
    let with_ttl = || {
        durable(config(&group, &topic))
            .set("idempotence_ttl", TTL.into())
            .expect("idempotence_ttl is an option")
    };

    let first = Recorder::default();
    consume(with_ttl(), &first, 1, 0)
        .await
        .unsubscribe()
        .await
        .expect("unsubscribe");
    let recorded = std::time::Instant::now();

    // Within the TTL: skipped.
    reset_offsets(&group, &topic);
    let early = Recorder::default();
    let client = consume(with_ttl(), &early, 0, 1).await;
    client.unsubscribe().await.expect("unsubscribe");
    assert_eq!(early.count(), 0, "skipped within the TTL");
    assert!(
        recorded.elapsed() < TTL,
        "the check within the TTL took too long to mean anything"
    );

    // After it: handled again.
    tokio::time::sleep(TTL.saturating_sub(recorded.elapsed())).await;
    reset_offsets(&group, &topic);
    let late = Recorder::default();
    let client = consume(with_ttl(), &late, 1, 0).await;
    client.unsubscribe().await.expect("unsubscribe");
    assert_eq!(late.count(), 1, "handled again once the record expired");
}

/// Commits offset 0 for every partition of `topic` in `group`, as an operator
/// resetting the group would. The mock coordinator only takes commits from
/// members, so this joins the group, commits, and leaves.
fn reset_offsets(group: &str, topic: &str) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set(
            "bootstrap.servers",
            prosody::mock::bootstrap_servers().expect("mock cluster"),
        )
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "3000")
        .set("heartbeat.interval.ms", "250")
        .create()
        .expect("raw consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let started = std::time::Instant::now();
    let assignment = loop {
        // Messages polled here are not handled; only the assignment matters.
        let _ = consumer.poll(Duration::from_millis(50));
        let assignment = consumer.assignment().expect("assignment");
        if assignment.count() > 0 {
            break assignment;
        }
        assert!(
            started.elapsed() < support::DEADLINE,
            "no assignment for the offset reset"
        );
    };
    let mut offsets = TopicPartitionList::new();
    for element in assignment.elements() {
        offsets
            .add_partition_offset(topic, element.partition(), Offset::Offset(0))
            .expect("offset");
    }
    consumer
        .commit(&offsets, CommitMode::Sync)
        .expect("reset the group's offsets");
    consumer.unsubscribe();
}
