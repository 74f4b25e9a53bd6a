//! Test data: unique names, the benchmark payloads, and a raw rdkafka producer
//! that fills topics before a consumer scenario starts.

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, FutureProducer, FutureRecord, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use serde_json::{json, Value};

use crate::cluster::Cluster;
use crate::BenchResult;

/// Longest a fill may take to be acknowledged.
const FLUSH_DEADLINE: Duration = Duration::from_secs(300);
/// Length of the text in a [`padded_payload`]: about 90 bytes of JSON in all,
/// the size of a small domain event.
pub(crate) const PAD: usize = 64;

/// The `source-system` of sending clients: a consumer skips messages whose
/// header equals its own group id, which is every client's default.
pub(crate) const PRODUCER_SOURCE: &str = "bench-producer";

/// A name no earlier run used: topics and groups are never reused.
pub(crate) fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    format!("bench-{name}-{}-{nanos}", std::process::id())
}

/// The key of message `n` when there are `keys` keys.
pub(crate) fn key(n: usize, keys: usize) -> String {
    format!("key-{}", n % keys.max(1))
}

/// `{"n": n, "text": "xxx…"}`: the payload of the producer and memory scenarios
/// (`bench/ruby_bench.rb` builds the same one).
pub(crate) fn padded_payload(n: usize) -> Value {
    json!({ "n": n, "text": "x".repeat(PAD) })
}

/// What to put in each message of a fill.
#[derive(Clone, Copy)]
pub(crate) enum Payload {
    /// `{"n":n}`.
    Small,
    /// [`padded_payload`].
    Padded,
}

/// Produces `count` JSON messages over `keys` keys with a raw producer and waits
/// for all of them to be acknowledged; returns the bytes of keys and payloads.
pub(crate) async fn fill(
    cluster: &Cluster,
    topic: &str,
    count: usize,
    keys: usize,
    payload: Payload,
) -> BenchResult<u64> {
    let topic = topic.to_owned();
    let mut config = cluster.client_config()?;
    config.set("linger.ms", "5");
    tokio::task::spawn_blocking(move || {
        let producer: BaseProducer = config
            .create()
            .map_err(|error| format!("producer: {error}"))?;
        let mut bytes = 0_u64;
        for n in 0..count {
            let key = key(n, keys);
            let payload = match payload {
                Payload::Small => format!("{{\"n\":{n}}}"),
                Payload::Padded => padded_payload(n).to_string(),
            };
            bytes += u64::try_from(key.len() + payload.len()).unwrap_or(u64::MAX);
            queue(
                &producer,
                BaseRecord::to(&topic)
                    .key(key.as_str())
                    .payload(payload.as_str()),
            )?;
        }
        producer
            .flush(FLUSH_DEADLINE)
            .map_err(|error| format!("flush: {error}"))?;
        Ok(bytes)
    })
    .await
    .map_err(|error| error.to_string())?
}

/// Queues `record` on `producer`, waiting for room while its local queue is full.
pub(crate) fn queue(
    producer: &BaseProducer,
    mut record: BaseRecord<'_, str, str>,
) -> BenchResult<()> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                // Serving delivery reports makes room.
                producer.poll(Duration::from_millis(5));
                record = returned;
            }
            Err((error, _)) => return Err(format!("produce: {error}")),
        }
    }
}

/// Sends one message with a plain rdkafka producer, marked as the bench
/// producer's (see [`PRODUCER_SOURCE`]), and waits for its acknowledgement.
pub(crate) async fn send_plain(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &str,
) -> BenchResult<()> {
    let headers = OwnedHeaders::new().insert(Header {
        key: prosody::SOURCE_SYSTEM_HEADER,
        value: Some(PRODUCER_SOURCE),
    });
    let record = FutureRecord::to(topic)
        .key(key)
        .payload(payload)
        .headers(headers);
    producer
        .send(record, Timeout::Never)
        .await
        .map(|_| ())
        .map_err(|(error, _)| format!("send: {error}"))
}
