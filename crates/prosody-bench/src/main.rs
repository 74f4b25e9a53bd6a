//! Benchmarks on the in-process mock cluster, every figure against a baseline
//! measured in the same run:
//!
//! - (a) a plain rdkafka `BaseConsumer` loop vs Prosody with a no-op handler, on
//!   the same messages: what the per-key machinery costs (target: core/plain ≥ 0.7);
//! - (c) a handler awaiting 10 ms, 1 partition, 256 keys, at `max_concurrency` 32
//!   and 128: vs the ideal (`max_concurrency` / 10 ms) and vs a sequential loop
//!   doing the same waits.
//!
//! Scenario (b), a no-op Ruby handler, lives in `bench/ruby_bench.rb`; it reads
//! this program's JSON (`core_noop_msgs_per_sec`). Both write one flat JSON object
//! with distinct keys, so merging them is a plain object merge.
//!
//! ```text
//! cargo run --release -p prosody-bench -- [--messages N] [--json out.json]
//! ```
//!
//! `prosody-bench timers` benchmarks the timer stores instead (see `timers.rs`).
//!
//! Throughput is messages over the time from the first handler start to the last
//! handler end, so joining the consumer group is not counted; scenario (a) reports
//! the median of three interleaved runs.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prosody::{Client, Config, Context, EventHandler, Message, OptionValue};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use serde_json::{json, Value};

mod timers;

/// The mock cluster's fetch cost grows with partition length; stay below this per partition.
const MAX_PER_PARTITION: usize = 20_000;
/// Distinct keys in the no-op scenario.
const NOOP_KEYS: usize = 1_000;
/// Distinct keys in the 10 ms scenario.
const IO_KEYS: usize = 256;
/// The 10 ms scenario's wait.
const WAIT: Duration = Duration::from_millis(10);
/// Messages the sequential 10 ms baseline handles (about 2 s).
const SEQUENTIAL_MESSAGES: usize = 200;
/// Longest a single measurement may take.
const DEADLINE: Duration = Duration::from_secs(300);
/// Runs of scenario (a); the median is reported.
const RUNS: usize = 3;
/// Core throughput over plain rdkafka that scenario (a) aims for.
const TARGET_CORE_VS_PLAIN: f64 = 0.7;

type BenchResult<T> = Result<T, String>;

struct Options {
    messages: usize,
    json: Option<String>,
    /// Scenarios to run: "a", "c" or both.
    scenarios: String,
}

fn parse_args() -> BenchResult<Options> {
    let mut options = Options {
        messages: 100_000,
        json: None,
        scenarios: "ac".to_owned(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--messages" => {
                let value = args.next().ok_or("--messages needs a number")?;
                options.messages = value
                    .replace('_', "")
                    .parse()
                    .map_err(|_| format!("--messages: `{value}` is not a number"))?;
                if options.messages == 0 {
                    return Err("--messages must be at least 1".to_owned());
                }
            }
            "--json" => options.json = Some(args.next().ok_or("--json needs a path")?),
            "--only" => {
                options.scenarios = args.next().ok_or("--only needs a or c")?;
                if options.scenarios.is_empty()
                    || !options.scenarios.chars().all(|c| "ac".contains(c))
                {
                    return Err("--only takes a, c or ac".to_owned());
                }
            }
            "-h" | "--help" => {
                println!("usage: prosody-bench [--messages N (default 100000)] [--json out.json] [--only a|c]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument `{other}` (try --help)")),
        }
    }
    Ok(options)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if std::env::args().nth(1).as_deref() == Some("timers") {
        return timers::main(std::env::args().skip(2));
    }
    let result = parse_args().and_then(|options| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|error| format!("cannot start tokio: {error}"))?;
        runtime.block_on(run(&options))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("prosody-bench: {error}");
            ExitCode::FAILURE
        }
    }
}

/// One row of the printed table.
struct Row {
    label: String,
    throughput: String,
    ratio: String,
}

impl Row {
    fn figure(label: impl Into<String>, per_second: f64) -> Self {
        Self {
            label: label.into(),
            throughput: format!("{per_second:.0} msg/s"),
            ratio: String::new(),
        }
    }

    fn ratio(label: impl Into<String>, ratio: String) -> Self {
        Self {
            label: format!("  {}", label.into()),
            throughput: String::new(),
            ratio,
        }
    }
}

async fn run(options: &Options) -> BenchResult<()> {
    let mut results: BTreeMap<String, Value> = BTreeMap::new();
    let mut rows = Vec::new();

    if options.scenarios.contains('a') {
        noop_scenario(options.messages, &mut results, &mut rows).await?;
    }
    if options.scenarios.contains('c') {
        io_scenario(&mut results, &mut rows).await?;
    }

    let width = rows
        .iter()
        .map(|row| row.label.chars().count())
        .max()
        .unwrap_or(0);
    println!(
        "{:<width$}  {:>14}  {:>8}",
        "scenario (Rust core)", "throughput", "ratio"
    );
    for row in &rows {
        println!(
            "{:<width$}  {:>14}  {:>8}",
            row.label, row.throughput, row.ratio
        );
    }
    if let Some(path) = &options.json {
        let text = serde_json::to_string_pretty(&results).map_err(|error| error.to_string())?;
        std::fs::write(path, text + "\n")
            .map_err(|error| format!("cannot write {path}: {error}"))?;
        eprintln!("wrote {path}");
    }
    Ok(())
}

