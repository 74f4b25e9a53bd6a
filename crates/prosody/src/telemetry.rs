//! Lifecycle events to Kafka (`telemetry_enabled`, `telemetry_topic`): what an
//! operator of many consumers wants in one place, whatever language or host
//! each runs on.
//!
//! Only the rare events are sent (partitions assigned and revoked, a stalled
//! partition, a message dead-lettered or given up on), never one per handled
//! message: the topic stays small and the handler path pays nothing. Each is one
//! JSON message keyed by the consumer group, so a group's events keep their order.
//!
//! Sending never holds up the consumer: [`Telemetry::record`] queues the
//! encoded event (dropping it when the queue is full) and one task sends them
//! in order through the client's producer, without the producer's metrics,
//! events or spans (telemetry must not show up as the application's sends). A
//! send that fails (the topic missing on a cluster that does not create topics,
//! say) is logged at WARN at most once a minute, with the count since.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use serde_json::{json, Map, Value};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tracing::warn;

use crate::events::{Event, EventKind};
use crate::producer::Producer;

/// Events waiting to be sent; beyond this they are dropped (and counted).
const QUEUE: usize = 1_024;

/// The least time between two WARN lines about failed or dropped events.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The kinds sent to the telemetry topic.
const KINDS: [EventKind; 5] = [
    EventKind::PartitionAssigned,
    EventKind::PartitionRevoked,
    EventKind::ConsumerStalled,
    EventKind::MessageDeadLettered,
    EventKind::MessageSkipped,
];

/// A client's telemetry: a queue of encoded events and the task sending them.
pub(crate) struct Telemetry {
    queue: mpsc::Sender<Vec<u8>>,
    group_id: Arc<str>,
    source_system: Arc<str>,
    mask: u32,
    lost: Arc<Lost>,
}

impl Telemetry {
    /// Starts the sending task on `runtime`; it ends once the `Telemetry` is
    /// dropped and the queue is empty, or the producer is gone.
    pub(crate) fn start(
        topic: &str,
        group_id: &str,
        producer: Arc<Producer>,
        lost_counter: Counter,
        runtime: &Handle,
    ) -> Self {
        let (queue, mut events) = mpsc::channel::<Vec<u8>>(QUEUE);
        let lost = Arc::new(Lost {
            counter: lost_counter,
            state: std::sync::Mutex::default(),
        });
        let group_id: Arc<str> = Arc::from(group_id);
        let source_system = Arc::from(producer.source_system());
        let (topic, key, sender_lost) = (
            Arc::<str>::from(topic),
            Arc::clone(&group_id),
            Arc::clone(&lost),
        );
        // Weak: the producer holds the metrics, which hold this queue's
        // sender; a strong reference would keep all three (and librdkafka's
        // threads) alive after the client is gone.
        let producer = Arc::downgrade(&producer);
        runtime.spawn(async move {
            while let Some(payload) = events.recv().await {
                let Some(producer) = producer.upgrade() else {
                    break;
                };
                if let Err(error) = producer.send_unobserved(&topic, &key, &payload).await {
                    sender_lost.count(Loss::Failed, || {
                        format!(
                            "cannot send telemetry events to `{topic}`: {error}; create the topic, \
                             or set telemetry_enabled to false (or telemetry_topic to another topic)"
                        )
                    });
                }
            }
        });
        Self {
            queue,
            group_id,
            source_system,
            mask: KINDS.iter().fold(0, |mask, kind| mask | kind.bit()),
            lost,
        }
    }

    /// Whether events of `kind` are sent (one mask test: called at every event site).
    pub(crate) fn wants(&self, kind: EventKind) -> bool {
        self.mask & kind.bit() != 0
    }

    /// Queues `event` for sending, if it is one telemetry sends; never blocks.
    pub(crate) fn record(&self, event: &Event) {
        // A skip is lifecycle only when it gives up on a failing message; the
        // filters' skips (own messages, event types, duplicates) are routine.
        if event.kind == EventKind::MessageSkipped && event.reason != Some("failed") {
            return;
        }
        let payload = encode(event, &self.group_id, &self.source_system);
        if self.queue.try_send(payload).is_err() {
            self.lost.count(Loss::Dropped, || {
                "telemetry events come faster than they can be sent; dropping some".to_owned()
            });
        }
    }
}

/// The JSON of one event: its name, when, who sent it, and the fields that apply.
fn encode(event: &Event, group_id: &str, source_system: &str) -> Vec<u8> {
    let mut fields = Map::new();
    fields.insert("event".to_owned(), json!(event.kind.name()));
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis());
    fields.insert("timestamp_ms".to_owned(), json!(now_ms));
    fields.insert("group_id".to_owned(), json!(group_id));
    fields.insert("source_system".to_owned(), json!(source_system));
    fields.insert("pid".to_owned(), json!(std::process::id()));
    fields.insert("topic".to_owned(), json!(&*event.topic));
    let optional: [(&str, Option<Value>); 8] = [
        ("partition", event.partition.map(Value::from)),
        ("offset", event.offset.map(Value::from)),
        ("key", event.key.as_deref().map(Value::from)),
        (
            "duration_ms",
            event
                .duration
                .map(|duration| json!(duration.as_secs_f64() * 1000.0)),
        ),
        ("attempts", event.attempts.map(Value::from)),
        ("reason", event.reason.map(Value::from)),
        ("error_class", event.error_class.as_deref().map(Value::from)),
        (
            "error_message",
            event.error_message.as_deref().map(Value::from),
        ),
    ];
    for (name, value) in optional {
        if let Some(value) = value {
            fields.insert(name.to_owned(), value);
        }
    }
    serde_json::to_vec(&Value::Object(fields)).unwrap_or_default()
}

