//! (d) End-to-end latency at a steady 1k msg/s: from the call that sends a
//! message to the start of the handler that receives it, p50 and p99.
//!
//! Prosody (`Client::send` from one client, a no-op handler in another) against
//! a plain rdkafka idempotent `FutureProducer` → `BaseConsumer` loop at the same
//! rate. Each payload carries its send time, in nanoseconds since a clock origin
//! of this process, so the receiver computes the latency without clock skew.
//!
//! The first second of messages warms the path up (the consumers' first fetches
//! and offset lookups) and is not counted. librdkafka's mock cluster holds an
//! empty fetch for the whole `fetch.wait.max.ms` (500 ms) even when data arrives
//! meanwhile, which a real broker does not; on the mock, both consumers use
//! `fetch.wait.max.ms=1` so the figure is the clients' latency, not that artefact.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prosody::{Client, Context, EventHandler, Message};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::cluster::Cluster;
use crate::data::{key, send_plain, unique, PRODUCER_SOURCE};
use crate::report::{percentile, ratio, round3, Report};
use crate::BenchResult;

/// Messages sent per second.
const RATE: u64 = 1_000;
/// Messages measured: ten seconds of sending.
const MEASURED: usize = 10_000;
/// Messages sent first and not counted: one second.
const WARMUP: usize = 1_000;
/// Partitions of the topic (the mock cluster's default for new topics).
const PARTITIONS: usize = 4;
/// Distinct keys.
const KEYS: usize = 100;
/// Longest wait for the consumer group to assign the partitions, and for the
/// last message to arrive after the last send.
const WAIT_DEADLINE: Duration = Duration::from_secs(60);

/// p50 and p99 of one path, in milliseconds.
struct Latency {
    p50_ms: f64,
    p99_ms: f64,
}

/// Runs both paths and reports the core against the plain baseline.
pub(crate) async fn latency(cluster: &Cluster, report: &mut Report) -> BenchResult<()> {
    eprintln!("(d) plain rdkafka FutureProducer → BaseConsumer at {RATE} msg/s…");
    let plain = plain_latency(cluster).await?;
    eprintln!("(d) Prosody send → handler at {RATE} msg/s…");
    let core = prosody_latency(cluster).await?;
    report.insert("latency_rate_per_sec", RATE);
    report.insert("latency_messages", MEASURED);
    report.insert("plain_latency_p50_ms", round3(plain.p50_ms));
    report.insert("plain_latency_p99_ms", round3(plain.p99_ms));
    report.insert("core_latency_p50_ms", round3(core.p50_ms));
    report.insert("core_latency_p99_ms", round3(core.p99_ms));
    report.insert(
        "core_vs_plain_latency_p50_ratio",
        round3(ratio(core.p50_ms, plain.p50_ms)),
    );
    report.insert(
        "core_vs_plain_latency_p99_ratio",
        round3(ratio(core.p99_ms, plain.p99_ms)),
    );
    let scope = format!("{RATE} msg/s, {MEASURED} msgs, {PARTITIONS} partitions");
    for (name, figure, baseline) in [
        ("p50", core.p50_ms, plain.p50_ms),
        ("p99", core.p99_ms, plain.p99_ms),
    ] {
        report.row(
            format!("(d) core send → handler start, latency {name} ({scope})"),
            format!("{figure:.2} ms"),
            format!("rdkafka FutureProducer → BaseConsumer {baseline:.2} ms"),
            format!("{:.2}", ratio(figure, baseline)),
        );
    }
    Ok(())
}

/// Nanoseconds since this process's clock origin.
fn stamp() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let elapsed = ORIGIN.get_or_init(Instant::now).elapsed();
    u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
}

/// The payload of message `n`: its send time, and whether it is a warm-up message.
fn payload(n: usize) -> Value {
    json!({ "t": stamp(), "warm": n < WARMUP })
}

/// The latencies the receiving side has recorded, in milliseconds.
#[derive(Default)]
struct Recorder {
    latencies: Mutex<Vec<f64>>,
    recorded: AtomicUsize,
}

impl Recorder {
    /// Records `payload`'s latency unless it is a warm-up message.
    fn record(&self, received: u64, payload: &Value) {
        let sent = payload.get("t").and_then(Value::as_u64).unwrap_or(received);
        if payload.get("warm").and_then(Value::as_bool) == Some(false) {
            #[allow(clippy::cast_precision_loss)] // nanoseconds well below 2^52
            let millis = received.saturating_sub(sent) as f64 / 1e6;
            self.latencies
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(millis);
            self.recorded.fetch_add(1, Ordering::Release);
        }
    }

    fn recorded(&self) -> usize {
        self.recorded.load(Ordering::Acquire)
    }

