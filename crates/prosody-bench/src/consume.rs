//! Consumer throughput:
//!
//! - (a) a plain rdkafka `BaseConsumer` loop vs Prosody with a no-op handler, on
//!   the same messages: what the per-key machinery costs (target, issue 14: core ≥ 0.6
//!   of the plain loop that also decodes JSON, which the core does for every message);
//! - (c) a handler awaiting 10 ms, 1 partition, 256 keys, at `max_concurrency` 32
//!   and 128: vs the ideal (`max_concurrency` / 10 ms) and vs a sequential loop
//!   doing the same waits.
//!
//! Throughput is messages over the time from the first handler start to the last
//! handler end, so joining the consumer group is not counted; scenario (a) reports
//! the median of three interleaved runs, each by a new group over the same messages.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prosody::{Client, Context, EventHandler, Message, OptionValue};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use serde_json::Value;

use crate::allocations::{allocations_now, per_message};
use crate::cluster::{Cluster, BOOTSTRAP_ENV};
use crate::data::{fill, unique, Payload};
use crate::report::{
    cpu_now, cpu_per_100k, cpu_shown, median, per_second, rate, ratio, round0, round1, round2,
    round3, Report,
};
use crate::{as_i64, BenchResult, DEADLINE, MAX_PER_PARTITION};

/// Distinct keys in the no-op scenario.
const NOOP_KEYS: usize = 1_000;
/// Distinct keys in the 10 ms scenario.
const IO_KEYS: usize = 256;
/// The 10 ms scenario's wait.
const WAIT: Duration = Duration::from_millis(10);
/// Messages the sequential 10 ms baseline handles (about 2 s).
const SEQUENTIAL_MESSAGES: usize = 200;
/// Runs of scenario (a); the median is reported.
const RUNS: usize = 3;
/// Core throughput over plain rdkafka decoding JSON that scenario (a) aims for.
const TARGET_CORE_VS_PLAIN_JSON: f64 = 0.6;

