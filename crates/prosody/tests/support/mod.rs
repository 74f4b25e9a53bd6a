//! Helpers shared by the integration tests: unique names, deadline waits, raw
//! producing (for input Prosody itself would never send), closure handlers and
//! log capture.
//!
//! Every test binary compiles this module but uses only part of it.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use prosody::{
    ClassifyError, Client, Config, ConfigBuilder, Context, EventHandler, Message, OptionValue,
};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

/// How long any single wait in a test may take before the test fails.
pub(crate) const DEADLINE: Duration = Duration::from_secs(30);

/// `prefix-<random>`: topics and groups must not collide across tests sharing the mock cluster.
pub(crate) fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// Creates a mock topic with `partitions` partitions and a unique name.
pub(crate) fn topic(prefix: &str, partitions: i32) -> String {
    let name = unique(prefix);
    prosody::mock::create_topic(&name, partitions).expect("create mock topic");
    name
}

/// A mock-mode configuration with short intervals, for a consumer of `topic` in `group`.
///
/// The short session timeout matters when a group changes members: the mock
/// coordinator waits `session.timeout.ms - 1 s` for members to (re)join before it
/// assigns partitions, 44 s with librdkafka's default.
pub(crate) fn config(group: &str, topic: &str) -> ConfigBuilder {
    capture_logs();
    Config::builder()
        .mock(true)
        .group_id(group)
        .subscribed_topics([topic])
        .commit_interval(Duration::from_millis(100))
        .poll_interval(Duration::from_millis(10))
        .shutdown_timeout(Duration::from_secs(5))
        .kafka("session.timeout.ms", "3000")
        .kafka("heartbeat.interval.ms", "250")
        // Tests run side by side: none of them may hold the default probe port.
        .set("probe_port", OptionValue::Bool(false))
        .expect("probe_port is an option")
}

/// `builder` with each named option set to its value.
pub(crate) fn with(builder: ConfigBuilder, pairs: &[(&str, OptionValue)]) -> ConfigBuilder {
    pairs.iter().fold(builder, |builder, (name, value)| {
        builder.set(name, value.clone()).expect("known option")
    })
}

/// The PostgreSQL database of the tests that need one. `./script/test` starts a
/// private cluster and sets it; without it those tests fail rather than skip.
pub(crate) fn database_url() -> String {
    std::env::var("PROSODY_TEST_DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "PROSODY_TEST_DATABASE_URL is not set: run the PostgreSQL tests through ./script/test, \
             or export PROSODY_TEST_DATABASE_URL=\"$(./script/postgres)\" first"
        )
    })
}

/// Builds a client from `builder`.
pub(crate) fn client(builder: ConfigBuilder) -> Arc<Client> {
    Arc::new(Client::new(builder.build().expect("valid config")).expect("client"))
}

/// Waits until `condition` holds, checking every few milliseconds; fails the test after [`DEADLINE`].
pub(crate) async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    wait_until_for(what, DEADLINE, &mut condition).await;
}

/// Like [`wait_until`] with an explicit deadline.
pub(crate) async fn wait_until_for(
    what: &str,
    deadline: Duration,
    condition: &mut impl FnMut() -> bool,
) {
    let started = Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Locks a test mutex, ignoring poisoning (a panicking handler must not hide the real failure).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One message to produce with a raw librdkafka producer.
#[derive(Debug, Clone, Default)]
pub(crate) struct Record {
    pub(crate) partition: Option<i32>,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) payload: Option<Vec<u8>>,
    pub(crate) headers: Vec<(String, String)>,
}

impl Record {
    /// A keyed JSON message.
    pub(crate) fn json(key: &str, payload: &serde_json::Value) -> Self {
        Self {
            key: Some(key.as_bytes().to_vec()),
            payload: Some(serde_json::to_vec(payload).expect("encode JSON")),
            ..Self::default()
        }
    }

    /// The same record, sent to one partition.
    pub(crate) fn in_partition(mut self, partition: i32) -> Self {
        self.partition = Some(partition);
        self
    }
}

/// Produces `records` in order with a raw producer and waits until all are acknowledged.
pub(crate) fn produce(topic: &str, records: impl IntoIterator<Item = Record>) {
    let producer: BaseProducer = ClientConfig::new()
        .set(
            "bootstrap.servers",
            prosody::mock::bootstrap_servers().expect("mock cluster"),
        )
        .set("linger.ms", "1")
        .set("enable.idempotence", "true")
        .create()
        .expect("raw producer");
    for record in records {
        let mut headers = OwnedHeaders::new();
        for (name, value) in &record.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value),
            });
        }
        let mut base = BaseRecord::<[u8], [u8]>::to(topic).headers(headers);
        if let Some(partition) = record.partition {
            base = base.partition(partition);
        }
        if let Some(key) = &record.key {
            base = base.key(key.as_slice());
        }
        if let Some(payload) = &record.payload {
            base = base.payload(payload.as_slice());
        }
        let mut pending = base;
        loop {
            match producer.send(pending) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                    returned,
                )) => {
                    producer.poll(Duration::from_millis(10));
                    pending = returned;
                }
                Err((error, _)) => panic!("cannot produce to {topic}: {error}"),
            }
        }
    }
    producer.flush(DEADLINE).expect("all messages acknowledged");
}

