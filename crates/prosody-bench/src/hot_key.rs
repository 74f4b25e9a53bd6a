//! `prosody-bench hot-key`: how long cold keys wait for a handler slot with a
//! hot key beside them, against the same run without it (issue 12: target
//! within 2x at p99).
//!
//! ```text
//! cargo run --release -p prosody-bench -- hot-key [--runs 3] [--json out.json]
//! ```
//!
//! Each run: `COLD_KEYS` cold keys, one partition each, `COLD_PER_KEY` messages
//! each; a handler awaiting `WORK`; `max_concurrency` `SLOTS`. The hot run adds
//! one key with 10x the cold keys' traffic together, spread over `HOT_PARTITIONS`
//! partitions so that it has that many calls waiting for a slot at once (one
//! partition would give it one runner, which any scheduler bounds to one slot).
//! Everything is produced before the consumer starts, so each cold key always
//! has its next message queued: the gap between the end of one of its calls
//! and the start of the next is its wait for a slot. Runs alternate (without,
//! with) and the median of each figure over the runs is reported.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prosody::{ClassifyError, Client, Context, EventHandler, Message, OptionValue};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};

use crate::cluster::Cluster;
use crate::data::{queue, unique};
use crate::report::{median, percentile, ratio, round2, round3, Report};
use crate::{BenchResult, DEADLINE};

const COLD_KEYS: usize = 8;
const COLD_PER_KEY: usize = 100;
const HOT_PARTITIONS: usize = 8;
/// The hot key's messages over all cold keys' messages.
const HOT_FACTOR: usize = 10;
const SLOTS: i64 = 4;
const WORK: Duration = Duration::from_millis(5);
/// The most the cold keys' p99 wait may grow with the hot key beside them.
const TARGET: f64 = 2.0;

struct Options {
    runs: usize,
    bootstrap: Option<String>,
    json: Option<String>,
}

const USAGE: &str = "usage: prosody-bench hot-key [--runs N (3)] \
[--bootstrap HOST:PORT (default: $PROSODY_BENCH_BOOTSTRAP, else the mock)] [--json out.json]";

fn parse_args(args: &[String]) -> BenchResult<Options> {
    let mut options = Options {
        runs: 3,
        bootstrap: None,
        json: None,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => {
                let value = args.next().ok_or("--runs needs a number")?;
                options.runs = match value.parse() {
                    Ok(0) | Err(_) => {
                        return Err(format!("--runs: `{value}` is not a positive number"))
                    }
                    Ok(runs) => runs,
                };
            }
            "--bootstrap" => {
                options.bootstrap = Some(args.next().ok_or("--bootstrap needs HOST:PORT")?.clone());
            }
            "--json" => options.json = Some(args.next().ok_or("--json needs a path")?.clone()),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument `{other}` (try --help)")),
        }
    }
    Ok(options)
}

