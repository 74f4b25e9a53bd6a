//! `prosody-bench timers`: the timer stores, PostgreSQL against the in-memory
//! store as the baseline measured in the same run.
//!
//! ```text
//! cargo run --release -p prosody-bench -- timers [--count 100000] [--keys 1000]
//!     [--concurrency 64] [--window-secs 60] [--database-url URL] [--json out.json]
//! ```
//!
//! Schedules `count` timers over `keys` keys of one partition, spread over an
//! hour, then measures:
//!
//! - schedule throughput with `concurrency` calls in flight, and the latency of
//!   one call at a time;
//! - `due` for a `window-secs` window (what the consumer loads to fire soon),
//!   and paging through every timer with `due` from a cursor (loading a partition);
//! - unschedule throughput (deleting fired timers), which also cleans up.
//!
//! Without `--database-url` (or `PROSODY_DATABASE_URL`) it starts the private
//! test cluster with `script/postgres` and stops it afterwards unless someone
//! else is using it. The firing lag and the consumer's memory need the
//! consumer's timer scheduler: see [`firing_lag`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prosody::{MemoryStore, PartitionScope, PostgresStore, TimerStore};
use serde_json::json;

use crate::cluster::Cluster;
use crate::memory::rss_kib;
use crate::report::{self, as_f64, Report};

type BenchResult<T> = Result<T, String>;

/// Timers are spread over this span after the base time.
const SPREAD_MS: i64 = 3_600_000;
/// Calls made one at a time to measure single-call latency.
const SEQUENTIAL_CALLS: usize = 2_000;
/// Repetitions of the `due` window query.
const DUE_REPEATS: usize = 50;
/// Page size when loading the whole partition with `due` from a cursor.
const PAGE: usize = 1_000;

struct Options {
    count: usize,
    keys: usize,
    concurrency: usize,
    window_secs: i64,
    database_url: Option<String>,
    json: Option<String>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> BenchResult<Options> {
    let mut options = Options {
        count: 100_000,
        keys: 1_000,
        concurrency: 64,
        window_secs: 60,
        database_url: std::env::var("PROSODY_DATABASE_URL").ok(),
        json: None,
    };
    fn number<T: std::str::FromStr>(name: &str, value: Option<String>) -> BenchResult<T> {
        let value = value.ok_or(format!("{name} needs a number"))?;
        value
            .replace('_', "")
            .parse()
            .map_err(|_| format!("{name}: `{value}` is not a number"))
    }
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--count" => options.count = number("--count", args.next())?,
            "--keys" => options.keys = number("--keys", args.next())?,
            "--concurrency" => options.concurrency = number("--concurrency", args.next())?,
            "--window-secs" => options.window_secs = number("--window-secs", args.next())?,
            "--database-url" => {
                options.database_url = Some(args.next().ok_or("--database-url needs a URL")?);
            }
            "--json" => options.json = Some(args.next().ok_or("--json needs a path")?),
            "-h" | "--help" => {
                println!(
                    "usage: prosody-bench timers [--count N (100000)] [--keys N (1000)] \
                     [--concurrency N (64)] [--window-secs S (60)] [--database-url URL] \
                     [--json out.json]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument `{other}` (try --help)")),
        }
    }
    if options.count == 0 || options.keys == 0 || options.concurrency == 0 {
        return Err("--count, --keys and --concurrency must be at least 1".to_owned());
    }
    Ok(options)
}