/// (a) plain rdkafka vs Prosody with a no-op handler, same messages.
pub(crate) async fn noop(
    cluster: &Cluster,
    messages: usize,
    report: &mut Report,
) -> BenchResult<()> {
    let topic = unique("noop");
    let partitions = cluster
        .create_topic(&topic, messages.div_ceil(MAX_PER_PARTITION).max(1))
        .await?;
    eprintln!("(a) producing {messages} messages over {partitions} partitions…");
    fill(cluster, &topic, messages, NOOP_KEYS, Payload::Small).await?;
    let (mut plain, mut plain_json, mut core) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=RUNS {
        eprintln!("(a) run {run}/{RUNS}: plain rdkafka consumer…");
        plain.push(plain_rdkafka(cluster, &topic, messages, false).await?);
        eprintln!("(a) run {run}/{RUNS}: plain rdkafka consumer decoding JSON…");
        plain_json.push(plain_rdkafka(cluster, &topic, messages, true).await?);
        eprintln!("(a) run {run}/{RUNS}: Prosody, no-op handler…");
        core.push(prosody_rate(cluster, &topic, messages, None, &[]).await?);
    }
    let medians =
        |runs: &[Figures], figure: fn(&Figures) -> f64| median(runs.iter().map(figure).collect());
    // Each run's ratio, Prosody against the JSON loop run just before it: the
    // machine's speed drifts between runs more than within one.
    let json_ratios: Vec<f64> = core
        .iter()
        .zip(&plain_json)
        .map(|(core, plain)| ratio(core.rate, plain.rate))
        .collect();
    let json_ratio_range = json_ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(low, high), &value| {
            (low.min(value), high.max(value))
        });
    let core_vs_plain_json = median(json_ratios);
    let (plain_cpu, plain_json_cpu, core_cpu) = (
        medians(&plain, |run| run.cpu),
        medians(&plain_json, |run| run.cpu),
        medians(&core, |run| run.cpu),
    );
    let (plain_json_allocations, core_allocations) = (
        medians(&plain_json, |run| run.allocations),
        medians(&core, |run| run.allocations),
    );
    let (plain, plain_json, core) = (
        medians(&plain, |run| run.rate),
        medians(&plain_json, |run| run.rate),
        medians(&core, |run| run.rate),
    );
    let core_vs_plain = ratio(core, plain);
    report.insert("messages", messages);
    report.insert("noop_partitions", partitions);
    report.insert("plain_rdkafka_msgs_per_sec", round0(plain));
    report.insert("core_noop_msgs_per_sec", round0(core));
    report.insert("core_vs_plain_ratio", round3(core_vs_plain));
    report.insert("plain_rdkafka_json_msgs_per_sec", round0(plain_json));
    report.insert("core_vs_plain_json_ratio", round3(core_vs_plain_json));
    report.insert("plain_rdkafka_cpu_s_per_100k", round2(plain_cpu));
    report.insert("plain_rdkafka_json_cpu_s_per_100k", round2(plain_json_cpu));
    report.insert("core_noop_cpu_s_per_100k", round2(core_cpu));
    report.insert(
        "plain_rdkafka_json_allocs_per_msg",
        round1(plain_json_allocations),
    );
    report.insert("core_noop_allocs_per_msg", round1(core_allocations));
    let verdict = if core_vs_plain_json >= TARGET_CORE_VS_PLAIN_JSON {
        "met"
    } else {
        "MISSED"
    };
    let scope =
        format!("{messages} msgs, {partitions} partitions, {NOOP_KEYS} keys, median of {RUNS}");
    report.row(
        format!("(a) core, no-op handler ({scope})"),
        per_second(core),
        format!("plain BaseConsumer loop {}", per_second(plain)),
        format!("{core_vs_plain:.2}"),
    );
    report.row(
        format!(
            "(a) core, no-op handler (same runs; median of the runs' ratios, {:.2}-{:.2})",
            json_ratio_range.0, json_ratio_range.1
        ),
        per_second(core),
        format!("plain loop decoding JSON {}", per_second(plain_json)),
        format!("{core_vs_plain_json:.2} (target ≥ {TARGET_CORE_VS_PLAIN_JSON}: {verdict})"),
    );
    report.row(
        "(a) core, no-op handler: process CPU (same runs)",
        cpu_shown(core_cpu),
        format!("plain BaseConsumer loop {}", cpu_shown(plain_cpu)),
        format!("{:.2}", ratio(core_cpu, plain_cpu)),
    );
    report.row(
        "(a) core, no-op handler: process CPU (same runs)",
        cpu_shown(core_cpu),
        format!("plain loop decoding JSON {}", cpu_shown(plain_json_cpu)),
        format!("{:.2}", ratio(core_cpu, plain_json_cpu)),
    );
    report.row(
        "(a) core, no-op handler: Rust heap allocations per message (same runs)",
        format!("{core_allocations:.1}"),
        format!("plain loop decoding JSON {plain_json_allocations:.1}"),
        format!("{:+.1}", core_allocations - plain_json_allocations),
    );
    Ok(())
}

/// `prosody-bench noop-once TOPIC COUNT`: the core's no-op consumer over the
/// first COUNT messages of TOPIC on the broker of `PROSODY_BENCH_BOOTSTRAP`, by
/// a new group; prints `{"msgs_per_sec":…,"cpu_s_per_100k":…}`. The Ruby
/// bench's (b) runs it between its own runs over the same messages, so that
/// Ruby and the core are compared at the same moments of the machine.
pub(crate) fn noop_once_command(args: &[String]) -> ExitCode {
    topic_command("noop-once", args, |cluster, topic, count| async move {
        let figures = prosody_rate(&cluster, &topic, count, None, &[]).await?;
        Ok(format!(
            "{{\"msgs_per_sec\":{},\"cpu_s_per_100k\":{}}}",
            round0(figures.rate),
            round2(figures.cpu)
        ))
    })
}

/// `prosody-bench fill TOPIC COUNT`: COUNT messages like (a)'s (a small JSON
/// payload, 1000 keys, no headers, produced in full batches) into TOPIC on
/// the broker of `PROSODY_BENCH_BOOTSTRAP`: the Ruby bench's (b) data.
pub(crate) fn fill_command(args: &[String]) -> ExitCode {
    topic_command("fill", args, |cluster, topic, count| async move {
        fill(&cluster, &topic, count, NOOP_KEYS, Payload::Small).await?;
        Ok(String::new())
    })
}

