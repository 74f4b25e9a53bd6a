//! Timers end to end in mock mode (memory store): scheduling from a handler,
//! firing through the key's queue, unscheduling, replacement, restarts, and
//! the error a consumer without a store gives.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prosody::{ClassifyError, Client, Context, EventHandler, Message, OptionValue, Timer};
use serde_json::json;
use support::{client, config, lock, produce, topic, unique, wait_until, Record};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failed(String);

impl ClassifyError for Failed {}

/// Each message says what to do with its key's timers: `{"op": "...", "in_ms": n}`.
#[derive(Default, Clone)]
struct Timers {
    fired: Arc<Mutex<Vec<(String, SystemTime, SystemTime)>>>,
    listed: Arc<Mutex<BTreeMap<String, Vec<SystemTime>>>>,
    errors: Arc<Mutex<Vec<String>>>,
    /// Handler calls (messages and timers) running right now, per key.
    running: Arc<Mutex<BTreeMap<String, i32>>>,
    overlaps: Arc<AtomicI32>,
}

impl Timers {
    fn enter(&self, key: &str) {
        let mut running = lock(&self.running);
        let count = running.entry(key.to_owned()).or_default();
        *count += 1;
        if *count > 1 {
            self.overlaps.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn leave(&self, key: &str) {
        *lock(&self.running).entry(key.to_owned()).or_default() -= 1;
    }

    fn fired_keys(&self) -> Vec<String> {
        lock(&self.fired)
            .iter()
            .map(|(key, _, _)| key.clone())
            .collect()
    }
}

impl EventHandler for Timers {
    type Error = Failed;

    async fn on_message(&self, context: Context, message: Message) -> Result<(), Failed> {
        self.enter(message.key());
        let payload = message.payload();
        let at = SystemTime::now() + Duration::from_millis(payload["in_ms"].as_u64().unwrap_or(0));
        let result = match payload["op"].as_str().unwrap_or_default() {
            "schedule" => context.schedule(at).await,
            "unschedule" => {
                context
                    .unschedule(
                        SystemTime::UNIX_EPOCH
                            + Duration::from_millis(payload["at_ms"].as_u64().unwrap_or(0)),
                    )
                    .await
            }
            "clear" => context.clear_scheduled().await,
            "replace" => context.clear_and_schedule(at).await,
            "list" => match context.scheduled().await {
                Ok(times) => {
                    lock(&self.listed).insert(message.key().to_owned(), times);
                    Ok(())
                }
                Err(error) => Err(error),
            },
            "slow" => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok(())
            }
            _ => Ok(()),
        };
        if let Err(error) = &result {
            lock(&self.errors).push(error.to_string());
        }
        self.leave(message.key());
        result.map_err(|error| Failed(error.to_string()))
    }

    async fn on_timer(&self, _context: Context, timer: Timer) -> Result<(), Failed> {
        self.enter(timer.key());
        lock(&self.fired).push((timer.key().to_owned(), timer.time(), SystemTime::now()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.leave(timer.key());
        Ok(())
    }
}

fn quiet(builder: prosody::ConfigBuilder) -> prosody::ConfigBuilder {
    builder
        .set("probe_port", OptionValue::Bool(false))
        .expect("option")
}

fn op(key: &str, payload: serde_json::Value) -> Record {
    Record::json(key, &payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_timers_fire_and_unscheduled_ones_do_not() {
    let source = topic("timers", 1);
    let handler = Timers::default();
    let consumer = client(quiet(config(&unique("group"), &source)));
    consumer.subscribe(handler.clone()).expect("subscribe");
    let scheduled_at = SystemTime::now();
    produce(
        &source,
        [
            op("fires", json!({"op": "schedule", "in_ms": 200})),
            op("past", json!({"op": "schedule", "in_ms": 0})),
            op("cleared", json!({"op": "schedule", "in_ms": 400})),
            op("cleared", json!({"op": "schedule", "in_ms": 500})),
            op("cleared", json!({"op": "list"})),
            op("cleared", json!({"op": "clear"})),
            op("replaced", json!({"op": "schedule", "in_ms": 300})),
            op("replaced", json!({"op": "replace", "in_ms": 600})),
            op("replaced", json!({"op": "list"})),
        ],
    );
    wait_until("the due timers fire", || handler.fired_keys().len() >= 3).await;
    // A timer due after everything above: once it fired, anything wrongly left
    // scheduled (due by 600 ms) had its turn to fire as well.
    produce(
        &source,
        [op("sentinel", json!({"op": "schedule", "in_ms": 300}))],
    );
    wait_until("the later timer fires", || {
        handler.fired_keys().iter().any(|key| key == "sentinel")
    })
    .await;
    let mut fired = handler.fired_keys();
    fired.retain(|key| key != "sentinel");
    fired.sort();
    assert_eq!(
        fired,
        vec!["fires", "past", "replaced"],
        "errors: {:?}",
        lock(&handler.errors)
    );
    for (key, due, ran) in lock(&handler.fired).iter() {
        assert!(ran >= due, "{key} ran before its time");
        assert!(
            *due >= scheduled_at,
            "{key}: due time comes from the schedule call"
        );
    }
    let listed = lock(&handler.listed).clone();
    assert_eq!(listed["cleared"].len(), 2, "scheduled lists pending timers");
    assert_eq!(listed["replaced"].len(), 1, "clear_and_schedule replaces");
    assert_eq!(handler.overlaps.load(Ordering::SeqCst), 0);
    consumer.unsubscribe().await.expect("unsubscribe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_never_runs_alongside_a_message_of_its_key() {
    let source = topic("timers-exclusive", 1);
    let handler = Timers::default();
    let consumer = client(quiet(config(&unique("group"), &source)));
    consumer.subscribe(handler.clone()).expect("subscribe");
    let mut records = vec![op("k", json!({"op": "schedule", "in_ms": 50}))];
    records.extend((0..5).map(|_| op("k", json!({"op": "slow"}))));
    produce(&source, records);
    wait_until("the timer fired", || handler.fired_keys().len() == 1).await;
    wait_until("the slow messages finished", || {
        lock(&handler.running).get("k") == Some(&0)
    })
    .await;
    assert_eq!(
        handler.overlaps.load(Ordering::SeqCst),
        0,
        "a timer ran while a message of its key ran"
    );
    consumer.unsubscribe().await.expect("unsubscribe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_survives_a_restart_and_fires_once() {
    let source = topic("timers-restart", 1);
    let group = unique("group");
    let first = Timers::default();
    let consumer = client(quiet(config(&group, &source)));
    consumer.subscribe(first.clone()).expect("subscribe");
    produce(
        &source,
        [op("later", json!({"op": "schedule", "in_ms": 1500}))],
    );
    wait_until("scheduled", || {
        consumer
            .partition_stats()
            .first()
            .is_some_and(|stats| stats.finished == 1)
    })
    .await;
    consumer.unsubscribe().await.expect("unsubscribe");
    drop(consumer);

    let second = Timers::default();
    let restarted: Arc<Client> = client(quiet(config(&group, &source)));
    restarted
        .subscribe(second.clone())
        .expect("subscribe again");
    wait_until("the timer fires under the new consumer", || {
        second.fired_keys() == vec!["later"]
    })
    .await;
    // A second firing would come before a timer scheduled 500 ms after the first.
    produce(
        &source,
        [op("sentinel", json!({"op": "schedule", "in_ms": 500}))],
    );
    wait_until("the later timer fires", || second.fired_keys().len() >= 2).await;
    assert_eq!(
        second.fired_keys(),
        vec!["later", "sentinel"],
        "fired more than once"
    );
    assert!(first.fired_keys().is_empty());
    restarted.unsubscribe().await.expect("unsubscribe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_store_timer_calls_explain_what_to_configure() {
    // A real-broker configuration (the mock cluster's address, but mock off) with
    // no database_url has no timer store: mock mode would pick the memory store.
    let source = topic("timers-no-store", 1);
    let handler = Timers::default();
    let consumer = client(quiet(
        prosody::Config::builder()
            .bootstrap_servers([prosody::mock::bootstrap_servers().expect("mock")])
            .group_id(&unique("group"))
            .subscribed_topics([source.as_str()])
            .kafka("session.timeout.ms", "6000"),
    ));
    consumer.subscribe(handler.clone()).expect("subscribe");
    produce(&source, [op("k", json!({"op": "schedule", "in_ms": 10}))]);
    wait_until("the schedule call failed", || {
        !lock(&handler.errors).is_empty()
    })
    .await;
    consumer.unsubscribe().await.expect("unsubscribe");
    let message = lock(&handler.errors)[0].clone();
    assert!(
        message.contains("`database_url`") && message.contains("state_store"),
        "the error should say what to configure: {message}"
    );
}
