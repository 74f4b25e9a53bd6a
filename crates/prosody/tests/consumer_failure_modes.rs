//! Failure handling end to end on the mock cluster: the three modes, the
//! dead-letter topic and its headers, and a failing key that neither blocks the
//! other keys of its partition nor lets the commit pass it.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use prosody::{Client, ConfigBuilder, Context, EventHandler, FailureKind, Message, OptionValue};
use serde_json::json;
use support::{
    client, commits, committed, config, lock, log_lines_with, produce, topic, unique, wait_until,
    with, Record, Refused, Seen,
};

/// Fails every message of `bad` keys (permanently when `permanent`), fails the
/// first `flaky_failures` attempts of `flaky` keys, and records successes.
struct Scripted {
    seen: Seen,
    attempts: Arc<Mutex<BTreeMap<i64, u32>>>,
    bad_permanent: bool,
    flaky_failures: u32,
    healed: Arc<AtomicBool>,
}

impl Scripted {
    fn new(bad_permanent: bool, flaky_failures: u32) -> Self {
        Self {
            seen: Seen::default(),
            attempts: Arc::default(),
            bad_permanent,
            flaky_failures,
            healed: Arc::default(),
        }
    }
}

impl EventHandler for Scripted {
    type Error = Refused;

    async fn on_message(&self, _context: Context, message: Message) -> Result<(), Refused> {
        let attempt = {
            let mut attempts = lock(&self.attempts);
            let count = attempts.entry(message.offset()).or_default();
            *count += 1;
            *count
        };
        if message.key().starts_with("bad") && !self.healed.load(Ordering::SeqCst) {
            return Err(Refused("bad key refused", self.bad_permanent));
        }
        if message.key().starts_with("flaky") && attempt <= self.flaky_failures {
            return Err(Refused("flaky dependency", false));
        }
        self.seen.push(message);
        Ok(())
    }
}

fn fast_retries(builder: ConfigBuilder) -> ConfigBuilder {
    with(
        builder,
        &[
            ("retry_base", "5ms".into()),
            ("max_retry_delay", "20ms".into()),
            ("max_retries", OptionValue::Int(2)),
            ("probe_port", OptionValue::Bool(false)),
        ],
    )
}

/// Subscribes a recorder to `topic` (from the beginning) and returns what it sees.
fn read_back(topic: &str) -> (Arc<Client>, Seen) {
    let seen = Seen::default();
    let reader = client(with(
        config(&unique("reader"), topic),
        &[("probe_port", OptionValue::Bool(false))],
    ));
    reader.subscribe(seen.recorder()).expect("subscribe reader");
    (reader, seen)
}