pub(crate) fn main(args: &[String]) -> ExitCode {
    let result = parse_args(args)
        .and_then(|options| crate::runtime().and_then(|runtime| runtime.block_on(run(&options))));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("prosody-bench hot-key: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Cold keys' waits in one run, in seconds.
struct Waits {
    p50: f64,
    p99: f64,
    /// The hot key's share of the calls that started while cold keys had work.
    hot_share: f64,
}

async fn run(options: &Options) -> BenchResult<()> {
    let cluster = Cluster::new(options.bootstrap.clone());
    let mut report = Report::default();
    if cluster.is_mock_broker() && !cluster.is_mock() {
        // Under `loopback` the mock has no admin API and auto-creates every
        // topic with 4 partitions: report the gap instead of failing the run.
        let needed = COLD_KEYS + HOT_PARTITIONS;
        eprintln!(
            "(hot key) skipped: needs {needed} partitions, and the loopback mock cluster \
             auto-creates topics with 4; run it on the in-process mock (./script/bench)"
        );
        report.insert("hot_key_skipped", "loopback mock: topics get 4 partitions");
        report.row(
            "hot key: cold keys' p99 wait",
            "skipped",
            format!("needs {needed} partitions; the loopback mock gives 4"),
            String::new(),
        );
        report.print(&format!("Hot key ({})", cluster.describe()));
        if let Some(path) = &options.json {
            report.write_json(path)?;
        }
        return Ok(());
    }
    let mut alone = Vec::new();
    let mut beside = Vec::new();
    for run in 1..=options.runs {
        eprintln!("(hot key) run {run}/{}: cold keys alone…", options.runs);
        alone.push(one_run(&cluster, false).await?);
        eprintln!(
            "(hot key) run {run}/{}: cold keys beside a hot key…",
            options.runs
        );
        beside.push(one_run(&cluster, true).await?);
    }
    let figure = |runs: &[Waits], pick: fn(&Waits) -> f64| median(runs.iter().map(pick).collect());
    let (alone_p50, alone_p99) = (figure(&alone, |w| w.p50), figure(&alone, |w| w.p99));
    let (beside_p50, beside_p99) = (figure(&beside, |w| w.p50), figure(&beside, |w| w.p99));
    let hot_share = figure(&beside, |w| w.hot_share);
    let growth = ratio(beside_p99, alone_p99);
    let ms = |seconds: f64| round2(seconds * 1e3);
    report.insert("hot_key_cold_wait_p50_ms", ms(beside_p50));
    report.insert("hot_key_cold_wait_p99_ms", ms(beside_p99));
    report.insert("no_hot_key_cold_wait_p50_ms", ms(alone_p50));
    report.insert("no_hot_key_cold_wait_p99_ms", ms(alone_p99));
    report.insert("hot_key_cold_wait_p99_ratio", round3(growth));
    report.insert("hot_key_share_of_calls", round3(hot_share));
    let verdict = if growth <= TARGET { "met" } else { "MISSED" };
    let scope = format!(
        "{COLD_KEYS} cold keys x {COLD_PER_KEY}, hot key {HOT_FACTOR}x over {HOT_PARTITIONS} partitions, \
         {WORK:?} handler, max_concurrency {SLOTS}, median of {}",
        options.runs
    );
    report.row(
        format!("hot key: cold keys' p99 wait ({scope})"),
        format!("{:.1} ms", beside_p99 * 1e3),
        format!("no hot key {:.1} ms", alone_p99 * 1e3),
        format!("{growth:.2} (target ≤ {TARGET}: {verdict})"),
    );
    report.row(
        "hot key: cold keys' p50 wait (same runs)",
        format!("{:.1} ms", beside_p50 * 1e3),
        format!("no hot key {:.1} ms", alone_p50 * 1e3),
        format!("{:.2}", ratio(beside_p50, alone_p50)),
    );
    report.row(
        "hot key: its share of calls while cold keys had work",
        format!("{hot_share:.2}"),
        format!(
            "one key's share {:.2}",
            1.0 / crate::report::as_f64(COLD_KEYS + 1)
        ),
        String::new(),
    );
    report.print(&format!("Hot key ({})", cluster.describe()));
    if let Some(path) = &options.json {
        report.write_json(path)?;
        eprintln!("wrote {path}");
    }
    Ok(())
}

/// One handler call.
struct Call {
    hot: bool,
    key: Arc<str>,
    start: Instant,
    end: Instant,
}

#[derive(Debug)]
struct Never;

impl std::fmt::Display for Never {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("never fails")
    }
}

impl std::error::Error for Never {}

impl ClassifyError for Never {}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Call>>>);

impl Recorder {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Call>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl EventHandler for Recorder {
    type Error = Never;

