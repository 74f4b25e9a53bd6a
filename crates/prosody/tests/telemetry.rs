//! Lifecycle events on the telemetry topic (`telemetry_enabled`,
//! `telemetry_topic`), read back with a plain rdkafka consumer from the mock
//! cluster: what a consumer sends, in which form, and nothing when disabled.

mod support;

use std::time::Duration;

use prosody::{Context, EventHandler, Message, OptionValue};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};
use serde_json::{json, Value};
use support::{client, config, produce, topic, unique, wait_until, with, Record, Refused};

/// Refuses key `bad` permanently; handles the rest.
struct RefusesBad;

impl EventHandler for RefusesBad {
    type Error = Refused;

    async fn on_message(&self, _context: Context, message: Message) -> Result<(), Refused> {
        if message.key() == "bad" {
            return Err(Refused("bad key refused", true));
        }
        Ok(())
    }
}

/// Every record now on `topic` (made with one partition by the test): its
/// Kafka key and its JSON.
fn records(topic: &str) -> Vec<(String, Value)> {
    let bootstrap = prosody::mock::bootstrap_servers().expect("mock cluster");
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("telemetry-reader"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .expect("reader");
    let mut partitions = TopicPartitionList::new();
    partitions
        .add_partition_offset(topic, 0, Offset::Beginning)
        .expect("partition");
    reader.assign(&partitions).expect("assign");
    let mut found = Vec::new();
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        match reader.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
                let value = serde_json::from_slice(message.payload().unwrap_or_default())
                    .expect("a telemetry record is JSON");
                found.push((key, value));
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
            Some(Err(error)) => panic!("reading {topic}: {error}"),
            None => {}
        }
    }
    found
}

fn events_of<'a>(records: &'a [(String, Value)], group: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|(_, value)| value["group_id"] == group)
        .map(|(_, value)| value)
        .collect()
}

/// The events a consumer sends: its assignment and a dead-lettered message,
/// each one JSON object keyed by the group; nothing per handled message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_sends_its_lifecycle_events_keyed_by_its_group() {
    let source = topic("telemetry-source", 1);
    let dead = topic("telemetry-dead", 1);
    let telemetry = topic("telemetry", 1);
    let group = unique("group");
    produce(
        &source,
        [
            Record::json("good", &json!({ "n": 1 })),
            Record::json("bad", &json!({ "n": 2 })),
            Record::json("good", &json!({ "n": 3 })),
        ],
    );
    let consumer = client(with(
        config(&group, &source),
        &[
            ("mode", "low_latency".into()),
            ("failure_topic", dead.as_str().into()),
            ("telemetry_topic", telemetry.as_str().into()),
        ],
    ));
    consumer.subscribe(RefusesBad).expect("subscribe");
    let mut seen = Vec::new();
    let mut wait = |wanted: &str| {
        let found = records(&telemetry);
        let mine: Vec<Value> = events_of(&found, &group).into_iter().cloned().collect();
        let done = mine.iter().any(|event| event["event"] == wanted);
        seen = found;
        done
    };
    wait_until(
        "the assignment and the dead letter on the telemetry topic",
        || wait("partition.assigned") && wait("message.dead_lettered"),
    )
    .await;
    consumer.unsubscribe().await.expect("unsubscribe");

    let mine = events_of(&seen, &group);
    assert!(
        seen.iter()
            .filter(|(_, value)| value["group_id"] == group.as_str())
            .all(|(key, _)| key == &group),
        "keyed by the group: {seen:?}"
    );
    let assigned = mine
        .iter()
        .find(|event| event["event"] == "partition.assigned")
        .expect("assigned");
    assert_eq!(assigned["topic"], source.as_str());
    assert_eq!(assigned["partition"], 0);
    assert_eq!(assigned["source_system"], group.as_str());
    assert!(assigned["pid"].as_u64().is_some() && assigned["timestamp_ms"].as_u64().is_some());
    let dead_lettered = mine
        .iter()
        .find(|event| event["event"] == "message.dead_lettered")
        .expect("dead-lettered");
    assert_eq!(dead_lettered["key"], "bad");
    assert_eq!(dead_lettered["offset"], 1);
    assert!(
        dead_lettered["error_message"]
            .as_str()
            .is_some_and(|message| message.contains("bad key refused")),
        "{dead_lettered}"
    );
    let lifecycle = [
        "partition.assigned",
        "partition.revoked",
        "consumer.stalled",
        "message.dead_lettered",
        "message.skipped",
    ];
    assert!(
        mine.iter()
            .all(|event| lifecycle.contains(&event["event"].as_str().unwrap_or_default())),
        "only lifecycle events: {mine:?}"
    );
}