/// (a) plain rdkafka vs Prosody with a no-op handler, same messages.
async fn noop_scenario(
    messages: usize,
    results: &mut BTreeMap<String, Value>,
    rows: &mut Vec<Row>,
) -> BenchResult<()> {
    let partitions = messages.div_ceil(MAX_PER_PARTITION).max(1);
    let topic = unique("noop");
    create_topic(&topic, partitions)?;
    eprintln!("producing {messages} messages over {partitions} partitions…");
    produce(&topic, messages, NOOP_KEYS).await?;
    let mut plain = Vec::new();
    let mut plain_json = Vec::new();
    let mut core = Vec::new();
    // Interleaved runs, each by a new group over the same messages; the median is reported.
    for run in 1..=RUNS {
        eprintln!("(a) run {run}/{RUNS}: plain rdkafka consumer…");
        plain.push(plain_rdkafka(&topic, messages, false).await?);
        eprintln!("(a) run {run}/{RUNS}: plain rdkafka consumer decoding JSON…");
        plain_json.push(plain_rdkafka(&topic, messages, true).await?);
        eprintln!("(a) run {run}/{RUNS}: Prosody, no-op handler…");
        core.push(prosody_rate(&topic, messages, None, &[]).await?);
    }
    let (plain, plain_json, core) = (median(plain), median(plain_json), median(core));
    let core_vs_plain = core / plain;
    results.insert("messages".into(), json!(messages));
    results.insert("noop_partitions".into(), json!(partitions));
    results.insert("plain_rdkafka_msgs_per_sec".into(), json!(round0(plain)));
    results.insert("core_noop_msgs_per_sec".into(), json!(round0(core)));
    results.insert("core_vs_plain_ratio".into(), json!(round3(core_vs_plain)));
    results.insert(
        "plain_rdkafka_json_msgs_per_sec".into(),
        json!(round0(plain_json)),
    );
    results.insert(
        "core_vs_plain_json_ratio".into(),
        json!(round3(core / plain_json)),
    );
    let scope =
        format!("{messages} msgs, {partitions} partitions, {NOOP_KEYS} keys, median of {RUNS}");
    rows.push(Row::figure(
        format!("(a) plain rdkafka BaseConsumer loop ({scope})"),
        plain,
    ));
    rows.push(Row::figure(
        "(a) plain loop that also decodes each payload as JSON",
        plain_json,
    ));
    rows.push(Row::figure(
        "(a) Prosody core, no-op handler (same messages)",
        core,
    ));
    let verdict = if core_vs_plain >= TARGET_CORE_VS_PLAIN {
        "met"
    } else {
        "MISSED"
    };
    rows.push(Row::ratio(
        format!("core / plain (target ≥ {TARGET_CORE_VS_PLAIN}: {verdict})"),
        format!("{core_vs_plain:.2}"),
    ));
    rows.push(Row::ratio(
        "core / plain decoding JSON",
        format!("{:.2}", core / plain_json),
    ));

    Ok(())
}

/// (c) a handler awaiting 10 ms, 1 partition, 256 keys.
async fn io_scenario(
    results: &mut BTreeMap<String, Value>,
    rows: &mut Vec<Row>,
) -> BenchResult<()> {
    eprintln!("(c) sequential baseline…");
    let sequential = sequential_rate(SEQUENTIAL_MESSAGES).await;
    results.insert(
        "sequential_10ms_msgs_per_sec".into(),
        json!(round1(sequential)),
    );
    rows.push(Row::figure(
        format!("(c) sequential loop awaiting 10 ms per message ({SEQUENTIAL_MESSAGES} msgs)"),
        sequential,
    ));
    // max_uncommitted (default 64) also caps how many messages of one partition can
    // be in flight, so 128 is measured with the default and with room for 128.
    let cases: [(usize, Option<usize>); 3] = [(32, None), (128, None), (128, Some(256))];
    for (concurrency, max_uncommitted) in cases {
        let count = (concurrency * 100).min(MAX_PER_PARTITION);
        let topic = unique(&format!("io{concurrency}"));
        create_topic(&topic, 1)?;
        produce(&topic, count, IO_KEYS).await?;
        let mut extra = vec![("max_concurrency", OptionValue::Int(as_i64(concurrency)))];
        if let Some(max) = max_uncommitted {
            extra.push(("max_uncommitted", OptionValue::Int(as_i64(max))));
        }
        let shown =
            max_uncommitted.map_or_else(String::new, |max| format!(", max_uncommitted {max}"));
        eprintln!("(c) Prosody, max_concurrency {concurrency}{shown}…");
        let rate = prosody_rate(&topic, count, Some(WAIT), &extra).await?;
        #[allow(clippy::cast_precision_loss)] // small counts
        let ideal = concurrency as f64 / WAIT.as_secs_f64();
        let label = match max_uncommitted {
            Some(max) => format!("c{concurrency}_max_uncommitted{max}"),
            None => format!("c{concurrency}"),
        };
        results.insert(format!("io_10ms_{label}_msgs_per_sec"), json!(round0(rate)));
        results.insert(
            format!("io_10ms_{label}_vs_ideal"),
            json!(round3(rate / ideal)),
        );
        results.insert(
            format!("io_10ms_{label}_vs_sequential"),
            json!(round1(rate / sequential)),
        );
        rows.push(Row::figure(
            format!("(c) Prosody, 10 ms handler, 1 partition, {IO_KEYS} keys, max_concurrency {concurrency}{shown} ({count} msgs)"),
            rate,
        ));
        rows.push(Row::ratio(
            format!("vs ideal {ideal:.0} msg/s"),
            format!("{:.2}", rate / ideal),
        ));
        rows.push(Row::ratio(
            "vs sequential loop",
            format!("{:.1}x", rate / sequential),
        ));
    }
    Ok(())
}

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    format!("bench-{name}-{}-{nanos}", std::process::id())
}

