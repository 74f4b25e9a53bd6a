//! One deadline for every blocking step of a stop: `unsubscribe` returns within
//! `shutdown_timeout` even when the brokers are gone, and a revocation of many
//! partitions whose handlers ignore cancellation takes one `shutdown_timeout`,
//! not one per partition.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prosody::{Client, Context, Message, OptionValue};
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use serde_json::json;
use support::{lock, unique, wait_until, FnHandler, Record, Seen, DEADLINE};

/// What `unsubscribe` may take beyond `shutdown_timeout`.
const MARGIN: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_returns_within_shutdown_timeout_when_the_broker_is_gone() {
    const PARTITIONS: i32 = 2;
    const PER_PARTITION: usize = 20;
    let budget = Duration::from_secs(3);
    // A private cluster: taking its only broker down must not disturb other tests.
    let mock = MockCluster::new(1).expect("mock cluster");
    let topic = unique("broker-gone");
    mock.create_topic(&topic, PARTITIONS, 1)
        .expect("create topic");
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", mock.bootstrap_servers())
        .set("linger.ms", "1")
        .create()
        .expect("raw producer");
    for partition in 0..PARTITIONS {
        for n in 0..PER_PARTITION {
            let payload = format!("{{\"n\":{n}}}");
            producer
                .send(
                    BaseRecord::to(&topic)
                        .partition(partition)
                        .key("key")
                        .payload(&payload),
                )
                .expect("queue a message");
        }
    }
    producer.flush(DEADLINE).expect("all messages acknowledged");

    let config = support::config(&unique("broker-gone"), &topic)
        .mock(false)
        .bootstrap_servers([mock.bootstrap_servers()])
        .shutdown_timeout(budget)
        // No periodic commit: the final commit has work to do.
        .commit_interval(Duration::from_secs(600))
        // librdkafka holds a commit (and the close) for a missing coordinator up
        // to the session timeout: longer than the budget, as in production (45 s).
        .kafka("session.timeout.ms", "30000")
        .set("state_store", OptionValue::Str("memory".into()))
        .expect("state_store is an option")
        .build()
        .expect("valid config");
    let client = Arc::new(Client::new(config).expect("client"));
    let seen = Seen::default();
    client.subscribe(seen.recorder()).expect("subscribe");
    wait_until("every message handled", || {
        seen.positions().len() == PARTITIONS as usize * PER_PARTITION
    })
    .await;

    mock.broker_down(1).expect("broker down");
    let stopping = Instant::now();
    tokio::time::timeout(Duration::from_secs(120), client.unsubscribe())
        .await
        .expect("unsubscribe returned within two minutes")
        .expect("unsubscribe");
    let took = stopping.elapsed();
    eprintln!("unsubscribe with the broker gone took {took:?} (shutdown_timeout {budget:?})");
    assert!(
        took < budget + MARGIN,
        "unsubscribe took {took:?} with a {budget:?} shutdown_timeout and the broker gone"
    );
    let given_up = support::log_lines_with("within shutdown_timeout");
    assert!(
        given_up.iter().any(|line| line.contains("WARN")),
        "what the deadline gave up on is logged at WARN: {given_up:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoking_many_stubborn_partitions_takes_one_shutdown_timeout() {
    const PARTITIONS: i32 = 6;
    let budget = Duration::from_secs(2);
    let topic = support::topic("revoke-deadline", PARTITIONS);
    let group = unique("revoke-deadline");
    support::produce(
        &topic,
        (0..PARTITIONS).map(|partition| {
            Record::json(&format!("stubborn-{partition}"), &json!({})).in_partition(partition)
        }),
    );

    // A's stubborn handlers note when they are cancelled and keep going anyway.
    let started = Arc::new(AtomicUsize::new(0));
    let first_cancel: Arc<Mutex<Option<Instant>>> = Arc::default();
    let probe_handled: Arc<Mutex<Option<Instant>>> = Arc::default();
    let handler = {
        let (started, first_cancel) = (Arc::clone(&started), Arc::clone(&first_cancel));
        let probe_handled = Arc::clone(&probe_handled);
        FnHandler(move |context: Context, message: Message| {
            let (started, first_cancel) = (Arc::clone(&started), Arc::clone(&first_cancel));
            let probe_handled = Arc::clone(&probe_handled);
            async move {
                if message.key() == "probe" {
                    lock(&probe_handled).get_or_insert_with(Instant::now);
                    return Ok(());
                }
                started.fetch_add(1, Ordering::SeqCst);
                context.on_cancel().await;
                lock(&first_cancel).get_or_insert_with(Instant::now);
                // Ignores the cancellation.
                tokio::time::sleep(Duration::from_secs(120)).await;
                Ok(())
            }
        })
    };
    let a = support::client(support::config(&group, &topic).shutdown_timeout(budget));
    a.subscribe(handler).expect("subscribe A");
    wait_until("A runs a stubborn handler in every partition", || {
        started.load(Ordering::SeqCst) == PARTITIONS as usize
    })
    .await;

    let b = support::client(support::config(&group, &topic).shutdown_timeout(budget));
    b.subscribe(Seen::default().recorder())
        .expect("subscribe B");
    wait_until("A's revoked handlers are cancelled", || {
        lock(&first_cancel).is_some()
    })
    .await;
    // A's poll thread is inside the revocation until it ends; only then does it
    // hand A the probes in the partitions A keeps.
    support::produce(
        &topic,
        (0..PARTITIONS).map(|partition| Record::json("probe", &json!({})).in_partition(partition)),
    );
    wait_until("A handles a probe after the revocation", || {
        lock(&probe_handled).is_some()
    })
    .await;
    let revoked_for = lock(&probe_handled)
        .zip(*lock(&first_cancel))
        .map(|(probe, cancel)| probe.duration_since(cancel))
        .expect("both times recorded");
    let revoked = PARTITIONS as usize - a.assigned_partitions();
    eprintln!("revoking {revoked} partitions took {revoked_for:?} (shutdown_timeout {budget:?})");
    assert!(
        revoked > 1,
        "several partitions were revoked from A: {revoked}"
    );
    assert!(
        revoked_for < budget + Duration::from_millis(1500),
        "revoking {revoked} partitions whose handlers ignore cancellation took {revoked_for:?} \
         with a {budget:?} shutdown_timeout"
    );
    let (a_stopping, b_stopping) = (a.unsubscribe(), b.unsubscribe());
    let (a_result, b_result) = tokio::join!(a_stopping, b_stopping);
    a_result.expect("unsubscribe A");
    b_result.expect("unsubscribe B");
}