/// Runs `work` for a `TOPIC COUNT` subcommand on the external broker, printing
/// its output (when there is some) or its error.
fn topic_command<F, Fut>(name: &str, args: &[String], work: F) -> ExitCode
where
    F: FnOnce(Cluster, String, usize) -> Fut,
    Fut: std::future::Future<Output = BenchResult<String>>,
{
    let result = (|| {
        let [topic, count] = args else {
            return Err(format!("usage: prosody-bench {name} TOPIC COUNT"));
        };
        let count: usize = count
            .parse()
            .map_err(|_| format!("`{count}` is not a message count"))?;
        let cluster = Cluster::new(None);
        if cluster.is_mock() {
            return Err(format!(
                "{BOOTSTRAP_ENV} is not set: the topic lives on the caller's broker"
            ));
        }
        crate::runtime()?.block_on(work(cluster, topic.clone(), count))
    })();
    match result {
        Ok(output) => {
            if !output.is_empty() {
                println!("{output}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("prosody-bench {name}: {error}");
            ExitCode::FAILURE
        }
    }
}

/// (c) a handler awaiting 10 ms, 1 partition, 256 keys.
pub(crate) async fn io(cluster: &Cluster, report: &mut Report) -> BenchResult<()> {
    eprintln!("(c) sequential baseline…");
    let sequential = sequential_rate(SEQUENTIAL_MESSAGES).await;
    report.insert("sequential_10ms_msgs_per_sec", round1(sequential));
    // max_uncommitted (default 64) also caps how many messages of one partition can
    // be in flight, so 128 is measured with the default and with room for 128.
    let cases: [(usize, Option<usize>); 3] = [(32, None), (128, None), (128, Some(256))];
    for (concurrency, max_uncommitted) in cases {
        let count = (concurrency * 100).min(MAX_PER_PARTITION);
        let topic = unique(&format!("io{concurrency}"));
        // 1 unless a real broker auto-created the topic with its own default.
        let partitions = cluster.create_topic(&topic, 1).await?;
        fill(cluster, &topic, count, IO_KEYS, Payload::Small).await?;
        let mut extra = vec![("max_concurrency", OptionValue::Int(as_i64(concurrency)))];
        if let Some(max) = max_uncommitted {
            extra.push(("max_uncommitted", OptionValue::Int(as_i64(max))));
        }
        let shown =
            max_uncommitted.map_or_else(String::new, |max| format!(", max_uncommitted {max}"));
        eprintln!("(c) Prosody, max_concurrency {concurrency}{shown}…");
        let Figures { rate, cpu, .. } =
            prosody_rate(cluster, &topic, count, Some(WAIT), &extra).await?;
        let ideal = crate::report::as_f64(concurrency) / WAIT.as_secs_f64();
        let label = match max_uncommitted {
            Some(max) => format!("c{concurrency}_max_uncommitted{max}"),
            None => format!("c{concurrency}"),
        };
        report.insert(format!("io_10ms_{label}_msgs_per_sec"), round0(rate));
        report.insert(format!("io_10ms_{label}_cpu_s_per_100k"), round2(cpu));
        report.insert(format!("io_10ms_{label}_vs_ideal"), round3(rate / ideal));
        report.insert(
            format!("io_10ms_{label}_vs_sequential"),
            round1(ratio(rate, sequential)),
        );
        let scenario = format!(
            "(c) core, 10 ms handler, {}, {IO_KEYS} keys, \
             max_concurrency {concurrency}{shown} ({count} msgs)",
            partitions_shown(partitions)
        );
        report.row(
            &scenario,
            format!("{} ({})", per_second(rate), cpu_shown(cpu)),
            format!("ideal {}", per_second(ideal)),
            format!("{:.2}", rate / ideal),
        );
        report.row(
            scenario,
            per_second(rate),
            format!("sequential loop {sequential:.0} msg/s ({SEQUENTIAL_MESSAGES} msgs)"),
            format!("{:.1}x", ratio(rate, sequential)),
        );
    }
    Ok(())
}

/// What one consuming run measured.
struct Figures {
    /// Messages per second.
    rate: f64,
    /// Process CPU seconds per 100k messages.
    cpu: f64,
    /// Rust heap allocations per message, every thread.
    allocations: f64,
}

/// A plain consumer loop: poll and count; with `decode`, also decode each payload as JSON.
async fn plain_rdkafka(
    cluster: &Cluster,
    topic: &str,
    count: usize,
    decode: bool,
) -> BenchResult<Figures> {
    let topic = topic.to_owned();
    let mut config = cluster.client_config()?;
    config
        .set("group.id", unique("plain"))
        .set("auto.offset.reset", "earliest");
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config
            .create()
            .map_err(|error| format!("consumer: {error}"))?;
        consumer
            .subscribe(&[&topic])
            .map_err(|error| error.to_string())?;
        let started = Instant::now();
        let mut first = None;
        let mut cpu_first = Duration::ZERO;
        let mut allocations_first = 0;
        let mut seen = 0;
        while seen < count {
            if started.elapsed() > DEADLINE {
                return Err(format!(
                    "plain consumer: only {seen} of {count} messages in {DEADLINE:?}"
                ));
            }
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    if first.is_none() {
                        first = Some(Instant::now());
                        cpu_first = cpu_now();
                        allocations_first = allocations_now();
                    }
                    if decode {
                        let payload = message.payload().unwrap_or_default();
                        let value: Value =
                            serde_json::from_slice(payload).map_err(|error| error.to_string())?;
                        std::hint::black_box(value);
                    }
                    seen += 1;
                }
                Some(Err(error)) => return Err(format!("plain consumer: {error}")),
                None => {}
            }
        }
        let first = first.ok_or("no messages")?;
        let elapsed = first.elapsed();
        let cpu = cpu_now().saturating_sub(cpu_first);
        Ok(Figures {
            rate: rate(count, elapsed),
            cpu: cpu_per_100k(cpu, count),
            allocations: per_message(allocations_first, allocations_now(), count),
        })
    })
    .await
    .map_err(|error| error.to_string())?
}