/// Errors returned by test handlers.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TestError {
    /// The handler stopped because its context was cancelled.
    #[error("cancelled")]
    Cancelled,
}

impl ClassifyError for TestError {}

/// A handler's refusal: its message, and whether it is permanent.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Refused(pub(crate) &'static str, pub(crate) bool);

impl ClassifyError for Refused {
    fn is_permanent(&self) -> bool {
        self.1
    }
}

/// The offset `consumer`'s group committed for partition 0 of `topic`, read
/// by a client outside the group.
pub(crate) fn committed(consumer: &Client, topic: &str) -> Option<i64> {
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", consumer.bootstrap_servers())
        .set("group.id", consumer.config().group_id().expect("group"))
        .create()
        .expect("offset reader");
    let mut list = TopicPartitionList::new();
    list.add_partition(topic, 0);
    let committed = reader
        .committed_offsets(list, Duration::from_secs(5))
        .ok()?;
    match committed.find_partition(topic, 0)?.offset() {
        Offset::Offset(offset) => Some(offset),
        _ => None,
    }
}

/// Sums the samples of `name` in a metrics page whose labels include every
/// `label="value"` in `with`.
pub(crate) fn metric_sum(page: &str, name: &str, with: &[&str]) -> f64 {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, labels) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && with.iter().all(|label| labels.contains(label)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// Commits `consumer` has sent so far (`prosody_commits_total`). The periodic
/// commit sends every commit point each `FULL_COMMIT_EVERY` ticks, moved or
/// not, so a test checking what the commit does *not* do waits for this to
/// grow instead of sleeping.
pub(crate) fn commits(consumer: &Client) -> f64 {
    metric_sum(
        &consumer.metrics_text(prosody::MetricsFormat::Classic),
        "prosody_commits_total",
        &[],
    )
}

/// An [`EventHandler`] made from an async closure.
pub(crate) struct FnHandler<F>(pub(crate) F);

impl<F, Fut> EventHandler for FnHandler<F>
where
    F: Fn(Context, Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), TestError>> + Send,
{
    type Error = TestError;

    fn on_message(
        &self,
        context: Context,
        message: Message,
    ) -> impl Future<Output = Result<(), TestError>> + Send {
        (self.0)(context, message)
    }
}

/// What a handler saw, by (partition, offset), in handling order.
#[derive(Debug, Default, Clone)]
pub(crate) struct Seen(Arc<Mutex<Vec<Message>>>);

impl Seen {
    pub(crate) fn push(&self, message: Message) {
        lock(&self.0).push(message);
    }

    pub(crate) fn len(&self) -> usize {
        lock(&self.0).len()
    }

    pub(crate) fn messages(&self) -> Vec<Message> {
        lock(&self.0).clone()
    }

    /// Distinct (partition, offset) pairs.
    pub(crate) fn positions(&self) -> BTreeSet<(i32, i64)> {
        lock(&self.0)
            .iter()
            .map(|m| (m.partition(), m.offset()))
            .collect()
    }

    /// A handler that records every message and succeeds.
    pub(crate) fn recorder(&self) -> impl EventHandler {
        let seen = self.clone();
        FnHandler(move |_context: Context, message: Message| {
            let seen = seen.clone();
            async move {
                seen.push(message);
                Ok(())
            }
        })
    }
}

/// Captured log output of this test binary (tests tell theirs apart by topic name).
static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).extend_from_slice(bytes);
        if std::env::var_os("PROSODY_TEST_LOG").is_some() {
            let _ = std::io::stderr().write_all(bytes);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the log capture once per test binary (`RUST_LOG` filters, default `info`).
/// Set `PROSODY_TEST_LOG=1` to also see the logs.
pub(crate) fn capture_logs() {
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = Capture(Arc::clone(&buffer));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            )
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        buffer
    });
}

/// Log lines mentioning `needle`.
pub(crate) fn log_lines_with(needle: &str) -> Vec<String> {
    let Some(buffer) = LOGS.get() else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&lock(buffer)).into_owned();
    text.lines()
        .filter(|line| line.contains(needle))
        .map(str::to_owned)
        .collect()
}
