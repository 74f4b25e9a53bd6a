//! Deferred messages with the PostgreSQL store: they outlive the consumer that
//! deferred them, and follow their partition to another consumer on rebalance.
//!
//! Needs `PROSODY_TEST_DATABASE_URL` (set by `./script/test`, which starts a
//! private cluster with `./script/postgres`); fails rather than skips without it.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prosody::{Client, ConfigBuilder, Context, EventHandler, Message, OptionValue};
use serde_json::json;
use support::{
    client, config, database_url, produce, topic, unique, wait_until, Record, Refused, Seen,
};

/// Fails keys starting with "poison" transiently unless healed; records successes.
#[derive(Clone, Default)]
struct Poisoned {
    seen: Seen,
    healed: Arc<AtomicBool>,
}

impl Poisoned {
    fn healed() -> Self {
        let handler = Self::default();
        handler.healed.store(true, Ordering::SeqCst);
        handler
    }

    /// Offsets of `key` handled, in handling order.
    fn handled(&self, key: &str) -> Vec<(i32, i64)> {
        self.seen
            .messages()
            .iter()
            .filter(|message| message.key() == key)
            .map(|message| (message.partition(), message.offset()))
            .collect()
    }
}

impl EventHandler for Poisoned {
    type Error = Refused;

    async fn on_message(&self, _context: Context, message: Message) -> Result<(), Refused> {
        if message.key().starts_with("poison") && !self.healed.load(Ordering::SeqCst) {
            return Err(Refused("downstream refused", false));
        }
        self.seen.push(message);
        Ok(())
    }
}

fn durable(builder: ConfigBuilder) -> ConfigBuilder {
    [
        ("database_url", database_url().into()),
        ("retry_base", "5ms".into()),
        ("max_retry_delay", "50ms".into()),
        ("defer_base", "5ms".into()),
        ("defer_max_delay", "50ms".into()),
        ("probe_port", OptionValue::Bool(false)),
    ]
    .into_iter()
    .fold(builder, |builder, (name, value)| {
        builder.set(name, value).expect("known option")
    })
    .shutdown_timeout(Duration::from_secs(2))
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

/// `count` messages for `partition`: key "poison-p<partition>" at every fifth, others cycling.
fn records(partition: i32, count: i64) -> Vec<Record> {
    (0..count)
        .map(|i| {
            let key = if i % 5 == 2 {
                format!("poison-p{partition}")
            } else {
                format!("key-{}", i % 7)
            };
            Record::json(&key, &json!({ "i": i })).in_partition(partition)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_messages_survive_a_restart() {
    let source = topic("pg-defer-restart", 1);
    let group = unique("group");
    produce(&source, records(0, 25));
    let poison: Vec<(i32, i64)> = (0..25).filter(|i| i % 5 == 2).map(|i| (0, i)).collect();

    let first = Poisoned::default();
    let a = client(durable(config(&group, &source)));
    a.subscribe(first.clone()).expect("subscribe A");
    wait_until(
        "A handled the healthy keys and deferred the poison key",
        || first.seen.len() == 20 && deferred(&a) == (1, poison.len()),
    )
    .await;
    a.unsubscribe().await.expect("unsubscribe A");

    let second = Poisoned::healed();
    let b = client(durable(config(&group, &source)));
    b.subscribe(second.clone()).expect("subscribe B");
    wait_until("B ran the deferred messages it loaded", || {
        second.handled("poison-p0").len() == poison.len()
    })
    .await;
    assert_eq!(second.handled("poison-p0"), poison, "in order, each once");
    assert_eq!(
        second.seen.len(),
        poison.len(),
        "A's commit passed the deferred messages: B runs nothing else"
    );
    wait_until("nothing is deferred any more", || deferred(&b) == (0, 0)).await;
    b.unsubscribe().await.expect("unsubscribe B");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_messages_move_with_their_partition_on_rebalance() {
    let source = topic("pg-defer-rebalance", 2);
    let group = unique("group");
    produce(&source, records(0, 20).into_iter().chain(records(1, 20)));

    let first = Poisoned::default();
    let a = client(durable(config(&group, &source)));
    a.subscribe(first.clone()).expect("subscribe A");
    wait_until(
        "A handled the healthy keys and deferred both poison keys",
        || first.seen.len() == 32 && deferred(&a) == (2, 8),
    )
    .await;

    let second = Poisoned::healed();
    let b = client(durable(config(&group, &source)));
    b.subscribe(second.clone()).expect("subscribe B");
    wait_until("the partitions are split between A and B", || {
        a.assigned_partitions() == 1 && b.assigned_partitions() == 1
    })
    .await;
    let moved = b.partition_stats()[0].partition;
    let stayed = 1 - moved;
    let expected: Vec<(i32, i64)> = (0..20).filter(|i| i % 5 == 2).map(|i| (moved, i)).collect();
    wait_until(
        "B ran the deferred messages of the partition it took",
        || second.handled(&format!("poison-p{moved}")).len() == expected.len(),
    )
    .await;
    assert_eq!(
        second.handled(&format!("poison-p{moved}")),
        expected,
        "in order, each once"
    );
    assert!(second.handled(&format!("poison-p{stayed}")).is_empty());
    wait_until("A keeps only the partition it kept deferred", || {
        deferred(&a) == (1, 4)
    })
    .await;
    wait_until("B has nothing deferred", || deferred(&b) == (0, 0)).await;
    b.unsubscribe().await.expect("unsubscribe B");
    a.unsubscribe().await.expect("unsubscribe A");
}
