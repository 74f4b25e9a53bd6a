//! No loss: every produced message reaches the handler, across partitions.

mod support;

use std::collections::BTreeSet;

use serde_json::json;
use support::{Record, Seen};

const PARTITIONS: i32 = 4;
const MESSAGES: usize = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_produced_message_is_handled() {
    let topic = support::topic("delivery", PARTITIONS);
    let records =
        (0..MESSAGES).map(|n| Record::json(&format!("key-{}", n % 97), &json!({ "n": n })));
    support::produce(&topic, records);

    let seen = Seen::default();
    let client = support::client(support::config(&support::unique("delivery"), &topic));
    client.subscribe(seen.recorder()).expect("subscribe");
    support::wait_until("all messages handled", || {
        seen.positions().len() >= MESSAGES
    })
    .await;
    client.unsubscribe().await.expect("unsubscribe");

    let positions = seen.positions();
    assert_eq!(
        positions.len(),
        MESSAGES,
        "distinct (partition, offset) pairs handled"
    );
    let partitions: BTreeSet<i32> = positions.iter().map(|(partition, _)| *partition).collect();
    assert_eq!(
        partitions.len(),
        4,
        "messages came from every partition: {partitions:?}"
    );
    let numbers: BTreeSet<u64> = seen
        .messages()
        .iter()
        .map(|message| message.payload()["n"].as_u64().expect("payload carries n"))
        .collect();
    assert_eq!(
        numbers,
        (0..MESSAGES as u64).collect(),
        "every payload arrived"
    );
}

/// librdkafka's logs, rebalances and commit results queue up as events on the
/// consumer's queue; a burst of them (here: debug logging) must not delay the
/// assignment by one `poll_interval` per event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_client_events_does_not_delay_consumption() {
    let topic = support::topic("delivery-events", 2);
    support::produce(
        &topic,
        (0..100).map(|n| Record::json(&format!("key-{n}"), &json!({ "n": n }))),
    );

    let seen = Seen::default();
    let builder = support::config(&support::unique("delivery-events"), &topic)
        .poll_interval(std::time::Duration::from_millis(100))
        .kafka("debug", "all");
    let client = support::client(builder);
    let started = std::time::Instant::now();
    client.subscribe(seen.recorder()).expect("subscribe");
    support::wait_until("all messages handled", || seen.positions().len() >= 100).await;
    let elapsed = started.elapsed();
    client.unsubscribe().await.expect("unsubscribe");
    assert!(
        elapsed < std::time::Duration::from_secs(5),
        "took {elapsed:?} to consume 100 messages with debug logging on"
    );
}