/// Entry point of the `timers` subcommand; `args` follow the word `timers`.
pub(crate) fn main(args: impl Iterator<Item = String>) -> ExitCode {
    let result = parse_args(args).and_then(|options| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|error| format!("cannot start tokio: {error}"))?;
        runtime.block_on(run(options))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("prosody-bench timers: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The private cluster from `script/postgres`, held by this process.
struct TestCluster;

impl TestCluster {
    fn script(command: &str) -> BenchResult<String> {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../script/postgres");
        let output = Command::new(&script)
            .arg(command)
            .env("PROSODY_PG_HOLDER", std::process::id().to_string())
            .output()
            .map_err(|error| format!("cannot run {}: {error}", script.display()))?;
        if !output.status.success() {
            return Err(format!(
                "script/postgres {command} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Err(error) = Self::script("stop") {
            eprintln!("{error}");
        }
    }
}

async fn run(options: Options) -> BenchResult<()> {
    let (url, _cluster) = match &options.database_url {
        Some(url) => (url.clone(), None),
        None => {
            let url = TestCluster::script("start")?;
            (url, Some(TestCluster))
        }
    };
    let postgres: Arc<dyn TimerStore> = Arc::new(
        PostgresStore::connect(&url)
            .await
            .map_err(|error| format!("PostgreSQL: {error}"))?,
    );
    let memory: Arc<dyn TimerStore> = Arc::new(MemoryStore::new());

    println!(
        "timers: {} over {} keys in one partition, {} calls in flight, due window {} s",
        options.count, options.keys, options.concurrency, options.window_secs
    );
    let rss_before = rss_kib();
    let mut results = BTreeMap::new();
    results.insert("timers_count".to_owned(), json!(options.count));
    results.insert("timers_keys".to_owned(), json!(options.keys));
    results.insert("timers_concurrency".to_owned(), json!(options.concurrency));
    let memory_figures = measure("memory", &memory, &options).await?;
    let rss_after = rss_kib();
    let postgres_figures = measure("postgres", &postgres, &options).await?;

    print_table(&memory_figures, &postgres_figures);
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        // Measured at peak: the memory store still held every timer then.
        println!(
            "RSS growth with {} timers in the memory store: {} KiB",
            options.count,
            after.saturating_sub(before)
        );
        results.insert(
            "timers_memory_store_rss_kib".to_owned(),
            json!(after.saturating_sub(before)),
        );
    }
    for (store, figures) in [("memory", &memory_figures), ("postgres", &postgres_figures)] {
        for (name, value) in figures {
            results.insert(format!("timers_{store}_{name}"), json!(round(*value)));
        }
    }
    let lag = firing_lag(&options, &url, &postgres).await;
    match &lag {
        Some(lag) => {
            results.insert("timers_fire_lag_p50_ms".to_owned(), json!(lag.p50_ms));
            results.insert("timers_fire_lag_p99_ms".to_owned(), json!(lag.p99_ms));
            results.insert("timers_consumer_rss_kib".to_owned(), json!(lag.rss_kib));
        }
        None => println!("firing lag: not measured (needs the consumer's timer scheduler)"),
    }

    if let Some(path) = &options.json {
        let mut report = Report::default();
        for (key, value) in results {
            report.insert(key, value);
        }
        add_rows(
            &mut report,
            &memory_figures,
            &postgres_figures,
            lag.as_ref(),
        );
        report.write_json(path)?;
    }
    Ok(())
}

/// Figures of one store, by name (see [`print_table`] for units).
type Figures = Vec<(&'static str, f64)>;

async fn measure(
    label: &str,
    store: &Arc<dyn TimerStore>,
    options: &Options,
) -> BenchResult<Figures> {
    let scope = Arc::new(PartitionScope::new(
        format!("bench-{label}-{}", std::process::id()),
        "bench-timers",
        0,
    ));
    let base = now_ms() + 86_400_000;
    let timer = Arc::new(move |index: usize| {
        let index = i64::try_from(index).unwrap_or(i64::MAX);
        // A stride coprime with the spread scatters consecutive indexes over the hour.
        (base + (index * 7_919) % SPREAD_MS, index)
    });
    let keys = options.keys;
    let key = move |index: i64| format!("key-{:05}", index % i64::try_from(keys).unwrap_or(1));
    let mut figures = Vec::new();

    // Schedule, many calls in flight.
    let count = options.count;
    let started = Instant::now();
    let latencies = in_flight(options.concurrency, count, {
        let (store, scope, timer) = (Arc::clone(store), Arc::clone(&scope), Arc::clone(&timer));
        move |index| {
            let (store, scope, timer) =
                (Arc::clone(&store), Arc::clone(&scope), Arc::clone(&timer));
            async move {
                let (at_ms, index) = timer(index);
                store.schedule(&scope, &key(index), at_ms).await.map(|_| ())
            }
        }
    })
    .await?;
    figures.push(("schedule_per_sec", per_second(count, started.elapsed())));
    figures.push(("schedule_concurrent_p99_ms", percentile(&latencies, 0.99)));

    // Schedule, one call at a time (more timers on top of the ones above).
    let sequential = SEQUENTIAL_CALLS.min(count);
    let mut latencies = Vec::with_capacity(sequential);
    for index in 0..sequential {
        let (at_ms, index) = timer(index);
        let call = Instant::now();
        store
            .schedule(&scope, &key(index), at_ms + 1)
            .await
            .map_err(|error| format!("{label} schedule: {error}"))?;
        latencies.push(call.elapsed());
    }
    figures.push(("schedule_one_p50_ms", percentile(&latencies, 0.5)));
    figures.push(("schedule_one_p99_ms", percentile(&latencies, 0.99)));
    let total = count + sequential;

    // The "due soon" window, as the consumer loads it.
    let window_end = base + options.window_secs * 1_000;
    let mut latencies = Vec::with_capacity(DUE_REPEATS);
    let mut in_window = 0;
    for _ in 0..DUE_REPEATS {
        let call = Instant::now();
        in_window = store
            .due(&scope, None, window_end, total)
            .await
            .map_err(|error| format!("{label} due: {error}"))?
            .len();
        latencies.push(call.elapsed());
    }
    figures.push(("due_window_timers", as_f64(in_window)));
    figures.push(("due_window_p50_ms", percentile(&latencies, 0.5)));
    figures.push(("due_window_p99_ms", percentile(&latencies, 0.99)));

    // Loading the whole partition page by page.
    let started = Instant::now();
    let mut loaded = store
        .due(&scope, None, i64::MAX, PAGE)
        .await
        .map_err(|error| format!("{label} due: {error}"))?;
    let mut all = Vec::with_capacity(total);
    while let Some((key, at_ms)) = loaded.last().cloned() {
        all.append(&mut loaded);
        loaded = store
            .due(&scope, Some((at_ms, &key)), i64::MAX, PAGE)
            .await
            .map_err(|error| format!("{label} due from a cursor: {error}"))?;
    }
    figures.push(("load_all_per_sec", per_second(all.len(), started.elapsed())));
    if all.len() != total {
        return Err(format!(
            "{label}: loaded {} timers, expected {total}",
            all.len()
        ));
    }

    // Deleting fired timers, many calls in flight; leaves the partition empty.
    let all = Arc::new(all);
    let started = Instant::now();
    in_flight(options.concurrency, all.len(), {
        let (store, scope, all) = (Arc::clone(store), Arc::clone(&scope), Arc::clone(&all));
        move |index| {
            let (store, scope, all) = (Arc::clone(&store), Arc::clone(&scope), Arc::clone(&all));
            async move {
                let Some((key, at_ms)) = all.get(index) else {
                    return Ok(());
                };
                store.unschedule(&scope, key, *at_ms).await.map(|_| ())
            }
        }
    })
    .await?;
    figures.push((
        "unschedule_per_sec",
        per_second(all.len(), started.elapsed()),
    ));
    Ok(figures)
}

/// Runs `call(0..count)` with `concurrency` calls in flight; the latency of each.
async fn in_flight<F, Fut>(concurrency: usize, count: usize, call: F) -> BenchResult<Vec<Duration>>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), prosody::StoreError>> + Send,
{
    let call = Arc::new(call);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (call, next) = (Arc::clone(&call), Arc::clone(&next));
        workers.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= count {
                    return Ok::<_, String>(latencies);
                }
                let started = Instant::now();
                call(index).await.map_err(|error| error.to_string())?;
                latencies.push(started.elapsed());
            }
        });
    }
    let mut latencies = Vec::with_capacity(count);
    while let Some(result) = workers.join_next().await {
        latencies.extend(result.map_err(|error| error.to_string())??);
    }
    Ok(latencies)
}

