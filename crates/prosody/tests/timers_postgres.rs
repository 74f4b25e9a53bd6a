//! Durable timers with the PostgreSQL store: a timer outlives the consumer that
//! scheduled it, and follows its partition to another consumer on rebalance.
//!
//! Needs `PROSODY_TEST_DATABASE_URL` (set by `./script/test`, which starts a
//! private cluster with `./script/postgres`); fails rather than skips without it.

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prosody::{
    ClassifyError, Client, ConfigBuilder, Context, EventHandler, Message, OptionValue, Timer,
};
use serde_json::json;
use support::{client, config, database_url, lock, produce, topic, unique, wait_until, Record};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failed(String);

impl ClassifyError for Failed {}

/// Schedules a timer `in_ms` from now for every message's key; records firings.
#[derive(Default, Clone)]
struct Scheduler {
    fired: Arc<Mutex<Vec<(i32, String)>>>,
    scheduled: Arc<Mutex<BTreeSet<(i32, String)>>>,
}

impl EventHandler for Scheduler {
    type Error = Failed;

    async fn on_message(&self, context: Context, message: Message) -> Result<(), Failed> {
        let delay = Duration::from_millis(message.payload()["in_ms"].as_u64().unwrap_or(0));
        context
            .schedule(SystemTime::now() + delay)
            .await
            .map_err(|error| Failed(error.to_string()))?;
        lock(&self.scheduled).insert((message.partition(), message.key().to_owned()));
        Ok(())
    }

    async fn on_timer(&self, _context: Context, timer: Timer) -> Result<(), Failed> {
        let partition = timer
            .key()
            .strip_prefix('p')
            .and_then(|rest| rest.split('-').next())
            .and_then(|number| number.parse().ok())
            .unwrap_or(-1);
        lock(&self.fired).push((partition, timer.key().to_owned()));
        Ok(())
    }
}

fn durable(builder: ConfigBuilder) -> ConfigBuilder {
    builder
        .set("database_url", database_url().into())
        .and_then(|builder| builder.set("probe_port", OptionValue::Bool(false)))
        .expect("options")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_timer_fires_once_after_a_restart() {
    let source = topic("pg-timers-restart", 1);
    let group = unique("group");
    let first = Scheduler::default();
    let consumer = client(durable(config(&group, &source)));
    consumer.subscribe(first.clone()).expect("subscribe");
    produce(&source, [Record::json("p0-later", &json!({"in_ms": 1500}))]);
    wait_until("the timer is scheduled", || {
        lock(&first.scheduled).len() == 1
    })
    .await;
    consumer.unsubscribe().await.expect("unsubscribe");
    drop(consumer);

    let second = Scheduler::default();
    let restarted: Arc<Client> = client(durable(config(&group, &source)));
    restarted
        .subscribe(second.clone())
        .expect("subscribe again");
    wait_until("the timer fires after the restart", || {
        lock(&second.fired).len() == 1
    })
    .await;
    // A second firing would come before a timer scheduled 700 ms after the first.
    produce(
        &source,
        [Record::json("p0-sentinel", &json!({"in_ms": 700}))],
    );
    wait_until("the later timer fires", || lock(&second.fired).len() >= 2).await;
    assert_eq!(
        lock(&second.fired).clone(),
        vec![(0, "p0-later".to_owned()), (0, "p0-sentinel".to_owned())],
        "fired more than once"
    );
    assert!(lock(&first.fired).is_empty(), "fired before its time");
    restarted.unsubscribe().await.expect("unsubscribe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_move_with_their_partition() {
    let source = topic("pg-timers-rebalance", 2);
    let group = unique("group");
    let first = Scheduler::default();
    let a = client(durable(config(&group, &source)));
    a.subscribe(first.clone()).expect("subscribe a");
    wait_until("a owns both partitions", || a.assigned_partitions() == 2).await;
    produce(
        &source,
        (0..2).map(|partition| {
            Record::json(&format!("p{partition}-timer"), &json!({"in_ms": 4000}))
                .in_partition(partition)
        }),
    );
    wait_until("both timers scheduled by a", || {
        lock(&first.scheduled).len() == 2
    })
    .await;

    let second = Scheduler::default();
    let b = client(durable(config(&group, &source)));
    b.subscribe(second.clone()).expect("subscribe b");
    wait_until("the partitions split", || {
        a.assigned_partitions() == 1 && b.assigned_partitions() == 1
    })
    .await;
    wait_until("both timers fire", || {
        lock(&first.fired).len() + lock(&second.fired).len() == 2
    })
    .await;
    // Each fired exactly once, by whichever consumer owns its partition now.
    assert_eq!(
        lock(&first.fired).len(),
        1,
        "a fired {:?}",
        lock(&first.fired)
    );
    assert_eq!(
        lock(&second.fired).len(),
        1,
        "b fired {:?}",
        lock(&second.fired)
    );
    a.unsubscribe().await.expect("unsubscribe a");
    b.unsubscribe().await.expect("unsubscribe b");
}