fn create_topic(topic: &str, partitions: usize) -> BenchResult<()> {
    let partitions = i32::try_from(partitions).map_err(|_| "too many partitions".to_owned())?;
    prosody::mock::create_topic(topic, partitions).map_err(|error| error.to_string())?;
    Ok(())
}

fn bootstrap_servers() -> BenchResult<String> {
    prosody::mock::bootstrap_servers().map_err(|error| error.to_string())
}

/// Produces `count` small JSON messages over `keys` keys with a raw producer.
async fn produce(topic: &str, count: usize, keys: usize) -> BenchResult<()> {
    let topic = topic.to_owned();
    let bootstrap = bootstrap_servers()?;
    tokio::task::spawn_blocking(move || {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("linger.ms", "5")
            .create()
            .map_err(|error| format!("producer: {error}"))?;
        for n in 0..count {
            let key = format!("key-{}", n % keys);
            let payload = format!("{{\"n\":{n}}}");
            let mut record = BaseRecord::to(&topic).key(&key).payload(&payload);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                        producer.poll(Duration::from_millis(5));
                        record = returned;
                    }
                    Err((error, _)) => return Err(format!("produce: {error}")),
                }
            }
        }
        producer
            .flush(DEADLINE)
            .map_err(|error| format!("flush: {error}"))
    })
    .await
    .map_err(|error| error.to_string())?
}

/// A plain consumer loop: poll and count; with `decode`, also decode each payload as JSON.
async fn plain_rdkafka(topic: &str, count: usize, decode: bool) -> BenchResult<f64> {
    let topic = topic.to_owned();
    let bootstrap = bootstrap_servers()?;
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", unique("plain"))
            .set("auto.offset.reset", "earliest")
            .create()
            .map_err(|error| format!("consumer: {error}"))?;
        consumer
            .subscribe(&[&topic])
            .map_err(|error| error.to_string())?;
        let started = Instant::now();
        let mut first = None;
        let mut seen = 0;
        while seen < count {
            if started.elapsed() > DEADLINE {
                return Err(format!(
                    "plain consumer: only {seen} of {count} messages in {DEADLINE:?}"
                ));
            }
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    first.get_or_insert_with(Instant::now);
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
        Ok(rate(count, first.elapsed()))
    })
    .await
    .map_err(|error| error.to_string())?
}

/// Counts handler calls, optionally awaiting `work` in each.
struct Counting {
    target: usize,
    work: Option<Duration>,
    handled: AtomicUsize,
    first: OnceLock<Instant>,
    last: OnceLock<Instant>,
}

struct CountingHandler(Arc<Counting>);

impl EventHandler for CountingHandler {
    type Error = std::convert::Infallible;

    async fn on_message(&self, _context: Context, _message: Message) -> Result<(), Self::Error> {
        self.0.first.get_or_init(Instant::now);
        if let Some(work) = self.0.work {
            tokio::time::sleep(work).await;
        }
        if self.0.handled.fetch_add(1, Ordering::AcqRel) + 1 == self.0.target {
            let _ = self.0.last.set(Instant::now());
        }
        Ok(())
    }
}

/// Prosody consuming `count` messages of `topic`, each handler awaiting `work`.
async fn prosody_rate(
    topic: &str,
    count: usize,
    work: Option<Duration>,
    extra: &[(&str, OptionValue)],
) -> BenchResult<f64> {
    let mut builder = Config::builder()
        .mock(true)
        .group_id(&unique("prosody"))
        .subscribed_topics([topic])
        .set("probe_port", OptionValue::Bool(false))
        .map_err(|error| error.to_string())?;
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
            break Ok(rate(count, last.duration_since(*first)));
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

#[allow(clippy::cast_precision_loss)] // message counts are far below 2^52
fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(f64::EPSILON)
}

fn median(mut rates: Vec<f64>) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates.get(rates.len() / 2).copied().unwrap_or(0.0)
}

fn as_i64(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn round0(value: f64) -> f64 {
    value.round()
}

fn round1(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}
