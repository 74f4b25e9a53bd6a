//! (p) "poison key": 1 partition, 100 keys, one key failing transiently
//! forever (`:pipeline` mode). The other 99 keys' throughput is compared with
//! the same run without failures (target ≥ 0.9), and the committed offset's lag
//! at the end is reported. The same run with `defer: false` shows what blocking
//! retry does: the partition stops once the poison key's messages fill
//! `max_uncommitted`.
//!
//! Each handler awaits 1 ms, so the figure is about scheduling, not the no-op
//! cost of scenario (a). Throughput is the healthy keys' messages over the time
//! from the first handler start to the last healthy message's end.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prosody::{ClassifyError, Client, Context, EventHandler, Message, OptionValue};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};

use crate::cluster::Cluster;
use crate::data::{fill, key, unique, Payload};
use crate::report::{per_second, rate, ratio, round0, round3, Report};
use crate::{as_i64, BenchResult, DEADLINE};

/// Keys of the scenario; `key-0` is the poison key.
const KEYS: usize = 100;
/// Each handler's wait.
const WORK: Duration = Duration::from_millis(1);
/// A run without progress for this long has stalled.
const STALL: Duration = Duration::from_secs(3);
/// How long the end of a run waits for the commit to catch up.
const COMMIT_WAIT: Duration = Duration::from_secs(5);
/// Other keys' throughput, as a share of the run without failures, to aim for.
const TARGET: f64 = 0.9;

#[derive(Debug)]
struct Refused;

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("poison key: downstream refused")
    }
}

impl std::error::Error for Refused {}

impl ClassifyError for Refused {}

struct Progress {
    poisoned: bool,
    healthy: AtomicUsize,
    first: OnceLock<Instant>,
    last: std::sync::Mutex<Option<Instant>>,
}

struct Handler(Arc<Progress>);

impl EventHandler for Handler {
    type Error = Refused;

    async fn on_message(&self, _context: Context, message: Message) -> Result<(), Refused> {
        self.0.first.get_or_init(Instant::now);
        tokio::time::sleep(WORK).await;
        if message.key() == "key-0" {
            return if self.0.poisoned {
                Err(Refused)
            } else {
                Ok(())
            };
        }
        self.0.healthy.fetch_add(1, Ordering::AcqRel);
        *self
            .0
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
        Ok(())
    }
}

/// What one run measured.
struct Run {
    /// Healthy keys' messages handled.
    healthy: usize,
    /// Their throughput, when all of them were handled.
    rate: Option<f64>,
    /// End offset minus the committed offset, once the healthy keys were done.
    lag: Option<i64>,
}

/// (p) one poison key among 100.
pub(crate) async fn poison(
    cluster: &Cluster,
    messages: usize,
    report: &mut Report,
) -> BenchResult<()> {
    let topic = unique("poison");
    // A broker that auto-creates topics may give it more partitions; then the
    // commit lag (read for partition 0) is not reported.
    let partitions = cluster.create_topic(&topic, 1).await?;
    eprintln!("(p) producing {messages} messages over {KEYS} keys…");
    fill(cluster, &topic, messages, KEYS, Payload::Small).await?;
    let healthy = (0..messages).filter(|n| key(*n, KEYS) != "key-0").count();
    eprintln!("(p) no failures…");
    let single = partitions == 1;
    let clean = run(cluster, &topic, messages, healthy, false, true, single).await?;
    // Outside mock mode deferral needs a durable store (PostgreSQL); without
    // one it falls back to in-place retry, which the defer-off run measures.
    let deferral_measurable =
        cluster.is_mock() || std::env::var_os("PROSODY_DATABASE_URL").is_some();
    let deferred = if deferral_measurable {
        eprintln!("(p) key-0 failing forever, defer on…");
        Some(run(cluster, &topic, messages, healthy, true, true, single).await?)
    } else {
        eprintln!("(p) key-0 failing forever, defer on: skipped (outside mock mode deferral needs PROSODY_DATABASE_URL)");
        None
    };
    eprintln!("(p) key-0 failing forever, defer off…");
    let blocking = run(cluster, &topic, messages, healthy, true, false, single).await?;

    let clean_rate = clean
        .rate
        .ok_or("(p) the run without failures did not finish")?;
    report.insert("poison_messages", messages);
    report.insert("poison_clean_msgs_per_sec", round0(clean_rate));
    report.insert("poison_blocking_healthy_handled", blocking.healthy);
    report.insert(
        "poison_blocking_msgs_per_sec",
        round0(blocking.rate.unwrap_or(0.0)),
    );
    let scope = format!(
        "{partitions} partition{}, {KEYS} keys, 1 ms handler, {messages} msgs",
        if single { "" } else { "s" }
    );
    if let Some(deferred) = deferred {
        deferred_rows(report, &scope, clean_rate, &deferred, messages);
    } else {
        report.row(
            format!("(p) other keys, key-0 failing, defer on ({scope})"),
            "skipped".to_owned(),
            "outside mock mode deferral needs PROSODY_DATABASE_URL".to_owned(),
            String::new(),
        );
    }
    report.row(
        "(p) other keys handled, key-0 failing, defer off",
        format!("{} of {healthy}", blocking.healthy),
        "blocking retry stops the partition".to_owned(),
        format!(
            "{:.2}",
            ratio(
                crate::report::as_f64(blocking.healthy),
                crate::report::as_f64(healthy)
            )
        ),
    );
    Ok(())
}