/// Why an event was not sent.
#[derive(Clone, Copy)]
enum Loss {
    /// The send failed (after `send_timeout` at most).
    Failed,
    /// The queue was full.
    Dropped,
}

/// Events not sent: every one in `prosody_telemetry_events_lost_total`, and
/// those since the last WARN line, with when that was.
struct Lost {
    counter: Counter,
    state: std::sync::Mutex<LostState>,
}

#[derive(Default)]
struct LostState {
    failed: u64,
    dropped: u64,
    warned: Option<Instant>,
}

impl Lost {
    /// Counts one lost event; logs `message()` with the counts unless a line
    /// went out within the last [`WARN_EVERY`].
    fn count(&self, loss: Loss, message: impl FnOnce() -> String) {
        self.counter.inc();
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match loss {
            Loss::Failed => state.failed += 1,
            Loss::Dropped => state.dropped += 1,
        }
        if state
            .warned
            .is_some_and(|warned| warned.elapsed() < WARN_EVERY)
        {
            return;
        }
        let (failed, dropped) = (state.failed, state.dropped);
        *state = LostState {
            warned: Some(Instant::now()),
            ..LostState::default()
        };
        drop(state);
        warn!(failed, dropped, "{}", message());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_one_json_object_with_the_fields_that_apply() {
        let event = Event::new(EventKind::MessageDeadLettered, Arc::from("orders"))
            .at(3, Some(42), Some(&Arc::from("acct-7")))
            .attempts(4)
            .because("permanent")
            .error("Billing::Refused", "card declined");
        let value: Value =
            serde_json::from_slice(&encode(&event, "billing", "billing-svc")).expect("JSON");
        assert_eq!(value["event"], "message.dead_lettered");
        assert_eq!(value["group_id"], "billing");
        assert_eq!(value["source_system"], "billing-svc");
        assert_eq!(value["topic"], "orders");
        assert_eq!(value["partition"], 3);
        assert_eq!(value["offset"], 42);
        assert_eq!(value["key"], "acct-7");
        assert_eq!(value["attempts"], 4);
        assert_eq!(value["reason"], "permanent");
        assert_eq!(value["error_class"], "Billing::Refused");
        assert_eq!(value["error_message"], "card declined");
        assert!(value["timestamp_ms"].as_u64().is_some_and(|ms| ms > 0));
        assert!(value.get("duration_ms").is_none(), "{value}");
    }

    /// With no broker to take them, events are counted as lost (one WARN
    /// line, not one per event) and recording never blocks.
    #[tokio::test]
    async fn events_that_cannot_be_sent_are_counted_and_warned_once() {
        let config = crate::Config::builder()
            .group_id("telemetry-unit")
            .bootstrap_servers(["127.0.0.1:9"])
            .send_timeout(Duration::from_millis(50))
            .build_with_env(Vec::new())
            .expect("config");
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let producer = Arc::new(
            Producer::new(&config, "127.0.0.1:9", Arc::clone(&metrics)).expect("producer"),
        );
        let lost = metrics.telemetry_lost();
        // The client holds its producer; telemetry only refers to it.
        let telemetry = Telemetry::start(
            "prosody.telemetry-events",
            "telemetry-unit",
            Arc::clone(&producer),
            lost.clone(),
            &Handle::current(),
        );
        let assigned =
            Event::new(EventKind::PartitionAssigned, Arc::from("orders")).at(0, None, None);
        let started = Instant::now();
        for _ in 0..3 {
            telemetry.record(&assigned);
        }
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "recording waited"
        );
        while lost.get() < 3 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "lost {}",
                lost.get()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let state = telemetry
            .lost
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The first loss was logged; the two after it wait for the next line.
        assert_eq!((state.failed, state.dropped), (2, 0));
        assert!(state.warned.is_some());
        drop(state);
        let page = metrics.render(crate::metrics::Format::Classic);
        assert!(
            page.contains("prosody_telemetry_events_lost_total 3"),
            "{page}"
        );

        // More than the queue holds, at once: the rest are dropped on the spot.
        let burst = QUEUE + 100;
        for _ in 0..burst {
            telemetry.record(&assigned);
        }
        let dropped = telemetry
            .lost
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .dropped;
        assert!(dropped >= 99, "dropped {dropped} of {burst}");
        assert!(lost.get() >= 3 + dropped);
    }

    #[test]
    fn only_lifecycle_kinds_are_wanted() {
        let mask = KINDS.iter().fold(0, |mask, kind| mask | kind.bit());
        for kind in EventKind::ALL {
            let lifecycle = KINDS.contains(&kind);
            assert_eq!(mask & kind.bit() != 0, lifecycle, "{kind:?}");
        }
        assert!(!KINDS.contains(&EventKind::MessageHandled));
        assert!(!KINDS.contains(&EventKind::MessageReceived));
    }
}