    async fn on_message(&self, _context: Context, message: Message) -> Result<(), Never> {
        let start = Instant::now();
        tokio::time::sleep(WORK).await;
        let key: Arc<str> = Arc::from(message.key());
        self.lock().push(Call {
            hot: &*key == "hot",
            key,
            start,
            end: Instant::now(),
        });
        Ok(())
    }
}

async fn one_run(cluster: &Cluster, hot: bool) -> BenchResult<Waits> {
    let topic = unique(if hot { "hot-key" } else { "cold-keys" });
    let partitions = COLD_KEYS + if hot { HOT_PARTITIONS } else { 0 };
    let created = cluster.create_topic(&topic, partitions).await?;
    if created < partitions {
        return Err(format!(
            "{topic} has {created} partitions, not {partitions}"
        ));
    }
    produce(cluster, &topic, hot).await?;
    let config = cluster
        .config()?
        .group_id(&unique("hot-key"))
        .subscribed_topics([topic.as_str()])
        .set("max_concurrency", OptionValue::Int(SLOTS))
        .map_err(|error| error.to_string())?
        .build()
        .map_err(|error| error.to_string())?;
    let client = Client::new(config).map_err(|error| error.to_string())?;
    let recorder = Recorder::default();
    client
        .subscribe(recorder.clone())
        .map_err(|error| error.to_string())?;
    let cold_total = COLD_KEYS * COLD_PER_KEY;
    let started = Instant::now();
    let outcome = loop {
        let cold = recorder.lock().iter().filter(|call| !call.hot).count();
        if cold >= cold_total {
            break Ok(());
        }
        if started.elapsed() > DEADLINE {
            break Err(format!(
                "only {cold} of {cold_total} cold messages in {DEADLINE:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    client
        .unsubscribe()
        .await
        .map_err(|error| error.to_string())?;
    outcome?;
    let calls = recorder.lock();
    Ok(waits(&calls))
}

fn waits(calls: &[Call]) -> Waits {
    let mut by_key: std::collections::BTreeMap<&str, Vec<&Call>> =
        std::collections::BTreeMap::new();
    for call in calls.iter().filter(|call| !call.hot) {
        by_key.entry(&call.key).or_default().push(call);
    }
    let mut waits = Vec::new();
    let mut first_cold = None::<Instant>;
    let mut last_cold = None::<Instant>;
    for runs in by_key.values_mut() {
        runs.sort_by_key(|call| call.start);
        for pair in runs.windows(2) {
            waits.push(
                pair[1]
                    .start
                    .saturating_duration_since(pair[0].end)
                    .as_secs_f64(),
            );
        }
        if let (Some(first), Some(last)) = (runs.first(), runs.last()) {
            first_cold = Some(first_cold.map_or(first.start, |at| at.min(first.start)));
            last_cold = Some(last_cold.map_or(last.start, |at| at.max(last.start)));
        }
    }
    let (mut during, mut hot_during) = (0_usize, 0_usize);
    if let (Some(first), Some(last)) = (first_cold, last_cold) {
        for call in calls
            .iter()
            .filter(|call| call.start >= first && call.start < last)
        {
            during += 1;
            hot_during += usize::from(call.hot);
        }
    }
    Waits {
        p50: percentile(&mut waits, 0.5),
        p99: percentile(&mut waits, 0.99),
        hot_share: ratio(
            crate::report::as_f64(hot_during),
            crate::report::as_f64(during),
        ),
    }
}

/// Cold keys on partitions `0..COLD_KEYS`, then (with `hot`) the hot key
/// round-robin over the next `HOT_PARTITIONS`.
async fn produce(cluster: &Cluster, topic: &str, hot: bool) -> BenchResult<()> {
    let topic = topic.to_owned();
    let mut config = cluster.client_config()?;
    config.set("linger.ms", "5");
    tokio::task::spawn_blocking(move || {
        let producer: BaseProducer = config
            .create()
            .map_err(|error| format!("producer: {error}"))?;
        let cold = (0..COLD_PER_KEY)
            .flat_map(|n| (0..COLD_KEYS).map(move |k| (format!("cold-{k}"), k, n)));
        let hot_count = if hot {
            COLD_KEYS * COLD_PER_KEY * HOT_FACTOR
        } else {
            0
        };
        let hot = (0..hot_count).map(|n| ("hot".to_owned(), COLD_KEYS + n % HOT_PARTITIONS, n));
        for (key, partition, n) in cold.chain(hot) {
            let payload = format!("{{\"n\":{n}}}");
            let partition = i32::try_from(partition).map_err(|_| "too many partitions")?;
            let record = BaseRecord::to(&topic)
                .key(key.as_str())
                .payload(payload.as_str())
                .partition(partition);
            queue(&producer, record)?;
        }
        producer
            .flush(DEADLINE)
            .map_err(|error| format!("flush: {error}"))
    })
    .await
    .map_err(|error| error.to_string())?
}