/// With `telemetry_enabled: false` a consumer sends nothing: checked once
/// another consumer's events, sent after the first one's would have been,
/// have arrived on the same topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_enabled_false_sends_nothing() {
    let source = topic("telemetry-off", 1);
    let dead = topic("telemetry-off-dead", 1);
    let telemetry = topic("telemetry", 1);
    produce(&source, [Record::json("bad", &json!({ "n": 1 }))]);
    let silent_group = unique("silent");
    let silent = client(with(
        config(&silent_group, &source),
        &[
            ("mode", "low_latency".into()),
            ("failure_topic", dead.as_str().into()),
            ("telemetry_topic", telemetry.as_str().into()),
            ("telemetry_enabled", OptionValue::Bool(false)),
        ],
    ));
    silent.subscribe(RefusesBad).expect("subscribe");
    wait_until("the message was dead-lettered", || {
        let page = silent.metrics_text(prosody::MetricsFormat::Classic);
        support::metric_sum(&page, "prosody_messages_dead_lettered_total", &[]) >= 1.0
    })
    .await;

    let other = topic("telemetry-on", 1);
    let loud_group = unique("loud");
    let loud = client(with(
        config(&loud_group, &other),
        &[("telemetry_topic", telemetry.as_str().into())],
    ));
    loud.subscribe(RefusesBad).expect("subscribe");
    let mut seen = Vec::new();
    wait_until(
        "the enabled consumer's assignment on the telemetry topic",
        || {
            seen = records(&telemetry);
            !events_of(&seen, &loud_group).is_empty()
        },
    )
    .await;
    silent.unsubscribe().await.expect("unsubscribe");
    loud.unsubscribe().await.expect("unsubscribe");
    assert!(
        events_of(&seen, &silent_group).is_empty(),
        "the disabled consumer sent {seen:?}"
    );
}

/// Collects the skips an observer is told of.
#[derive(Default)]
struct Skips(std::sync::Mutex<Vec<prosody::Event>>);

impl prosody::Observer for Skips {
    fn wants(&self, kind: prosody::EventKind) -> bool {
        kind == prosody::EventKind::MessageSkipped
    }

    fn observe(&self, event: prosody::Event) {
        support::lock(&self.0).push(event);
    }
}

/// A filter's skip (here of the group's own messages) is routine: the observer
/// hears of each one, while the telemetry topic, which carries lifecycle
/// events, gets its assignment and none of the skips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_message_skips_reach_the_observer_and_not_telemetry() {
    let source = topic("telemetry-own", 1);
    let telemetry = topic("telemetry-own-events", 1);
    let group = unique("group");
    let consumer = client(with(
        config(&group, &source),
        &[("telemetry_topic", telemetry.as_str().into())],
    ));
    let skips = std::sync::Arc::new(Skips::default());
    assert!(consumer.set_observer(skips.clone()));
    let sent = 5;
    for n in 0..sent {
        // source_system defaults to the group id: these are the group's own.
        consumer
            .send(&source, &format!("k{n}"), &json!({ "n": n }), &[])
            .await
            .expect("send");
    }
    consumer.subscribe(RefusesBad).expect("subscribe");
    let mut seen = Vec::new();
    wait_until("every own message skipped, and the assignment sent", || {
        seen = records(&telemetry);
        consumer.skip_counts().own_messages == sent
            && events_of(&seen, &group)
                .iter()
                .any(|event| event["event"] == "partition.assigned")
    })
    .await;
    consumer.unsubscribe().await.expect("unsubscribe");

    let skips = support::lock(&skips.0);
    assert_eq!(skips.len(), usize::try_from(sent).unwrap(), "{skips:?}");
    assert!(
        skips.iter().all(|skip| skip.reason == Some("own_message")),
        "{skips:?}"
    );
    let seen = records(&telemetry);
    assert!(
        events_of(&seen, &group)
            .iter()
            .all(|event| event["event"] != "message.skipped"),
        "{seen:?}"
    );
}
