//! Deferred retry in `:pipeline` mode, on the mock cluster (memory store): a
//! key that keeps failing transiently is set aside so that its partition moves
//! on, its messages run later in order, the failure-rate gate turns deferral
//! off when everything fails, and permanent failures are not deferred.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use prosody::{Client, ConfigBuilder, Context, EventHandler, Message, OptionValue};
use serde_json::json;
use support::{
    client, committed, config, lock, log_lines_with, produce, topic, unique, wait_until, with,
    Record, Refused, Seen,
};

/// Fails keys that start with `failing` (transiently, or permanently when
/// `permanent`) until healed, and records every success in order.
#[derive(Clone, Default)]
struct Poisoned {
    seen: Seen,
    attempts: Arc<Mutex<BTreeMap<i64, u32>>>,
    healed: Arc<AtomicBool>,
    permanent: bool,
    failing: &'static str,
}

impl Poisoned {
    fn new(failing: &'static str) -> Self {
        Self {
            failing,
            ..Self::default()
        }
    }

    fn attempts_of(&self, offset: i64) -> u32 {
        lock(&self.attempts).get(&offset).copied().unwrap_or(0)
    }
}

impl EventHandler for Poisoned {
    type Error = Refused;

    async fn on_message(&self, _context: Context, message: Message) -> Result<(), Refused> {
        *lock(&self.attempts).entry(message.offset()).or_default() += 1;
        if message.key().starts_with(self.failing) && !self.healed.load(Ordering::SeqCst) {
            return Err(Refused("downstream refused", self.permanent));
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
            ("max_retry_delay", "50ms".into()),
            ("defer_base", "5ms".into()),
            ("defer_max_delay", "50ms".into()),
            ("max_uncommitted", OptionValue::Int(100)),
        ],
    )
}

fn deferred(consumer: &Client) -> (usize, usize) {
    consumer
        .partition_stats()
        .iter()
        .fold((0, 0), |(keys, messages), stats| {
            (
                keys + stats.deferred_keys,
                messages + stats.deferred_messages,
            )
        })
}