/// The defer-on run's figures and rows, against the run without failures.
fn deferred_rows(
    report: &mut Report,
    scope: &str,
    clean_rate: f64,
    deferred: &Run,
    messages: usize,
) {
    let deferred_rate = deferred.rate.unwrap_or(0.0);
    let share = ratio(deferred_rate, clean_rate);
    report.insert("poison_deferred_msgs_per_sec", round0(deferred_rate));
    report.insert("poison_deferred_vs_clean", round3(share));
    report.insert("poison_deferred_commit_lag", deferred.lag.unwrap_or(-1));
    let verdict = if share >= TARGET { "met" } else { "MISSED" };
    report.row(
        format!("(p) other keys, key-0 failing, defer on ({scope})"),
        per_second(deferred_rate),
        format!("no failures {}", per_second(clean_rate)),
        format!("{share:.2} (target ≥ {TARGET}: {verdict})"),
    );
    report.row(
        "(p) committed offset lag at the end, defer on",
        deferred
            .lag
            .map_or_else(|| "not read".to_owned(), |lag| format!("{lag} msgs")),
        format!("end offset {messages}"),
        "",
    );
}

/// One consumer of `topic` in a new group until the healthy keys are done or
/// progress stalls.
async fn run(
    cluster: &Cluster,
    topic: &str,
    messages: usize,
    healthy: usize,
    poisoned: bool,
    defer: bool,
    read_lag: bool,
) -> BenchResult<Run> {
    let group = unique("poison");
    // `build` reads PROSODY_DATABASE_URL, the store deferral needs outside mock mode.
    let config = cluster
        .config()?
        .group_id(&group)
        .subscribed_topics([topic])
        .set("defer", OptionValue::Bool(defer))
        .map_err(|error| error.to_string())?
        .build()
        .map_err(|error| error.to_string())?;
    let client = Client::new(config).map_err(|error| error.to_string())?;
    let progress = Arc::new(Progress {
        poisoned,
        healthy: AtomicUsize::new(0),
        first: OnceLock::new(),
        last: std::sync::Mutex::new(None),
    });
    client
        .subscribe(Handler(Arc::clone(&progress)))
        .map_err(|error| error.to_string())?;
    let started = Instant::now();
    let (mut seen, mut moved) = (0, Instant::now());
    while progress.healthy.load(Ordering::Acquire) < healthy {
        let now = progress.healthy.load(Ordering::Acquire);
        if now != seen {
            (seen, moved) = (now, Instant::now());
        }
        if (seen > 0 && moved.elapsed() > STALL) || started.elapsed() > DEADLINE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let handled = progress.healthy.load(Ordering::Acquire);
    let finished = handled >= healthy;
    let rate = match (finished, progress.first.get()) {
        (true, Some(first)) => {
            let last = progress
                .last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .unwrap_or_else(Instant::now);
            Some(rate(handled, last.duration_since(*first)))
        }
        _ => None,
    };
    let lag = if finished && read_lag {
        commit_lag(cluster, &group, topic, as_i64(messages)).await
    } else {
        None
    };
    client
        .unsubscribe()
        .await
        .map_err(|error| error.to_string())?;
    Ok(Run {
        healthy: handled,
        rate,
        lag,
    })
}

/// `end` minus the group's committed offset of partition 0, once it stops
/// moving towards `end` (or after [`COMMIT_WAIT`]).
async fn commit_lag(cluster: &Cluster, group: &str, topic: &str, end: i64) -> Option<i64> {
    let mut config = cluster.client_config().ok()?;
    config.set("group.id", group);
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let reader: BaseConsumer = config.create().ok()?;
        let waited = Instant::now();
        loop {
            let mut list = TopicPartitionList::new();
            list.add_partition(&topic, 0);
            let committed = reader
                .committed_offsets(list, Duration::from_secs(5))
                .ok()
                .and_then(|list| match list.find_partition(&topic, 0)?.offset() {
                    Offset::Offset(offset) => Some(offset),
                    _ => None,
                })
                .unwrap_or(0);
            if committed >= end || waited.elapsed() > COMMIT_WAIT {
                return Some(end - committed);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .ok()
    .flatten()
}
