//! Reading a deferred message back from Kafka by its offset.
//!
//! The subscription's own consumer is never seeked for this (that would move
//! the partition's fetch position under the poll thread). A second consumer
//! is assigned the message's partition at its offset and
//! polled until the message arrives (it never joins its group id, which
//! librdkafka requires for `assign`). It lives on a thread of its own
//! (`prosody-reload`), created on the first reload and ended when the
//! subscription is dropped; reloads are served one at a time, and a reload of a
//! later offset of the partition just read continues reading instead of
//! seeking again, so a key's deferred messages read back in one pass.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::config::{Config, Role};
use crate::consumer::partition::Fetched;

/// How long one reload may wait for its message.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// How far ahead of the last message read a reload continues reading rather
/// than seeking.
const READ_AHEAD: i64 = 10_000;

/// Why a deferred message could not be read back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReloadError {
    /// The offset is no longer in the partition (retention or compaction removed it).
    #[error("offset {offset} is no longer in the partition (removed by retention or compaction)")]
    Gone {
        /// The offset asked for.
        offset: i64,
    },
    /// Kafka did not deliver the message in time; retriable.
    #[error("the message did not arrive within {RELOAD_TIMEOUT:?}")]
    Timeout,
    /// The reload consumer cannot be created or used.
    #[error("reload consumer: {0}")]
    Kafka(#[from] KafkaError),
    /// The reload thread is gone (it could not start, or panicked).
    #[error("the reload thread is not running")]
    Stopped,
}

struct Request {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    reply: oneshot::Sender<Result<Fetched, ReloadError>>,
}

/// Reads messages back by offset, for deferred retries.
pub(crate) struct Reloader {
    client: ClientConfig,
    requests: OnceLock<Option<crossbeam_channel::Sender<Request>>>,
}

impl Reloader {
    pub(crate) fn new(config: &Config, bootstrap_servers: &str) -> Self {
        let mut client = config.client_config(Role::Consumer);
        client
            .set("bootstrap.servers", bootstrap_servers)
            .set("client.id", format!("{}-reload", config.source_system))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // An offset that is gone must be reported, not silently replaced.
            .set("auto.offset.reset", "error")
            .set("fetch.wait.max.ms", "10")
            .set("queued.min.messages", "1000");
        // librdkafka refuses `assign` without a group id. The group is never
        // joined (no subscribe) and nothing is committed to it.
        client
            .set(
                "group.id",
                format!(
                    "{}.prosody-reload",
                    config.group_id.as_deref().unwrap_or_default()
                ),
            )
            .remove("group.instance.id");
        Self {
            client,
            requests: OnceLock::new(),
        }
    }

    /// The message at `offset` of `topic`/`partition`.
    pub(crate) async fn fetch(
        &self,
        topic: &Arc<str>,
        partition: i32,
        offset: i64,
    ) -> Result<Fetched, ReloadError> {
        let requests = self
            .requests
            .get_or_init(|| self.start())
            .as_ref()
            .ok_or(ReloadError::Stopped)?;
        let (reply, answer) = oneshot::channel();
        requests
            .send(Request {
                topic: Arc::clone(topic),
                partition,
                offset,
                reply,
            })
            .map_err(|_| ReloadError::Stopped)?;
        answer.await.map_err(|_| ReloadError::Stopped)?
    }

    fn start(&self) -> Option<crossbeam_channel::Sender<Request>> {
        let (requests, incoming) = crossbeam_channel::unbounded();
        let client = self.client.clone();
        match std::thread::Builder::new()
            .name("prosody-reload".to_owned())
            .spawn(move || serve(&client, &incoming))
        {
            Ok(_) => Some(requests),
            Err(error) => {
                warn!("cannot start the thread that reloads deferred messages: {error}");
                None
            }
        }
    }
}

/// Where the reload consumer is reading: topic, partition, next offset.
type Position = (Arc<str>, i32, i64);

/// Serves reloads until the [`Reloader`] is dropped.
fn serve(client: &ClientConfig, incoming: &crossbeam_channel::Receiver<Request>) {
    let mut consumer: Option<BaseConsumer> = None;
    let mut position: Option<Position> = None;
    while let Ok(request) = incoming.recv() {
        if consumer.is_none() {
            match client.create::<BaseConsumer>() {
                Ok(created) => consumer = Some(created),
                Err(error) => {
                    let _ = request.reply.send(Err(error.into()));
                    continue;
                }
            }
        }
        let Some(reader) = consumer.as_ref() else {
            continue;
        };
        let result = read(reader, &mut position, &request);
        if result.is_err() {
            position = None;
        }
        let _ = request.reply.send(result);
    }
}

/// Reads the requested message, seeking only when the consumer is not already
/// reading the partition a little before it.
fn read(
    consumer: &BaseConsumer,
    position: &mut Option<Position>,
    request: &Request,
) -> Result<Fetched, ReloadError> {
    let Request {
        topic,
        partition,
        offset,
        ..
    } = request;
    let reading_up_to = |(at_topic, at_partition, next): &Position| {
        at_topic == topic && at_partition == partition && (0..READ_AHEAD).contains(&(offset - next))
    };
    if !position.as_ref().is_some_and(reading_up_to) {
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
        consumer.assign(&list)?;
        *position = Some((Arc::clone(topic), *partition, *offset));
    }
    let deadline = Instant::now() + RELOAD_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReloadError::Timeout);
        }
        match consumer.poll(left.min(Duration::from_millis(100))) {
            Some(Ok(message))
                if message.topic() == &**topic && message.partition() == *partition =>
            {
                *position = Some((Arc::clone(topic), *partition, message.offset() + 1));
                if message.offset() == *offset {
                    return Ok(crate::consumer::fetched(&message));
                }
                if message.offset() > *offset {
                    return Err(ReloadError::Gone { offset: *offset });
                }
            }
            Some(Ok(_)) | None => {}
            Some(Err(KafkaError::MessageConsumption(
                RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange,
            ))) => return Err(ReloadError::Gone { offset: *offset }),
            Some(Err(error)) => {
                debug!(%topic, partition, offset, "reloading a deferred message: {error}")
            }
        }
    }
}
