//! Benchmarks, every figure against a baseline measured in the same run:
//!
//! - (a) Prosody with a no-op handler vs a plain rdkafka `BaseConsumer` loop on
//!   the same messages (`consume.rs`);
//! - (c) a handler awaiting 10 ms at `max_concurrency` 32 and 128 vs the ideal
//!   and a sequential loop (`consume.rs`);
//! - (d) latency from `send` to handler start at a steady 1k msg/s vs a plain
//!   `FutureProducer` → `BaseConsumer` (`latency.rs`);
//! - (e) `Client::send` throughput vs a plain idempotent `FutureProducer`
//!   (`producer.rs`);
//! - (f) peak RSS of a consumer facing a 500k-message backlog vs the same process
//!   idle, and vs the backlog's size (`memory.rs`);
//! - (p) one key failing forever among 100 on one partition: the other keys'
//!   throughput vs the same run without failures, with deferred retry
//!   (`poison.rs`).
//!
//! Scenario (b) and Ruby's versions of (c), (d) and (e) live in
//! `bench/ruby_bench.rb`, which reads this program's JSON for the baselines.
//! Every suite writes one flat JSON object with distinct keys plus its table
//! rows under `table`; `bench/merge_results.rb` merges them.
//!
//! ```text
//! cargo run --release -p prosody-bench -- [--only acdefp] [--messages N]
//!     [--producer-messages N] [--backlog N] [--memory-seconds N] [--bootstrap HOST:PORT]
//!     [--json out.json]
//! cargo run --release -p prosody-bench -- timers …        # the timer stores (timers.rs)
//! cargo run --release -p prosody-bench -- loopback [CMD…] # the real-broker path on the mock
//! ```
//!
//! Everything runs on the in-process mock cluster unless `--bootstrap` or
//! `PROSODY_BENCH_BOOTSTRAP` names a broker (`cluster.rs`).

use std::process::ExitCode;
use std::time::Duration;

mod allocations;
mod cluster;
mod consume;
mod data;
mod hot_key;
mod latency;
mod memory;
mod poison;
mod producer;
mod report;
mod timers;

use cluster::Cluster;
use report::Report;

type BenchResult<T> = Result<T, String>;

#[global_allocator]
static ALLOCATOR: allocations::CountingAllocator = allocations::CountingAllocator;

/// The mock cluster's fetch cost grows with partition length; stay below this per partition.
const MAX_PER_PARTITION: usize = 20_000;
/// Longest a single measurement may take.
const DEADLINE: Duration = Duration::from_secs(300);
/// Every scenario this program runs, by letter.
const SCENARIOS: &str = "acdefp";

struct Options {
    /// Messages of scenario (a).
    messages: usize,
    /// Messages of each run of scenario (e).
    producer_messages: usize,
    /// Messages of scenario (f)'s backlog.
    backlog: usize,
    /// How long scenario (f) consumes.
    memory_seconds: u64,
    /// Messages of scenario (p).
    poison_messages: usize,
    bootstrap: Option<String>,
    json: Option<String>,
    /// Scenarios to run, by letter.
    scenarios: String,
}