fn header<'a>(message: &'a Message, name: &str) -> &'a str {
    message
        .header(name)
        .unwrap_or_else(|| panic!("dead letter lacks header {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_latency_dead_letters_after_max_retries() {
    let source = topic("low-latency", 1);
    let dead = topic("low-latency-dlq", 1);
    produce(
        &source,
        (0..20).map(|i| Record::json(if i == 7 { "bad-7" } else { "good" }, &json!({ "i": i }))),
    );
    let handler = Scripted::new(false, 0);
    let seen = handler.seen.clone();
    let attempts = Arc::clone(&handler.attempts);
    let consumer = client(fast_retries(with(
        config(&unique("group"), &source),
        &[
            ("mode", "low_latency".into()),
            ("failure_topic", dead.as_str().into()),
        ],
    )));
    consumer.subscribe(handler).expect("subscribe");
    wait_until("19 good messages handled", || seen.len() == 19).await;

    let (reader, dead_letters) = read_back(&dead);
    wait_until("the bad message reaches the failure topic", || {
        dead_letters.len() == 1
    })
    .await;
    let letter = &dead_letters.messages()[0];
    assert_eq!(letter.key(), "bad-7");
    assert_eq!(letter.payload(), &json!({ "i": 7 }));
    assert_eq!(header(letter, "prosody-original-topic"), source);
    assert_eq!(header(letter, "prosody-original-partition"), "0");
    assert_eq!(header(letter, "prosody-original-offset"), "7");
    assert_eq!(
        header(letter, "prosody-attempts"),
        "3",
        "1 attempt + max_retries 2"
    );
    assert_eq!(header(letter, "prosody-failure-kind"), "transient");
    assert_eq!(header(letter, "prosody-error-message"), "bad key refused");
    assert!(header(letter, "prosody-error-class").contains("Refused"));
    assert_eq!(lock(&attempts).get(&7), Some(&3));
    consumer.unsubscribe().await.expect("unsubscribe");
    reader.unsubscribe().await.expect("unsubscribe reader");
}

/// Overruns `timeout` on key "slow" (until cancelled) and names the failures
/// Prosody finds itself.
struct NamesItsFailures {
    seen: Seen,
}

impl EventHandler for NamesItsFailures {
    type Error = Refused;

    async fn on_message(&self, context: Context, message: Message) -> Result<(), Refused> {
        if message.key() == "slow" {
            context.on_cancel().await;
            return Ok(());
        }
        self.seen.push(message);
        Ok(())
    }

    fn failure_class(&self, kind: FailureKind) -> String {
        format!("Custom::{}", kind.as_str())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_prosody_finds_itself_is_named_by_the_handler() {
    let source = topic("timeout-class", 1);
    let dead = topic("timeout-class-dlq", 1);
    produce(
        &source,
        ["slow", "good"]
            .iter()
            .map(|key| Record::json(key, &json!({ "key": key }))),
    );
    let handler = NamesItsFailures {
        seen: Seen::default(),
    };
    let consumer = client(fast_retries(with(
        config(&unique("group"), &source),
        &[
            ("mode", "low_latency".into()),
            ("failure_topic", dead.as_str().into()),
            ("timeout", "50ms".into()),
            ("max_retries", OptionValue::Int(0)),
        ],
    )));
    consumer.subscribe(handler).expect("subscribe");

    let (reader, dead_letters) = read_back(&dead);
    wait_until("the timed-out message is dead-lettered", || {
        dead_letters.len() == 1
    })
    .await;
    let letter = &dead_letters.messages()[0];
    assert_eq!(letter.key(), "slow");
    assert_eq!(header(letter, "prosody-failure-kind"), "timeout");
    assert_eq!(header(letter, "prosody-error-class"), "Custom::timeout");
    consumer.unsubscribe().await.expect("unsubscribe");
    reader.unsubscribe().await.expect("unsubscribe reader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_retries_transient_and_dead_letters_permanent() {
    let source = topic("pipeline", 1);
    let dead = topic("pipeline-dlq", 1);
    let keys = ["good", "flaky", "bad-permanent", "good"];
    produce(
        &source,
        keys.iter()
            .enumerate()
            .map(|(i, key)| Record::json(key, &json!({ "i": i }))),
    );
    let handler = Scripted::new(true, 5);
    let seen = handler.seen.clone();
    let attempts = Arc::clone(&handler.attempts);
    let consumer = client(fast_retries(with(
        config(&unique("group"), &source),
        &[("failure_topic", dead.as_str().into())],
    )));
    consumer.subscribe(handler).expect("subscribe");
    // max_retries does not apply in pipeline mode: the flaky message fails 5 times, then succeeds.
    wait_until("good and flaky messages handled", || seen.len() == 3).await;
    assert_eq!(lock(&attempts).get(&1), Some(&6));

    let (reader, dead_letters) = read_back(&dead);
    wait_until("the permanent failure is dead-lettered", || {
        dead_letters.len() == 1
    })
    .await;
    let letter = &dead_letters.messages()[0];
    assert_eq!(header(letter, "prosody-original-offset"), "2");
    assert_eq!(
        header(letter, "prosody-attempts"),
        "1",
        "permanent failures are not retried"
    );
    assert_eq!(header(letter, "prosody-failure-kind"), "permanent");
    consumer.unsubscribe().await.expect("unsubscribe");
    reader.unsubscribe().await.expect("unsubscribe reader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_effort_skips_after_max_retries_and_the_key_moves_on() {
    let source = topic("best-effort", 1);
    produce(
        &source,
        ["bad-a", "bad-a", "good"]
            .iter()
            .map(|key| Record::json(key, &json!({ "k": key }))),
    );
    let handler = Scripted::new(false, 0);
    let seen = handler.seen.clone();
    let attempts = Arc::clone(&handler.attempts);
    let consumer = client(fast_retries(with(
        config(&unique("group"), &source),
        &[("mode", "best_effort".into())],
    )));
    consumer.subscribe(handler).expect("subscribe");
    wait_until("both bad messages tried 3 times", || {
        let attempts = lock(&attempts);
        attempts.get(&0) == Some(&3) && attempts.get(&1) == Some(&3)
    })
    .await;
    wait_until("the good message is handled", || seen.len() == 1).await;
    wait_until("skips are logged", || {
        log_lines_with(&source)
            .iter()
            .filter(|line| line.contains("skipping message after failure"))
            .count()
            == 2
    })
    .await;
    // The skipped messages count as done: everything is committed.
    wait_until("commit passes the skipped messages", || {
        committed(&consumer, &source) == Some(3)
    })
    .await;
    consumer.unsubscribe().await.expect("unsubscribe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_key_does_not_block_others_and_holds_the_commit() {
    let source = topic("isolation", 1);
    // Offset 0 belongs to the failing key; 50 other keys follow, 4 messages each.
    let mut records = vec![Record::json("bad-key", &json!({ "i": 0 }))];
    records
        .extend((0..200).map(|i| Record::json(&format!("key-{}", i % 50), &json!({ "i": i + 1 }))));
    produce(&source, records);
    let handler = Scripted::new(false, 0);
    let seen = handler.seen.clone();
    let healed = Arc::clone(&handler.healed);
    let handler_attempts = Arc::clone(&handler.attempts);
    // Retried in place, as without deferral (tests/consumer_defer.rs covers deferral).
    let consumer = client(fast_retries(with(
        config(&unique("group"), &source),
        &[("defer", OptionValue::Bool(false))],
    )));
    consumer.subscribe(handler).expect("subscribe");

    wait_until("all 200 messages of the 50 healthy keys handled", || {
        seen.len() == 200
    })
    .await;
    wait_until("the failing key keeps being retried", || {
        lock(&handler_attempts).get(&0).copied().unwrap_or(0) >= 5
    })
    .await;
    // Two more commits of every commit point (sent even when unmoved): the
    // commit must stay at the failing offset.
    let sent = commits(&consumer);
    wait_until("two more commits", || commits(&consumer) >= sent + 2.0).await;
    assert_eq!(
        committed(&consumer, &source),
        Some(0),
        "the commit passed a failing message"
    );

    healed.store(true, Ordering::SeqCst);
    wait_until("the failing message finally succeeds", || seen.len() == 201).await;
    wait_until("the commit moves past everything", || {
        committed(&consumer, &source) == Some(201)
    })
    .await;
    consumer.unsubscribe().await.expect("unsubscribe");
}
