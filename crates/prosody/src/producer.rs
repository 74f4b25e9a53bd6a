//! Sending JSON messages with a key, headers and the `source-system` header.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;

use crate::config::{Config, Role};
use crate::error::{Error, Result};
use crate::events::{Event, EventKind};
use crate::metrics::Metrics;
use crate::mock;
use crate::traces::{SendSpan, TRACEPARENT_HEADER, TRACESTATE_HEADER};

/// Header naming the system that produced a message; consumers skip their own.
pub const SOURCE_SYSTEM_HEADER: &str = "source-system";

/// A delivery report, or the `send_timeout` elapsing first.
type Delivery = std::result::Result<
    rdkafka::producer::future_producer::OwnedDeliveryResult,
    tokio::time::error::Elapsed,
>;

/// An idempotent producer of JSON messages.
pub struct Producer {
    inner: FutureProducer,
    source_system: String,
    send_timeout: Duration,
    mock: bool,
    metrics: Arc<Metrics>,
}

impl Producer {
    pub(crate) fn new(
        config: &Config,
        bootstrap_servers: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let mut client = config.client_config(Role::Producer);
        client
            .set("bootstrap.servers", bootstrap_servers)
            .set("client.id", config.source_system())
            .set("enable.idempotence", "true")
            .set(
                "message.timeout.ms",
                millis(config.send_timeout()).to_string(),
            );
        let inner: FutureProducer = client.create()?;
        // An idempotent producer cannot deliver before it has a producer id, and
        // librdkafka asks for one when a metadata response arrives while it is
        // waiting for one (else on a 500 ms timer). A few metadata requests during
        // start-up get the id within a round trip or two, so a client's first send
        // does not spend most of a 1 s send_timeout waiting for it.
        let warm = inner.clone();
        let _ = std::thread::Builder::new()
            .name("prosody-producer-init".to_owned())
            .spawn(move || {
                for _ in 0..10 {
                    let started = std::time::Instant::now();
                    let _ = warm.client().fetch_metadata(None, Duration::from_secs(1));
                    std::thread::sleep(Duration::from_millis(50).saturating_sub(started.elapsed()));
                }
            });
        Ok(Self {
            inner,
            source_system: config.source_system().to_owned(),
            send_timeout: config.send_timeout(),
            mock: config.mock(),
            metrics,
        })
    }

