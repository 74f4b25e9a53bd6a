//! Rebalance: a second consumer joining the group takes over part of the
//! partitions; handlers in flight on partitions taken from the first consumer
//! are cancelled, and no message is lost.

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prosody::{ConfigBuilder, Context, Message};
use serde_json::json;
use support::{lock, FnHandler, Record, Seen, TestError};

const PARTITIONS: i32 = 4;
const PER_PARTITION: i64 = 50;
/// In every partition, the message at this offset blocks consumer A until cancelled.
const BLOCKER: i64 = 10;

fn config(group: &str, topic: &str) -> ConfigBuilder {
    support::config(group, topic).shutdown_timeout(Duration::from_secs(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_joining_consumer_takes_partitions_and_in_flight_work_is_cancelled() {
    let topic = support::topic("rebalance", PARTITIONS);
    let group = support::unique("rebalance");
    let records = (0..PARTITIONS).flat_map(|partition| {
        (0..PER_PARTITION).map(move |offset| {
            let key = if offset == BLOCKER {
                format!("blocker-{partition}")
            } else {
                format!("key-{}", offset % 5)
            };
            Record::json(&key, &json!({ "partition": partition, "offset": offset }))
                .in_partition(partition)
        })
    });
    support::produce(&topic, records);

    // A finishes everything except the blockers, which wait for cancellation.
    let finished_by_a = Seen::default();
    let blocked = Seen::default();
    let cancelled: Arc<Mutex<BTreeSet<i32>>> = Arc::default();
    let a_leaving = Arc::new(AtomicBool::new(false));
    let handler = {
        let (finished_by_a, blocked) = (finished_by_a.clone(), blocked.clone());
        let (cancelled, a_leaving) = (Arc::clone(&cancelled), Arc::clone(&a_leaving));
        FnHandler(move |context: Context, message: Message| {
            let (finished_by_a, blocked) = (finished_by_a.clone(), blocked.clone());
            let (cancelled, a_leaving) = (Arc::clone(&cancelled), Arc::clone(&a_leaving));
            async move {
                if message.key().starts_with("blocker") {
                    let partition = message.partition();
                    blocked.push(message);
                    context.on_cancel().await;
                    assert!(context.should_cancel());
                    if !a_leaving.load(Ordering::SeqCst) {
                        lock(&cancelled).insert(partition);
                    }
                    return Err(TestError::Cancelled);
                }
                finished_by_a.push(message);
                Ok(())
            }
        })
    };
    let a = support::client(config(&group, &topic));
    a.subscribe(handler).expect("subscribe A");
    let total = usize::try_from(i64::from(PARTITIONS) * PER_PARTITION).expect("small");
    support::wait_until("A handled every partition up to its blockers", || {
        finished_by_a.len() >= total - PARTITIONS as usize && blocked.len() >= PARTITIONS as usize
    })
    .await;
    assert_eq!(a.assigned_partitions(), 4);

    let handled_by_b = Seen::default();
    let b = support::client(config(&group, &topic));
    b.subscribe(handled_by_b.recorder()).expect("subscribe B");
    support::wait_until("the partitions are split between A and B", || {
        let (on_a, on_b) = (a.assigned_partitions(), b.assigned_partitions());
        on_a > 0 && on_b > 0 && on_a + on_b == 4
    })
    .await;
    let moved: BTreeSet<i32> = b
        .partition_stats()
        .iter()
        .map(|stats| stats.partition)
        .collect();
    assert!(
        !moved.is_empty() && moved.len() < 4,
        "B owns some partitions: {moved:?}"
    );
    support::wait_until(
        "A's blockers on the moved partitions saw cancellation",
        || moved.is_subset(&lock(&cancelled)),
    )
    .await;
    let kept: BTreeSet<i32> = a
        .partition_stats()
        .iter()
        .map(|stats| stats.partition)
        .collect();
    assert!(
        lock(&cancelled).is_disjoint(&kept),
        "handlers on partitions A kept were cancelled: kept {kept:?}, cancelled {:?}",
        lock(&cancelled)
    );
    support::wait_until("B re-ran the blockers of its partitions", || {
        let handled = handled_by_b.positions();
        moved
            .iter()
            .all(|partition| handled.contains(&(*partition, BLOCKER)))
    })
    .await;

    // A leaves; B takes everything and re-runs the remaining blockers.
    a_leaving.store(true, Ordering::SeqCst);
    a.unsubscribe().await.expect("unsubscribe A");
    support::wait_until("B owns all partitions", || b.assigned_partitions() == 4).await;
    let all: BTreeSet<(i32, i64)> = (0..PARTITIONS)
        .flat_map(|partition| (0..PER_PARTITION).map(move |offset| (partition, offset)))
        .collect();
    support::wait_until("every message handled by A or B", || {
        let handled: BTreeSet<_> = finished_by_a
            .positions()
            .union(&handled_by_b.positions())
            .copied()
            .collect();
        handled == all
    })
    .await;
    b.unsubscribe().await.expect("unsubscribe B");
}
