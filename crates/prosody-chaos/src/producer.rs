//! Produces a run's messages with a plain idempotent rdkafka producer.
//!
//! Not a Prosody client: the messages carry no `source-system` header, so the
//! consumers' loop prevention never skips them, and the payload has no `id`, so
//! no message-id deduplication applies. The idempotent producer keeps each
//! partition's log in send order even when requests fail and are retried, so a
//! key's sequence numbers rise with its offsets.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use serde_json::json;

use crate::error::{Error, Result};
use crate::manifest::Produced;
use crate::plan::PlannedMessage;

/// How long librdkafka keeps retrying one message (faults are short; this is generous).
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(120);

type Delivery = (usize, std::result::Result<(i32, i64), String>);

struct Deliveries {
    sender: Mutex<Sender<Delivery>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Box<usize>;

    fn delivery(&self, result: &DeliveryResult<'_>, index: Box<usize>) {
        let outcome = match result {
            Ok(message) => Ok((message.partition(), message.offset())),
            Err((error, _)) => Err(error.to_string()),
        };
        let sender = self
            .sender
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The receiver only goes away when the run is over.
        let _ = sender.send((*index, outcome));
    }
}

/// An idempotent producer that reports where each message landed.
pub struct Producer {
    inner: ThreadedProducer<Deliveries>,
    deliveries: Receiver<Delivery>,
    topic: String,
}

impl Producer {
    /// Connects to `bootstrap_servers`, producing to `topic`.
    pub fn new(bootstrap_servers: &str, topic: &str) -> Result<Producer> {
        let (sender, deliveries) = mpsc::channel();
        let inner = ClientConfig::new()
            .set("bootstrap.servers", bootstrap_servers)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set(
                "message.timeout.ms",
                MESSAGE_TIMEOUT.as_millis().to_string(),
            )
            .set("queue.buffering.max.messages", "1000000")
            .set("log_level", "3")
            .create_with_context(Deliveries {
                sender: Mutex::new(sender),
            })
            .map_err(Error::kafka("creating the producer"))?;
        Ok(Producer {
            inner,
            deliveries,
            topic: topic.to_owned(),
        })
    }

    /// Sends `messages` in order, in bursts: `(due, count)` sends the next
    /// `count` messages as fast as possible once `due` has passed since the call.
    /// Returns where each landed once all are acknowledged.
    pub fn produce(
        &self,
        messages: &[PlannedMessage],
        bursts: &[(Duration, usize)],
    ) -> Result<Vec<Produced>> {
        let started = Instant::now();
        let mut next = 0;
        for &(due, count) in bursts {
            if let Some(wait) = (started + due).checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let end = (next + count).min(messages.len());
            for (index, message) in messages.iter().enumerate().take(end).skip(next) {
                self.send(index, message)?;
            }
            next = end;
        }
        for (index, message) in messages.iter().enumerate().skip(next) {
            self.send(index, message)?;
        }
        self.await_deliveries(messages)
    }

    fn send(&self, index: usize, message: &PlannedMessage) -> Result<()> {
        let payload = json!({ "key": message.key, "seq": message.seq }).to_string();
        let mut record = BaseRecord::with_opaque_to(&self.topic, Box::new(index))
            .key(&message.key)
            .payload(&payload);
        loop {
            match self.inner.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    // The producer's own thread drains the queue; try again shortly.
                    record = returned;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((error, _)) => {
                    return Err(Error::kafka(format!(
                        "sending {} seq {}",
                        message.key, message.seq
                    ))(error))
                }
            }
        }
    }

    fn await_deliveries(&self, messages: &[PlannedMessage]) -> Result<Vec<Produced>> {
        let mut landed: Vec<Option<(i32, i64)>> = vec![None; messages.len()];
        let mut pending = messages.len();
        let deadline = Instant::now() + MESSAGE_TIMEOUT + Duration::from_secs(30);
        while pending > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            let (index, outcome) = match self.deliveries.recv_timeout(left) {
                Ok(delivery) => delivery,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(Error::Timeout(format!(
                        "{pending} of {} messages were not acknowledged",
                        messages.len()
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::Broker(
                        "the producer stopped reporting deliveries".to_owned(),
                    ))
                }
            };
            let message = &messages[index];
            let place = outcome.map_err(|reason| {
                Error::Broker(format!(
                    "delivery of {} seq {} failed: {reason}",
                    message.key, message.seq
                ))
            })?;
            if landed[index].replace(place).is_none() {
                pending -= 1;
            }
        }
        Ok(messages
            .iter()
            .zip(landed)
            .map(|(message, place)| {
                let (partition, offset) = place.unwrap_or_default();
                Produced {
                    partition,
                    offset,
                    key: message.key.clone(),
                    seq: message.seq,
                }
            })
            .collect())
    }
}