/// What the firing measurement reports.
struct FiringLag {
    p50_ms: f64,
    p99_ms: f64,
    rss_kib: u64,
}

/// Schedules `options.count` timers over `options.keys` keys, due spread over
/// a few seconds, straight into the store under the scope a consumer will own;
/// then runs a consumer (mock Kafka, PostgreSQL timers) whose `on_timer`
/// records how late each timer ran, sampling the process's RSS while they fire.
async fn firing_lag(
    options: &Options,
    url: &str,
    store: &Arc<dyn TimerStore>,
) -> Option<FiringLag> {
    match measure_firing(options, url, store).await {
        Ok(lag) => Some(lag),
        Err(error) => {
            println!("firing lag: not measured: {error}");
            None
        }
    }
}

struct LagRecorder(Arc<std::sync::Mutex<Vec<f64>>>);

#[derive(Debug)]
struct Never;

impl std::fmt::Display for Never {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("never")
    }
}

impl std::error::Error for Never {}
impl prosody::ClassifyError for Never {}

impl prosody::EventHandler for LagRecorder {
    type Error = Never;

    async fn on_message(
        &self,
        _context: prosody::Context,
        _message: prosody::Message,
    ) -> Result<(), Never> {
        Ok(())
    }

    async fn on_timer(
        &self,
        _context: prosody::Context,
        timer: prosody::Timer,
    ) -> Result<(), Never> {
        let late = SystemTime::now()
            .duration_since(timer.time())
            .unwrap_or_default()
            .as_secs_f64()
            * 1_000.0;
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(late);
        Ok(())
    }
}

