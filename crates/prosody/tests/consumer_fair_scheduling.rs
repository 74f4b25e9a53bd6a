//! Fair scheduling across the partitions of a process on the mock cluster:
//! when every handler slot (`max_concurrency`) is busy, the waiting key with
//! the least recent handler time runs next, and retries get at most
//! `scheduler_failure_share` of the execution time while fresh messages wait.
//!
//! Both tests read only what handlers observe (start and end times), so they
//! also run against a plain FIFO semaphore, which fails them.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prosody::{ClassifyError, Context, EventHandler, Message, OptionValue};
use serde_json::json;
use support::{client, config, lock, produce, topic, unique, wait_until, Record};

/// One handler call as the handler saw it.
#[derive(Debug, Clone)]
struct Call {
    key: String,
    partition: i32,
    offset: i64,
    start: Instant,
    end: Instant,
}

#[derive(Debug, thiserror::Error)]
#[error("downstream unavailable")]
struct Unavailable;

impl ClassifyError for Unavailable {}

/// Sleeps `work` per call, records it, and fails every call of keys starting with `fail`.
#[derive(Clone)]
struct Recording {
    calls: Arc<Mutex<Vec<Call>>>,
    work: Duration,
}

impl Recording {
    fn new(work: Duration) -> Self {
        Self {
            calls: Arc::default(),
            work,
        }
    }

    fn calls(&self) -> Vec<Call> {
        lock(&self.calls).clone()
    }

    /// Distinct messages that succeeded or failed at least once, by key prefix.
    fn handled(&self, prefix: &str) -> usize {
        lock(&self.calls)
            .iter()
            .filter(|call| call.key.starts_with(prefix))
            .map(|call| (call.partition, call.offset))
            .collect::<BTreeSet<_>>()
            .len()
    }
}

impl EventHandler for Recording {
    type Error = Unavailable;

    async fn on_message(&self, _context: Context, message: Message) -> Result<(), Unavailable> {
        let start = Instant::now();
        tokio::time::sleep(self.work).await;
        let key = message.key().to_owned();
        lock(&self.calls).push(Call {
            key: key.clone(),
            partition: message.partition(),
            offset: message.offset(),
            start,
            end: Instant::now(),
        });
        if key.starts_with("fail") {
            Err(Unavailable)
        } else {
            Ok(())
        }
    }
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let last = sorted.len().saturating_sub(1);
    // Rounded index into a short list.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let index = ((last as f64) * fraction).round() as usize;
    sorted.get(index).copied().unwrap_or_default()
}

const HOT_PARTITIONS: i32 = 8;
const COLD_KEYS: i32 = 4;
const HOT_PER_PARTITION: usize = 50;
const COLD_PER_KEY: usize = 10;

/// A hot key with 10x the traffic of four cold keys together, spread over
/// eight partitions (so it has eight runners waiting for a slot at once),
/// against two handler slots. FIFO gives the hot key 8 of every 11 slots and
/// makes each cold message wait for ~8 hot calls; the scheduler gives the hot
/// key about the share of one key (a fifth here) and cold keys wait for ~1.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_key_gets_no_more_than_its_share_while_cold_keys_wait() {
    let topic = topic("fair-hot", HOT_PARTITIONS + COLD_KEYS);
    let work = Duration::from_millis(20);
    // Cold keys first, so they are fetched no later than the hot key's backlog.
    let cold = (0..COLD_KEYS).flat_map(|k| {
        (0..COLD_PER_KEY).map(move |n| {
            Record::json(&format!("cold-{k}"), &json!({ "n": n })).in_partition(HOT_PARTITIONS + k)
        })
    });
    let hot = (0..HOT_PER_PARTITION).flat_map(|n| {
        (0..HOT_PARTITIONS).map(move |p| Record::json("hot", &json!({ "n": n })).in_partition(p))
    });
    produce(&topic, cold.chain(hot).collect::<Vec<_>>());

    let handler = Recording::new(work);
    let client = client(config(&unique("fair-hot"), &topic).max_concurrency(2));
    client.subscribe(handler.clone()).expect("subscribe");
    let cold_total = usize::try_from(COLD_KEYS).unwrap() * COLD_PER_KEY;
    wait_until("every cold message handled", || {
        handler.handled("cold") == cold_total
    })
    .await;
    client.unsubscribe().await.expect("unsubscribe");

    let calls = handler.calls();
    // From the first cold call on, every cold key always has its next message
    // queued: the gap between two of its calls is its wait for a slot.
    let mut by_key: BTreeMap<&str, Vec<&Call>> = BTreeMap::new();
    for call in calls.iter().filter(|call| call.key.starts_with("cold")) {
        by_key.entry(&call.key).or_default().push(call);
    }
    let mut waits = Vec::new();
    let mut hot_between = Vec::new();
    for runs in by_key.values_mut() {
        runs.sort_by_key(|call| call.start);
        for pair in runs.windows(2) {
            let (previous, next) = (pair[0], pair[1]);
            waits.push(next.start.saturating_duration_since(previous.end));
            hot_between.push(
                calls
                    .iter()
                    .filter(|call| {
                        call.key == "hot" && call.start > previous.end && call.start < next.start
                    })
                    .count(),
            );
        }
    }
    waits.sort();
    hot_between.sort_unstable();
    let (p50, p99) = (percentile(&waits, 0.5), percentile(&waits, 0.99));
    // The hot key's share of the slots while cold messages were waiting.
    let first_cold = by_key.values().map(|runs| runs[0].start).min().unwrap();
    let last_cold = by_key
        .values()
        .map(|runs| runs[runs.len() - 1].start)
        .max()
        .unwrap();
    let during: Vec<_> = calls
        .iter()
        .filter(|call| call.start >= first_cold && call.start < last_cold)
        .collect();
    let hot_during = during.iter().filter(|call| call.key == "hot").count();
    #[allow(clippy::cast_precision_loss)]
    let hot_share = hot_during as f64 / during.len().max(1) as f64;
    eprintln!(
        "cold waits: p50 {p50:?} p99 {p99:?} (work {work:?}); hot calls between two cold calls: \
         p50 {} p99 {}; hot share while cold keys waited: {hot_share:.2} ({hot_during}/{})",
        hot_between[hot_between.len() / 2],
        percentile_count(&hot_between, 0.99),
        during.len()
    );
    // Fair: a fifth (5 keys); FIFO: 8 of 11 runners.
    assert!(
        hot_share <= 0.4,
        "the hot key took {hot_share:.2} of the slots while cold keys waited"
    );
    assert!(
        percentile_count(&hot_between, 0.99) <= 3,
        "cold messages waited behind hot calls: {hot_between:?}"
    );
    // Fair: about 2 calls' time (4 keys ahead on 2 slots); FIFO: about 5.5.
    assert!(
        p99 < work * 4,
        "cold p99 wait {p99:?} with {work:?} handlers on 2 slots"
    );
}