const USAGE: &str = "usage: prosody-bench [--only LETTERS (default acdefp)] \
[--messages N (a; 100000)] [--producer-messages N (e; 50000)] [--backlog N (f; 500000)] \
[--memory-seconds N (f; 12)] [--poison-messages N (p; 20000)] \
[--bootstrap HOST:PORT (default: $PROSODY_BENCH_BOOTSTRAP, else the mock)] [--json out.json]
       prosody-bench timers --help
       prosody-bench hot-key --help
       prosody-bench loopback [COMMAND ARGS…]   (default COMMAND: this program)
       prosody-bench create-topics TOPIC:PARTITIONS…
       prosody-bench fill TOPIC COUNT        ((a)'s kind of messages, on $PROSODY_BENCH_BOOTSTRAP)
       prosody-bench noop-once TOPIC COUNT   (the core's no-op consumer once; prints JSON)";

fn parse_args(args: &[String]) -> BenchResult<Options> {
    let mut options = Options {
        messages: 100_000,
        producer_messages: 50_000,
        backlog: 500_000,
        memory_seconds: memory::CONSUME_SECS,
        poison_messages: 20_000,
        bootstrap: None,
        json: None,
        scenarios: SCENARIOS.to_owned(),
    };
    fn count(flag: &str, value: Option<&String>) -> BenchResult<usize> {
        let value = value.ok_or(format!("{flag} needs a number"))?;
        match value.replace('_', "").parse() {
            Ok(0) | Err(_) => Err(format!("{flag}: `{value}` is not a positive number")),
            Ok(count) => Ok(count),
        }
    }
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--messages" => options.messages = count(arg, args.next())?,
            "--producer-messages" => options.producer_messages = count(arg, args.next())?,
            "--backlog" => options.backlog = count(arg, args.next())?,
            "--poison-messages" => options.poison_messages = count(arg, args.next())?,
            "--memory-seconds" => {
                options.memory_seconds = u64::try_from(count(arg, args.next())?)
                    .map_err(|_| "--memory-seconds: too large".to_owned())?;
            }
            "--bootstrap" => {
                options.bootstrap = Some(args.next().ok_or("--bootstrap needs HOST:PORT")?.clone());
            }
            "--json" => options.json = Some(args.next().ok_or("--json needs a path")?.clone()),
            "--only" => {
                options.scenarios = args.next().ok_or("--only needs letters")?.clone();
                if options.scenarios.is_empty()
                    || !options.scenarios.chars().all(|c| SCENARIOS.contains(c))
                {
                    return Err(format!("--only takes letters of {SCENARIOS}"));
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
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
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, rest) = match args.split_first() {
        Some((first, rest)) => (first.as_str(), rest),
        None => ("", &args[..]),
    };
    let result = match command {
        "timers" => return timers::main(rest.iter().cloned()),
        "hot-key" => return hot_key::main(rest),
        "loopback" => return cluster::loopback(rest.to_vec()),
        "create-topics" => return cluster::create_topics_command(rest),
        // Internal: the Ruby bench's (b) data, and the core's runs interleaved with its own.
        "fill" => return consume::fill_command(rest),
        "noop-once" => return consume::noop_once_command(rest),
        // Internal: the consumer process of scenario (f).
        "memory-child" => runtime().and_then(|runtime| runtime.block_on(memory::child(rest))),
        _ => parse_args(&args)
            .and_then(|options| runtime().and_then(|runtime| runtime.block_on(run(&options)))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("prosody-bench: {error}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> BenchResult<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start tokio: {error}"))
}

async fn run(options: &Options) -> BenchResult<()> {
    let cluster = Cluster::new(options.bootstrap.clone());
    let mut report = Report::default();
    report.insert("core_cluster", cluster.describe());
    let scenarios = &options.scenarios;
    if scenarios.contains('a') {
        consume::noop(&cluster, options.messages, &mut report).await?;
    }
    if scenarios.contains('c') {
        consume::io(&cluster, &mut report).await?;
    }
    if scenarios.contains('d') {
        latency::latency(&cluster, &mut report).await?;
    }
    if scenarios.contains('e') {
        producer::producer(&cluster, options.producer_messages, &mut report).await?;
    }
    if scenarios.contains('f') {
        memory::memory(
            &cluster,
            options.backlog,
            options.memory_seconds,
            &mut report,
        )
        .await?;
    }
    if scenarios.contains('p') {
        poison::poison(&cluster, options.poison_messages, &mut report).await?;
    }
    report.print(&format!("Rust core ({})", cluster.describe()));
    if let Some(path) = &options.json {
        report.write_json(path)?;
        eprintln!("wrote {path}");
    }
    Ok(())
}

fn as_i64(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