    /// Waits until every measured message was recorded.
    async fn wait_for_all(&self) -> BenchResult<Latency> {
        let started = Instant::now();
        while self.recorded() < MEASURED {
            if started.elapsed() > WAIT_DEADLINE {
                return Err(format!(
                    "only {} of {MEASURED} messages arrived within {WAIT_DEADLINE:?} of the last send",
                    self.recorded()
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut latencies = self
            .latencies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        Ok(Latency {
            p50_ms: percentile(&mut latencies, 0.50),
            p99_ms: percentile(&mut latencies, 0.99),
        })
    }
}

/// Sends messages `0..WARMUP + MEASURED` at [`RATE`], each in its own task so a
/// slow acknowledgement does not delay the next send; fails on the first error.
async fn paced<F, Fut>(send: F) -> BenchResult<()>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = BenchResult<()>> + Send + 'static,
{
    let interval = Duration::from_nanos(1_000_000_000 / RATE);
    let start = tokio::time::Instant::now();
    let mut sends = JoinSet::new();
    let mut due = start;
    for n in 0..WARMUP + MEASURED {
        tokio::time::sleep_until(due).await;
        due += interval;
        sends.spawn(send(n));
        while let Some(done) = sends.try_join_next() {
            done.map_err(|error| error.to_string())??;
        }
    }
    while let Some(done) = sends.join_next().await {
        done.map_err(|error| error.to_string())??;
    }
    Ok(())
}

/// Fetch settings for both consumers (see the module documentation).
fn fetch_settings(cluster: &Cluster) -> Vec<(&'static str, &'static str)> {
    if cluster.is_mock_broker() {
        vec![("fetch.wait.max.ms", "1")]
    } else {
        Vec::new()
    }
}

struct LatencyHandler(Arc<Recorder>);

impl EventHandler for LatencyHandler {
    type Error = std::convert::Infallible;

    async fn on_message(&self, _context: Context, message: Message) -> Result<(), Self::Error> {
        self.0.record(stamp(), message.payload());
        Ok(())
    }
}

async fn prosody_latency(cluster: &Cluster) -> BenchResult<Latency> {
    let topic = unique("latency-core");
    let partitions = cluster.create_topic(&topic, PARTITIONS).await?;
    let mut consumer = cluster
        .config()?
        .group_id(&unique("latency"))
        .subscribed_topics([topic.as_str()]);
    for (setting, value) in fetch_settings(cluster) {
        consumer = consumer.kafka(setting, value);
    }
    let consumer = Client::new(consumer.build().map_err(|error| error.to_string())?)
        .map_err(|e| e.to_string())?;
    let producer = cluster
        .config()?
        .source_system(PRODUCER_SOURCE)
        .build()
        .map_err(|error| error.to_string())?;
    let producer = Arc::new(Client::new(producer).map_err(|error| error.to_string())?);
    let recorder = Arc::new(Recorder::default());
    consumer
        .subscribe(LatencyHandler(Arc::clone(&recorder)))
        .map_err(|error| error.to_string())?;
    let outcome = async {
        wait_for_assignment(|| consumer.assigned_partitions(), partitions).await?;
        paced(|n| {
            let producer = Arc::clone(&producer);
            let topic = topic.clone();
            async move {
                producer
                    .send(&topic, &key(n, KEYS), &payload(n), &[])
                    .await
                    .map_err(|error| format!("send: {error}"))
            }
        })
        .await?;
        recorder.wait_for_all().await
    }
    .await;
    consumer
        .unsubscribe()
        .await
        .map_err(|error| error.to_string())?;
    outcome
}

/// Polls `assigned` until it reaches `partitions`.
async fn wait_for_assignment(assigned: impl Fn() -> usize, partitions: usize) -> BenchResult<()> {
    let started = Instant::now();
    while assigned() < partitions {
        if started.elapsed() > WAIT_DEADLINE {
            return Err(format!(
                "only {} of {partitions} partitions assigned within {WAIT_DEADLINE:?}",
                assigned()
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

async fn plain_latency(cluster: &Cluster) -> BenchResult<Latency> {
    let topic = unique("latency-plain");
    let partitions = cluster.create_topic(&topic, PARTITIONS).await?;
    let producer = crate::producer::plain_producer(cluster)?;
    let mut config = cluster.client_config()?;
    config
        .set("group.id", unique("latency-plain"))
        .set("auto.offset.reset", "earliest");
    for (setting, value) in fetch_settings(cluster) {
        config.set(setting, value);
    }
    let consumer: BaseConsumer = config
        .create()
        .map_err(|error| format!("consumer: {error}"))?;
    consumer
        .subscribe(&[&topic])
        .map_err(|error| error.to_string())?;
    let consumer = Arc::new(consumer);
    let recorder = Arc::new(Recorder::default());
    let assigned = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The poll loop runs on its own thread, as a plain consumer would.
    let poller = {
        let (consumer, recorder, assigned, stop) = (
            Arc::clone(&consumer),
            Arc::clone(&recorder),
            Arc::clone(&assigned),
            Arc::clone(&stop),
        );
        std::thread::spawn(move || -> BenchResult<()> {
            while !stop.load(Ordering::Acquire) {
                match consumer.poll(Duration::from_millis(100)) {
                    Some(Ok(message)) => {
                        let received = stamp();
                        let payload: Value =
                            serde_json::from_slice(message.payload().unwrap_or_default())
                                .map_err(|error| error.to_string())?;
                        recorder.record(received, &payload);
                    }
                    Some(Err(error)) => return Err(format!("plain consumer: {error}")),
                    None => {}
                }
                let owned = consumer.assignment().map_or(0, |list| list.count());
                assigned.store(owned, Ordering::Release);
            }
            Ok(())
        })
    };
    let outcome = async {
        wait_for_assignment(|| assigned.load(Ordering::Acquire), partitions).await?;
        paced(|n| {
            let producer = producer.clone();
            let topic = topic.clone();
            async move {
                send_plain(&producer, &topic, &key(n, KEYS), &payload(n).to_string()).await
            }
        })
        .await?;
        recorder.wait_for_all().await
    }
    .await;
    stop.store(true, Ordering::Release);
    let polled = poller
        .join()
        .map_err(|_| "the plain consumer's thread panicked".to_owned())?;
    let latency = outcome?;
    polled?;
    Ok(latency)
}