fn percentile_count(sorted: &[usize], fraction: f64) -> usize {
    let last = sorted.len().saturating_sub(1);
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let index = ((last as f64) * fraction).round() as usize;
    sorted.get(index).copied().unwrap_or_default()
}

const FAILING_KEYS: usize = 60;
const FRESH_KEYS: usize = 60;
const FRESH_PER_KEY: usize = 4;

/// A retry storm: 60 keys fail forever with a 1 ms backoff while 60 other
/// keys have fresh messages waiting, against two slots. With FIFO the two
/// crowds share the slots about evenly; the scheduler holds retries to
/// `scheduler_failure_share` (0.3) of the handler time while fresh work waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_storm_takes_no_more_than_the_failure_share_while_fresh_work_waits() {
    let topic = topic("fair-storm", 8);
    let work = Duration::from_millis(5);
    let failing = (0..FAILING_KEYS).map(|k| {
        Record::json(&format!("fail-{k}"), &json!({ "k": k }))
            .in_partition(i32::try_from(k % 4).unwrap())
    });
    let fresh = (0..FRESH_PER_KEY).flat_map(|n| {
        (0..FRESH_KEYS).map(move |k| {
            Record::json(&format!("ok-{k}"), &json!({ "n": n }))
                .in_partition(4 + i32::try_from(k % 4).unwrap())
        })
    });
    produce(&topic, failing.chain(fresh).collect::<Vec<_>>());

    let handler = Recording::new(work);
    let client = client(
        config(&unique("fair-storm"), &topic)
            .max_concurrency(2)
            .set("max_uncommitted", OptionValue::Int(500))
            .and_then(|b| b.set("retry_base", OptionValue::from("1ms")))
            .and_then(|b| b.set("max_retry_delay", OptionValue::from("2ms")))
            .expect("options"),
    );
    client.subscribe(handler.clone()).expect("subscribe");
    let fresh_total = FRESH_KEYS * FRESH_PER_KEY;
    wait_until("every fresh message handled", || {
        handler.handled("ok") == fresh_total
    })
    .await;
    client.unsubscribe().await.expect("unsubscribe");

    let calls = handler.calls();
    // While fresh messages waited: from the first retry to the last fresh start.
    let mut seen = BTreeSet::new();
    let mut retry_time = Duration::ZERO;
    let mut fresh_time = Duration::ZERO;
    let mut sorted: Vec<_> = calls.iter().collect();
    sorted.sort_by_key(|call| call.start);
    let last_fresh = sorted
        .iter()
        .filter(|call| call.key.starts_with("ok"))
        .map(|call| call.start)
        .max()
        .unwrap();
    let mut storm_began = None;
    for call in &sorted {
        let retry = !seen.insert((call.partition, call.offset));
        if retry && storm_began.is_none() {
            storm_began = Some(call.start);
        }
        if storm_began.is_none() || call.start >= last_fresh {
            continue;
        }
        let ran = call.end - call.start;
        if retry {
            retry_time += ran;
        } else {
            fresh_time += ran;
        }
    }
    let share = retry_time.as_secs_f64() / (retry_time + fresh_time).as_secs_f64();
    eprintln!(
        "retries took {share:.2} of the handler time while fresh work waited \
         (retries {retry_time:?}, fresh {fresh_time:?})"
    );
    assert!(
        share <= 0.4,
        "retries took {share:.2} of the handler time while fresh messages waited"
    );
}