    /// Sends `payload` as JSON and resolves once the broker acknowledged it.
    ///
    /// Fails with [`Error::SendTimeout`] after `send_timeout`, [`Error::Payload`]
    /// when `payload` cannot be encoded, [`Error::InvalidMessage`] when `headers`
    /// sets `source-system` (Prosody writes that header from the `source_system`
    /// option), or [`Error::Kafka`] when the broker refuses it.
    pub async fn send(
        &self,
        topic: &str,
        key: &str,
        payload: &serde_json::Value,
        headers: &[(String, String)],
    ) -> Result<()> {
        if headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case(SOURCE_SYSTEM_HEADER))
        {
            return Err(Error::InvalidMessage(format!(
                "the `{SOURCE_SYSTEM_HEADER}` header is written by Prosody from the source_system option ({:?} for this client); set source_system on the client instead of passing the header",
                self.source_system
            )));
        }
        let bytes = serde_json::to_vec(payload)?;
        self.send_bytes(topic, key, &bytes, headers).await
    }

    /// Sends an already-encoded payload (used to dead-letter messages verbatim).
    pub(crate) async fn send_bytes(
        &self,
        topic: &str,
        key: &str,
        bytes: &[u8],
        headers: &[(String, String)],
    ) -> Result<()> {
        self.check_topic(topic)?;
        let span = SendSpan::start(topic, key, headers);
        let trace_headers = span.as_ref().map_or(&[][..], |span| &span.headers[..]);
        let mut wire_headers = OwnedHeaders::new_with_capacity(headers.len() + 3).insert(Header {
            key: SOURCE_SYSTEM_HEADER,
            value: Some(self.source_system.as_str()),
        });
        // A traced send writes its own span's context in place of any the caller gave.
        let replaced = |name: &str| {
            span.is_some() && (name == TRACEPARENT_HEADER || name == TRACESTATE_HEADER)
        };
        for (name, value) in headers
            .iter()
            .filter(|(name, _)| name != SOURCE_SYSTEM_HEADER && !replaced(name))
            .chain(trace_headers)
        {
            wire_headers = wire_headers.insert(Header {
                key: name.as_str(),
                value: Some(value.as_str()),
            });
        }
        let started = std::time::Instant::now();
        let delivery = self.deliver(topic, key, bytes, wire_headers).await;
        let took = started.elapsed();
        let delivered = matches!(delivery, Ok(Ok(_)));
        if let Some(span) = span {
            span.end((!delivered).then_some("send failed"));
        }
        self.metrics.sent(topic, took, delivered);
        let kind = if delivered {
            EventKind::SendDelivered
        } else {
            EventKind::SendFailed
        };
        self.metrics.emit(kind, || {
            let mut event = Event::new(kind, Arc::from(topic)).took(took);
            event.key = Some(Arc::from(key));
            match &delivery {
                Ok(Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut), _)))
                | Err(_) => event.because("timeout"),
                Ok(Err((error, _))) => {
                    event.error_message = Some(error.to_string());
                    event.because("kafka")
                }
                Ok(Ok(_)) => event,
            }
        });
        self.result(topic, delivery)
    }

    /// Sends `bytes` with only the `source-system` header, and without
    /// metrics, events or a span: for telemetry, which must not show up as
    /// the application's sends (nor report on itself).
    pub(crate) async fn send_unobserved(&self, topic: &str, key: &str, bytes: &[u8]) -> Result<()> {
        self.check_topic(topic)?;
        let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
            key: SOURCE_SYSTEM_HEADER,
            value: Some(self.source_system.as_str()),
        });
        let delivery = self.deliver(topic, key, bytes, headers).await;
        self.result(topic, delivery)
    }

    /// Refuses what librdkafka cannot take as a topic; creates it in mock mode.
    fn check_topic(&self, topic: &str) -> Result<()> {
        // librdkafka takes C strings: without this, "kafka: FFI nul error".
        if topic.is_empty() || topic.contains('\0') {
            return Err(Error::InvalidMessage(format!(
                "topic {topic:?} is not a topic name (it must be non-empty, without NUL bytes)"
            )));
        }
        if self.mock {
            mock::ensure_topic(topic)?;
        }
        Ok(())
    }

    /// Hands the message to librdkafka and waits for its delivery report, at
    /// most `send_timeout`.
    async fn deliver(
        &self,
        topic: &str,
        key: &str,
        bytes: &[u8],
        headers: OwnedHeaders,
    ) -> Delivery {
        let record = FutureRecord::to(topic)
            .key(key)
            .payload(bytes)
            .headers(headers);
        tokio::time::timeout(
            self.send_timeout,
            self.inner.send(record, Timeout::After(self.send_timeout)),
        )
        .await
    }

    fn result(&self, topic: &str, delivery: Delivery) -> Result<()> {
        let timed_out = || Error::SendTimeout {
            topic: topic.to_owned(),
            timeout: self.send_timeout,
        };
        match delivery {
            Err(_) => Err(timed_out()),
            Ok(Ok(_)) => Ok(()),
            Ok(Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut), _))) => {
                Err(timed_out())
            }
            Ok(Err((error, _))) => Err(error.into()),
        }
    }

    /// The value written in the `source-system` header.
    pub fn source_system(&self) -> &str {
        &self.source_system
    }
}

pub(crate) fn millis(duration: Duration) -> u128 {
    duration.as_millis().max(1)
}