async fn measure_firing(
    options: &Options,
    url: &str,
    store: &Arc<dyn TimerStore>,
) -> BenchResult<FiringLag> {
    let suffix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    let topic = format!("bench-timers-{suffix}");
    let group = format!("bench-timers-group-{suffix}");
    let cluster = Cluster::new(None);
    cluster.create_topic(&topic, 1).await?;
    let scope = PartitionScope::new(group.as_str(), topic.as_str(), 0);
    // Due after scheduling (allowing 8k schedules/s) and the consumer's start, spread over 5 s.
    let start = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|error| error.to_string())?
        .as_millis();
    let allowance = 4_000 + i64::try_from(options.count / 8).unwrap_or(i64::MAX);
    let start = i64::try_from(start).map_err(|error| error.to_string())? + allowance;
    let (count, keys) = (options.count, options.keys);
    let scheduling = Arc::clone(store);
    let scope_for_calls = scope.clone();
    println!("firing lag: scheduling {count} timers due over 5 s…");
    in_flight(options.concurrency, count, move |index| {
        let store = Arc::clone(&scheduling);
        let scope = scope_for_calls.clone();
        async move {
            let at = start + i64::try_from(index * 5_000 / count).unwrap_or(0);
            store
                .schedule(&scope, &format!("key-{}", index % keys), at)
                .await
                .map(|_| ())
        }
    })
    .await?;
    let lags = Arc::new(std::sync::Mutex::new(Vec::with_capacity(count)));
    let config = cluster
        .config()?
        .group_id(&group)
        .subscribed_topics([topic.as_str()])
        .set("database_url", url.into())
        .and_then(prosody::ConfigBuilder::build)
        .map_err(|error| error.to_string())?;
    let client = prosody::Client::new(config).map_err(|error| error.to_string())?;
    client
        .subscribe(LagRecorder(Arc::clone(&lags)))
        .map_err(|error| error.to_string())?;
    let started = Instant::now();
    let mut peak_rss = 0;
    loop {
        peak_rss = peak_rss.max(rss_kib().unwrap_or(0));
        let fired = lags
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len();
        if fired >= count {
            break;
        }
        if started.elapsed() > Duration::from_secs(180) {
            return Err(format!("only {fired} of {count} timers fired within 180 s"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client
        .unsubscribe()
        .await
        .map_err(|error| error.to_string())?;
    let mut lags = lags
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    lags.sort_by(f64::total_cmp);
    let at = |fraction: f64| {
        let index = ((lags.len() as f64 - 1.0) * fraction).round() as usize;
        lags.get(index).copied().unwrap_or_default()
    };
    let lag = FiringLag {
        p50_ms: round(at(0.50)),
        p99_ms: round(at(0.99)),
        rss_kib: peak_rss,
    };
    println!(
        "firing lag over {count} PostgreSQL timers (due over 5 s, up to {} per ms): p50 {} ms, p99 {} ms; peak RSS {} KiB",
        count / 5_000 + 1,
        lag.p50_ms,
        lag.p99_ms,
        lag.rss_kib
    );
    Ok(lag)
}

/// The merged table's rows: PostgreSQL against the in-memory store, and the
/// firing lag (its baseline is the timer's due time itself).
fn add_rows(report: &mut Report, memory: &Figures, postgres: &Figures, lag: Option<&FiringLag>) {
    let shown = [
        ("schedule_per_sec", "timers: PostgreSQL schedule, calls/s"),
        (
            "schedule_one_p50_ms",
            "timers: PostgreSQL schedule one at a time, p50 ms",
        ),
        (
            "due_window_p50_ms",
            "timers: PostgreSQL due-soon window query, p50 ms",
        ),
        (
            "load_all_per_sec",
            "timers: PostgreSQL partition load, timers/s",
        ),
        (
            "unschedule_per_sec",
            "timers: PostgreSQL unschedule, calls/s",
        ),
    ];
    for (name, scenario) in shown {
        let find = |figures: &Figures| {
            figures
                .iter()
                .find(|(figure, _)| *figure == name)
                .map(|(_, value)| *value)
        };
        if let (Some(memory), Some(postgres)) = (find(memory), find(postgres)) {
            let ratio = if memory > 0.0 { postgres / memory } else { 0.0 };
            report.row(
                scenario,
                format_figure(postgres),
                format!("memory store {}", format_figure(memory)),
                format!("{ratio:.3}"),
            );
        }
    }
    if let Some(lag) = lag {
        for (name, value) in [("p50", lag.p50_ms), ("p99", lag.p99_ms)] {
            report.row(
                format!("timers: firing lag {name}, PostgreSQL timers through a consumer"),
                format!("{value:.1} ms"),
                "due time",
                "",
            );
        }
    }
}

fn print_table(memory: &Figures, postgres: &Figures) {
    println!();
    println!(
        "{:<28} {:>14} {:>14} {:>12}",
        "", "memory", "postgres", "pg/memory"
    );
    for ((name, memory), (_, postgres)) in memory.iter().zip(postgres) {
        let ratio = if *memory > 0.0 {
            format!("{:.3}", postgres / memory)
        } else {
            String::new()
        };
        println!(
            "{name:<28} {:>14} {:>14} {ratio:>12}",
            format_figure(*memory),
            format_figure(*postgres)
        );
    }
    println!("(per_sec: calls or timers per second; _ms: milliseconds; pg/memory: PostgreSQL over the in-memory baseline)");
}

fn format_figure(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.3}")
    }
}

/// The `quantile` of `latencies`, in milliseconds (nearest rank, as everywhere in the bench).
fn percentile(latencies: &[Duration], quantile: f64) -> f64 {
    let mut millis: Vec<f64> = latencies
        .iter()
        .map(|latency| latency.as_secs_f64() * 1_000.0)
        .collect();
    report::percentile(&mut millis, quantile)
}

fn per_second(count: usize, elapsed: Duration) -> f64 {
    as_f64(count) / elapsed.as_secs_f64().max(f64::EPSILON)
}

fn round(value: f64) -> f64 {
    (value * 1_000.0).round() / 1_000.0
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}
