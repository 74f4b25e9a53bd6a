//! (e) Producer throughput: Prosody's `Client::send` against a plain rdkafka
//! `FutureProducer` configured like Prosody's producer (idempotent, message
//! timeout = the default `send_timeout`), sending the same messages: same
//! count, keys, payloads, `source-system` header and topic settings (a new
//! topic of 4 partitions per run).
//!
//! Both are measured with 100 and with 32 sends in flight: every sender awaits
//! its acknowledgement before sending again, so throughput depends on how many
//! are in flight. `bench/ruby_bench.rb` compares Ruby with the baselines
//! written here: one thread with 100 fibers against 100 in flight, 8 threads
//! with 4 fibers each against 32.
//!
//! The clock starts after one acknowledged warm-up send: an idempotent producer
//! first needs a producer id from the broker, a start-up cost and not throughput.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prosody::Client;
use rdkafka::producer::FutureProducer;
use tokio::task::JoinSet;

use crate::cluster::Cluster;
use crate::data::{key, padded_payload, send_plain, unique, PRODUCER_SOURCE};
use crate::report::{
    cpu_now, cpu_per_100k, cpu_shown, per_second, rate, ratio, round0, round1, round2, round3,
    Report,
};
use crate::BenchResult;

/// Partitions of each run's topic.
const PARTITIONS: usize = 4;
/// Distinct keys.
const KEYS: usize = 1_000;
/// Sends in flight: 100 (one Ruby thread with 100 fibers) and 32 (8 Ruby
/// threads with 4 fibers each).
pub(crate) const IN_FLIGHT: [usize; 2] = [100, 32];

/// Measures the baseline and the core at each level of [`IN_FLIGHT`].
pub(crate) async fn producer(
    cluster: &Cluster,
    messages: usize,
    report: &mut Report,
) -> BenchResult<()> {
    let payloads: usize = (0..messages)
        .map(|n| padded_payload(n).to_string().len())
        .sum();
    report.insert("producer_messages", messages);
    report.insert("producer_partitions", PARTITIONS);
    report.insert(
        "producer_payload_bytes",
        round1(crate::report::as_f64(payloads) / crate::report::as_f64(messages.max(1))),
    );
    for in_flight in IN_FLIGHT {
        eprintln!("(e) plain FutureProducer, {in_flight} in flight…");
        let (plain, plain_cpu) = plain_rate(cluster, messages, in_flight).await?;
        eprintln!("(e) Prosody Client::send, {in_flight} in flight…");
        let (core, core_cpu) = core_rate(cluster, messages, in_flight).await?;
        report.insert(
            format!("plain_producer_inflight{in_flight}_msgs_per_sec"),
            round0(plain),
        );
        report.insert(
            format!("core_producer_inflight{in_flight}_msgs_per_sec"),
            round0(core),
        );
        report.insert(
            format!("core_vs_plain_producer_inflight{in_flight}_ratio"),
            round3(ratio(core, plain)),
        );
        report.insert(
            format!("plain_producer_inflight{in_flight}_cpu_s_per_100k"),
            round2(plain_cpu),
        );
        report.insert(
            format!("core_producer_inflight{in_flight}_cpu_s_per_100k"),
            round2(core_cpu),
        );
        let scenario = format!(
            "(e) core Client::send, {in_flight} in flight ({messages} msgs, {PARTITIONS} partitions)"
        );
        report.row(
            &scenario,
            per_second(core),
            format!("FutureProducer {}", per_second(plain)),
            format!("{:.2}", ratio(core, plain)),
        );
        report.row(
            format!("{scenario}: process CPU"),
            cpu_shown(core_cpu),
            format!("FutureProducer {}", cpu_shown(plain_cpu)),
            format!("{:.2}", ratio(core_cpu, plain_cpu)),
        );
    }
    Ok(())
}

/// A `FutureProducer` set up like Prosody's: idempotent, and giving up on a
/// message after the default `send_timeout`.
pub(crate) fn plain_producer(cluster: &Cluster) -> BenchResult<FutureProducer> {
    let defaults = cluster
        .config()?
        .source_system(PRODUCER_SOURCE)
        .build()
        .map_err(|error| error.to_string())?;
    let timeout = defaults.send_timeout().as_millis().max(1);
    cluster
        .client_config()?
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", timeout.to_string())
        .create()
        .map_err(|error| format!("producer: {error}"))
}

async fn plain_rate(
    cluster: &Cluster,
    messages: usize,
    in_flight: usize,
) -> BenchResult<(f64, f64)> {
    let topic = unique("producer-plain");
    cluster.create_topic(&topic, PARTITIONS).await?;
    let producer = plain_producer(cluster)?;
    let send = move |n: usize| {
        let (producer, topic) = (producer.clone(), topic.clone());
        async move {
            send_plain(
                &producer,
                &topic,
                &key(n, KEYS),
                &padded_payload(n).to_string(),
            )
            .await
        }
    };
    measure(messages, in_flight, send).await
}

async fn core_rate(
    cluster: &Cluster,
    messages: usize,
    in_flight: usize,
) -> BenchResult<(f64, f64)> {
    let topic = unique("producer-core");
    cluster.create_topic(&topic, PARTITIONS).await?;
    let config = cluster
        .config()?
        .source_system(PRODUCER_SOURCE)
        .build()
        .map_err(|error| error.to_string())?;
    let client = Arc::new(Client::new(config).map_err(|error| error.to_string())?);
    let send = move |n: usize| {
        let (client, topic) = (Arc::clone(&client), topic.clone());
        async move {
            client
                .send(&topic, &key(n, KEYS), &padded_payload(n), &[])
                .await
                .map_err(|error| format!("send: {error}"))
        }
    };
    measure(messages, in_flight, send).await
}

/// One warm-up send, then messages `0..count` with `in_flight` senders, each
/// awaiting its acknowledgement before the next; messages per second and the
/// process's CPU seconds per 100k messages over the same span.
async fn measure<F, Fut>(count: usize, in_flight: usize, send: F) -> BenchResult<(f64, f64)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = BenchResult<()>> + Send,
{
    send(0).await.map_err(|error| format!("warm-up {error}"))?;
    let send = Arc::new(send);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let cpu_started = cpu_now();
    let mut senders = JoinSet::new();
    for _ in 0..in_flight {
        let (send, next) = (Arc::clone(&send), Arc::clone(&next));
        senders.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= count {
                    return Ok::<_, String>(());
                }
                send(n).await?;
            }
        });
    }
    while let Some(done) = senders.join_next().await {
        done.map_err(|error| error.to_string())??;
    }
    let elapsed = started.elapsed().max(Duration::from_nanos(1));
    let cpu = cpu_now().saturating_sub(cpu_started);
    Ok((rate(count, elapsed), cpu_per_100k(cpu, count)))
}
