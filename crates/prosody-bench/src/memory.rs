//! (f) Memory under a backlog: the resident set of a consumer facing 500k
//! messages with a handler that sleeps 5 ms (default `max_concurrency`), which
//! must stay bounded by `max_uncommitted` and librdkafka's prefetch
//! (`queued.min.messages` per partition), not grow with the backlog.
//!
//! The broker holds the backlog in memory (the mock cluster lives in this
//! process), so the consumer runs in a child process, this program re-run as
//! `prosody-bench memory-child`, connecting to the broker's address with
//! `mock: false`. The child reports its RSS right after creating the client
//! (before subscribing: the baseline) and the peak sampled every 50 ms over the
//! first seconds of consumption; the table also shows the backlog's raw size
//! (keys and payloads) for contrast. The mock's fetch cost grows with partition
//! length, so the backlog is spread over partitions of 25k messages.

use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prosody::{Client, Context, EventHandler, Message};
use serde_json::{json, Value};

use crate::cluster::Cluster;
use crate::data::{fill, unique, Payload};
use crate::report::{ratio, round1, round2, Report};
use crate::BenchResult;

/// Messages per partition of the backlog.
const PER_PARTITION: usize = 25_000;
/// Distinct keys of the backlog.
const KEYS: usize = 1_000;
/// The slow handler's sleep.
const WORK: Duration = Duration::from_millis(5);
/// How long the child consumes while its RSS is sampled, by default.
pub(crate) const CONSUME_SECS: u64 = 12;
/// RSS sampling period.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// Longest wait for the child's first message.
const FIRST_MESSAGE_DEADLINE: Duration = Duration::from_secs(60);