const KEYS: i64 = 100;
const MESSAGES: i64 = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_key_is_deferred_while_the_other_keys_flow() {
    let source = topic("defer-poison", 1);
    // Key 0 is the poison key: 20 messages spread over the partition.
    produce(
        &source,
        (0..MESSAGES).map(|i| {
            let key = match i % KEYS {
                0 => "poison".to_owned(),
                other => format!("key-{other}"),
            };
            Record::json(&key, &json!({ "i": i }))
        }),
    );
    let handler = Poisoned::new("poison");
    // Fewer than the poison key's 20 messages: blocked in place, they would
    // fill the buffer and stop the partition halfway.
    let consumer = client(with(
        fast_retries(config(&unique("group"), &source)),
        &[("max_uncommitted", OptionValue::Int(10))],
    ));
    consumer.subscribe(handler.clone()).expect("subscribe");

    let others = usize::try_from(MESSAGES - MESSAGES / KEYS).expect("small");
    wait_until("every message of the 99 healthy keys handled", || {
        handler.seen.len() == others
    })
    .await;
    let poison_offsets: Vec<i64> = (0..MESSAGES).filter(|i| i % KEYS == 0).collect();
    wait_until("the commit passes the poison key's messages", || {
        committed(&consumer, &source) == Some(MESSAGES)
    })
    .await;
    wait_until(
        "the poison key's first message is retried after deferral",
        || handler.attempts_of(0) >= 3,
    )
    .await;
    assert_eq!(deferred(&consumer), (1, poison_offsets.len()));
    assert!(
        poison_offsets[1..]
            .iter()
            .all(|offset| handler.attempts_of(*offset) == 0),
        "messages deferred behind the first must not run before it"
    );

    handler.healed.store(true, Ordering::SeqCst);
    wait_until("the poison key's messages run once it recovers", || {
        handler.seen.len() == usize::try_from(MESSAGES).expect("small")
    })
    .await;
    let poison_order: Vec<i64> = handler
        .seen
        .messages()
        .iter()
        .filter(|message| message.key() == "poison")
        .map(Message::offset)
        .collect();
    assert_eq!(poison_order, poison_offsets, "in order, each once");
    assert_eq!(
        handler.seen.positions().len(),
        usize::try_from(MESSAGES).expect("small"),
        "none lost, none twice"
    );
    wait_until("nothing is deferred any more", || {
        deferred(&consumer) == (0, 0)
    })
    .await;
    consumer.unsubscribe().await.expect("unsubscribe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gate_turns_deferral_off_when_everything_fails() {
    let source = topic("defer-gate", 1);
    produce(
        &source,
        (0..200).map(|i| Record::json(&format!("failing-{}", i % 50), &json!({ "i": i }))),
    );
    let handler = Poisoned::new("failing");
    let consumer = client(with(
        fast_retries(config(&unique("group"), &source)),
        &[("max_concurrency", OptionValue::Int(2))],
    ));
    consumer.subscribe(handler.clone()).expect("subscribe");

    wait_until("every key was tried", || {
        (0..50).all(|offset| handler.attempts_of(offset) > 0)
    })
    .await;
    let (keys, _) = deferred(&consumer);
    assert!(
        keys < 30,
        "{keys} of 50 keys deferred: the gate let deferral go on while everything failed"
    );
    assert!(
        log_lines_with(&source)
            .iter()
            .any(|line| line.contains("retrying in place (blocking) instead of deferring")),
        "the gate's closing is logged"
    );
    assert!(
        committed(&consumer, &source).unwrap_or(0) < 200,
        "blocking retries hold the commit"
    );

    handler.healed.store(true, Ordering::SeqCst);
    wait_until("everything runs once the downstream is back", || {
        handler.seen.positions().len() == 200
    })
    .await;
    wait_until("the commit reaches the end", || {
        committed(&consumer, &source) == Some(200)
    })
    .await;
    wait_until("nothing is deferred any more", || {
        deferred(&consumer) == (0, 0)
    })
    .await;
    consumer.unsubscribe().await.expect("unsubscribe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_are_dead_lettered_not_deferred() {
    let source = topic("defer-permanent", 1);
    let dead = topic("defer-permanent-dlq", 1);
    produce(
        &source,
        (0..30).map(|i| {
            let key = if i % 3 == 0 { "bad" } else { "good" };
            Record::json(key, &json!({ "i": i }))
        }),
    );
    let handler = Poisoned {
        permanent: true,
        ..Poisoned::new("bad")
    };
    let consumer = client(with(
        fast_retries(config(&unique("group"), &source)),
        &[("failure_topic", dead.as_str().into())],
    ));
    consumer.subscribe(handler.clone()).expect("subscribe");

    let letters = Seen::default();
    let reader = client(config(&unique("reader"), &dead));
    reader
        .subscribe(letters.recorder())
        .expect("subscribe reader");
    wait_until("the 10 permanent failures are dead-lettered", || {
        letters.len() == 10
    })
    .await;
    wait_until("the 20 good messages are handled", || {
        handler.seen.len() == 20
    })
    .await;
    assert_eq!(
        deferred(&consumer),
        (0, 0),
        "a permanent failure was deferred"
    );
    for offset in (0..30).filter(|i| i % 3 == 0) {
        assert_eq!(
            handler.attempts_of(offset),
            1,
            "offset {offset} was retried"
        );
    }
    let order: Vec<String> = letters
        .messages()
        .iter()
        .map(|letter| {
            letter
                .header("prosody-original-offset")
                .unwrap_or("?")
                .to_owned()
        })
        .collect();
    let expected: Vec<String> = (0..30)
        .filter(|i| i % 3 == 0)
        .map(|i: i32| i.to_string())
        .collect();
    assert_eq!(order, expected);
    wait_until("the commit reaches the end", || {
        committed(&consumer, &source) == Some(30)
    })
    .await;
    consumer.unsubscribe().await.expect("unsubscribe");
    reader.unsubscribe().await.expect("unsubscribe reader");
}

/// Fails every attempt, noting when each began.
#[derive(Clone, Default)]
struct AlwaysFailing {
    attempts: Arc<Mutex<Vec<std::time::Instant>>>,
}

impl EventHandler for AlwaysFailing {
    type Error = Refused;

    async fn on_message(&self, _context: Context, _message: Message) -> Result<(), Refused> {
        lock(&self.attempts).push(std::time::Instant::now());
        Err(Refused("downstream refused", false))
    }
}

/// A deferred message waits `defer_base` (jittered down to half of it), not
/// the in-place `retry_base`, before its next try: deferral is for failures
/// that last, and each deferral is a write to the state store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deferred_retries_back_off_from_defer_base_not_retry_base() {
    let source = topic("defer-base", 1);
    produce(&source, [Record::json("failing", &json!({ "i": 0 }))]);
    let handler = AlwaysFailing::default();
    let consumer = client(with(
        config(&unique("group"), &source),
        &[
            ("retry_base", "5ms".into()),
            ("max_retry_delay", "5ms".into()),
            ("defer_base", "800ms".into()),
            ("defer_max_delay", "800ms".into()),
        ],
    ));
    consumer.subscribe(handler.clone()).expect("subscribe");
    wait_until("the message was tried three times", || {
        lock(&handler.attempts).len() >= 3
    })
    .await;
    assert_eq!(deferred(&consumer), (1, 1), "the message is deferred");
    consumer.unsubscribe().await.expect("unsubscribe");
    let attempts = lock(&handler.attempts).clone();
    for pair in attempts.windows(2).take(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= std::time::Duration::from_millis(380),
            "a deferred retry came {gap:?} after the last try (defer_base 800 ms, so at least 400 ms)"
        );
    }
}