/// Counts handler calls, optionally awaiting `work` in each.
struct Counting {
    target: usize,
    work: Option<Duration>,
    handled: AtomicUsize,
    /// When, at what process CPU time and allocation count.
    first: OnceLock<(Instant, Duration, u64)>,
    last: OnceLock<(Instant, Duration, u64)>,
}

struct CountingHandler(Arc<Counting>);

impl EventHandler for CountingHandler {
    type Error = std::convert::Infallible;

    async fn on_message(&self, _context: Context, _message: Message) -> Result<(), Self::Error> {
        self.0
            .first
            .get_or_init(|| (Instant::now(), cpu_now(), allocations_now()));
        if let Some(work) = self.0.work {
            tokio::time::sleep(work).await;
        }
        if self.0.handled.fetch_add(1, Ordering::AcqRel) + 1 == self.0.target {
            let _ = self
                .0
                .last
                .set((Instant::now(), cpu_now(), allocations_now()));
        }
        Ok(())
    }
}

/// Prosody consuming `count` messages of `topic`, each handler awaiting `work`.
async fn prosody_rate(
    cluster: &Cluster,
    topic: &str,
    count: usize,
    work: Option<Duration>,
    extra: &[(&str, OptionValue)],
) -> BenchResult<Figures> {
    let mut builder = cluster
        .config()?
        .group_id(&unique("prosody"))
        .subscribed_topics([topic]);
    for (option, value) in extra {
        builder = builder
            .set(option, value.clone())
            .map_err(|error| error.to_string())?;
    }
    let config = builder.build().map_err(|error| error.to_string())?;
    let client = Client::new(config).map_err(|error| error.to_string())?;
    let counting = Arc::new(Counting {
        target: count,
        work,
        handled: AtomicUsize::new(0),
        first: OnceLock::new(),
        last: OnceLock::new(),
    });
    client
        .subscribe(CountingHandler(Arc::clone(&counting)))
        .map_err(|error| error.to_string())?;
    let started = Instant::now();
    let outcome = loop {
        if let (Some(first), Some(last)) = (counting.first.get(), counting.last.get()) {
            let cpu = last.1.saturating_sub(first.1);
            break Ok(Figures {
                rate: rate(count, last.0.duration_since(first.0)),
                cpu: cpu_per_100k(cpu, count),
                allocations: per_message(first.2, last.2, count),
            });
        }
        if started.elapsed() > DEADLINE {
            let handled = counting.handled.load(Ordering::Acquire);
            break Err(format!(
                "Prosody: only {handled} of {count} messages in {DEADLINE:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    client
        .unsubscribe()
        .await
        .map_err(|error| error.to_string())?;
    outcome
}

/// A loop awaiting [`WAIT`] once per message, one message at a time.
async fn sequential_rate(count: usize) -> f64 {
    let started = Instant::now();
    for _ in 0..count {
        tokio::time::sleep(WAIT).await;
    }
    rate(count, started.elapsed())
}

/// "1 partition", "4 partitions".
fn partitions_shown(partitions: usize) -> String {
    if partitions == 1 {
        "1 partition".to_owned()
    } else {
        format!("{partitions} partitions")
    }
}