/// Fills the backlog, runs the child, reports its figures.
pub(crate) async fn memory(
    cluster: &Cluster,
    backlog: usize,
    seconds: u64,
    report: &mut Report,
) -> BenchResult<()> {
    let topic = unique("memory");
    let partitions = cluster
        .create_topic(&topic, backlog.div_ceil(PER_PARTITION).max(1))
        .await?;
    eprintln!("(f) producing a backlog of {backlog} messages over {partitions} partitions…");
    let bytes = fill(cluster, &topic, backlog, KEYS, Payload::Padded).await?;
    let backlog_mb = mebibytes(bytes);
    eprintln!(
        "(f) consumer in a child process, {} ms handler, for {seconds} s…",
        WORK.as_millis(),
    );
    let me =
        std::env::current_exe().map_err(|error| format!("cannot find this program: {error}"))?;
    let output = tokio::process::Command::new(me)
        .args([
            "memory-child",
            "--bootstrap",
            &cluster.bootstrap_servers()?,
            "--topic",
            &topic,
            "--seconds",
            &seconds.to_string(),
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .await
        .map_err(|error| format!("cannot run the child: {error}"))?;
    if !output.status.success() {
        return Err(format!("the memory child failed: {}", output.status));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let figures: Value = stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok())
        .ok_or_else(|| format!("the memory child printed no figures: {stdout}"))?;
    let kib = |name: &str| {
        figures
            .get(name)
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("the memory child did not report {name}"))
    };
    let (idle, peak) = (
        mebibytes(kib("idle_kib")? * 1024),
        mebibytes(kib("peak_kib")? * 1024),
    );
    let handled = figures.get("handled").and_then(Value::as_u64).unwrap_or(0);
    let peak_after = figures
        .get("peak_after_secs")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    let after = mebibytes(kib("final_kib")? * 1024);
    report.insert("memory_backlog_messages", backlog);
    report.insert("memory_partitions", partitions);
    report.insert("memory_backlog_mb", round1(backlog_mb));
    report.insert("memory_idle_rss_mb", round1(idle));
    report.insert("memory_peak_rss_mb", round1(peak));
    report.insert("memory_growth_mb", round1(peak - idle));
    report.insert("memory_peak_vs_idle_ratio", round2(ratio(peak, idle)));
    report.insert("memory_peak_after_secs", peak_after);
    report.insert("memory_after_unsubscribe_rss_mb", round1(after));
    report.insert("memory_handled", handled);
    report.insert("memory_seconds", seconds);
    report.insert(
        "memory_rss_by_second_mb",
        figures.get("rss_by_second_mb").cloned().unwrap_or_default(),
    );
    let scenario = format!(
        "(f) consumer peak RSS, {backlog}-msg backlog, {partitions} partitions, \
         {} ms handler, {seconds} s ({handled} handled)",
        WORK.as_millis(),
    );
    report.row(
        &scenario,
        format!("{peak:.1} MB"),
        format!("same process idle after Client::new {idle:.1} MB"),
        format!("{:.2}x", ratio(peak, idle)),
    );
    report.row(
        "(f) consumer RSS growth over idle (same run)",
        format!("{:.1} MB", peak - idle),
        format!("backlog size (keys + payloads) {backlog_mb:.1} MB"),
        format!("{:.2}", ratio(peak - idle, backlog_mb)),
    );
    Ok(())
}

fn mebibytes(bytes: u64) -> f64 {
    #[allow(clippy::cast_precision_loss)] // far below 2^52
    let bytes = bytes as f64;
    bytes / (1024.0 * 1024.0)
}

/// Resident set size of this process, from `/proc/self/status`.
pub(crate) fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Counts messages after sleeping [`WORK`] in each.
#[derive(Default)]
struct Slow {
    handled: AtomicUsize,
    first: OnceLock<Instant>,
}

struct SlowHandler(Arc<Slow>);

impl EventHandler for SlowHandler {
    type Error = std::convert::Infallible;

    async fn on_message(&self, _context: Context, message: Message) -> Result<(), Self::Error> {
        self.0.first.get_or_init(Instant::now);
        tokio::time::sleep(WORK).await;
        std::hint::black_box(message.payload());
        self.0.handled.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// `prosody-bench memory-child --bootstrap SERVERS --topic TOPIC --seconds N`:
/// consumes TOPIC with the slow handler for N seconds after the first message
/// and prints one JSON line: `idle_kib`, `peak_kib`, `peak_after_secs` (since
/// subscribing), `rss_by_second_mb` (RSS at each second after the first
/// message, to show whether it levels off), `final_kib` (after unsubscribing),
/// `handled`.
pub(crate) async fn child(args: &[String]) -> BenchResult<()> {
    let value = |flag: &str| {
        args.iter()
            .position(|arg| arg == flag)
            .and_then(|at| args.get(at + 1))
            .cloned()
            .ok_or_else(|| format!("memory-child needs {flag}"))
    };
    let cluster = Cluster::External(value("--bootstrap")?);
    let topic = value("--topic")?;
    let seconds: u64 = value("--seconds")?
        .parse()
        .map_err(|_| "memory-child: --seconds needs a number".to_owned())?;
    let consume_for = Duration::from_secs(seconds);
    let config = cluster
        .config()?
        .group_id(&unique("memory"))
        .subscribed_topics([topic.as_str()])
        .build()
        .map_err(|error| error.to_string())?;
    let client = Client::new(config).map_err(|error| error.to_string())?;
    let idle = rss_kib().ok_or("cannot read VmRSS from /proc/self/status")?;
    let slow = Arc::new(Slow::default());
    client
        .subscribe(SlowHandler(Arc::clone(&slow)))
        .map_err(|error| error.to_string())?;
    let subscribed = Instant::now();
    let (mut peak, mut peak_at) = (idle, Duration::ZERO);
    let mut by_second = Vec::new();
    let outcome = loop {
        let rss = rss_kib().unwrap_or(0);
        if rss > peak {
            (peak, peak_at) = (rss, subscribed.elapsed());
        }
        if let Some(first) = slow.first.get() {
            // One sample per whole second since the first message.
            if first.elapsed().as_secs() >= u64::try_from(by_second.len()).unwrap_or(u64::MAX) {
                by_second.push(round1(mebibytes(rss * 1024)));
            }
        }
        match slow.first.get() {
            Some(first) if first.elapsed() >= consume_for => break Ok(()),
            None if subscribed.elapsed() > FIRST_MESSAGE_DEADLINE => {
                break Err(format!(
                    "no message within {FIRST_MESSAGE_DEADLINE:?} of subscribing"
                ))
            }
            _ => tokio::time::sleep(SAMPLE_EVERY).await,
        }
    };
    let handled = slow.handled.load(Ordering::Relaxed);
    client
        .unsubscribe()
        .await
        .map_err(|error| error.to_string())?;
    outcome?;
    println!(
        "{}",
        json!({
            "idle_kib": idle,
            "peak_kib": peak,
            "peak_after_secs": round1(peak_at.as_secs_f64()),
            "rss_by_second_mb": by_second,
            "final_kib": rss_kib().unwrap_or(0),
            "handled": handled,
        })
    );
    Ok(())
}
