//! Handlers that queue calls ahead (`EventHandler::queue_ahead`, as the Ruby
//! gem's processor does): the consumer hands them that many calls beyond
//! `max_concurrency`, and a call's timeout and run time count from when the
//! handler starts it (`Context::start`), not from when it was queued.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prosody::{Context, EventHandler, Message};
use serde_json::json;
use support::{lock, Record, TestError};
use tokio::sync::Semaphore;

/// Runs at most `running` calls at once, like a handler thread fed by a
/// queue; each call does what `work` says for the order it started in.
struct Queuing {
    ahead: usize,
    /// Calls given by the consumer and not finished.
    given: AtomicUsize,
    most_given: AtomicUsize,
    running: Semaphore,
    /// Calls started so far (their order).
    started: AtomicUsize,
    /// Per started call: its order, whether it saw its cancellation, how long it ran.
    runs: Mutex<Vec<(usize, bool, Duration)>>,
    work: fn(usize) -> Work,
    /// Permits for the calls that wait to be released.
    release: Semaphore,
}

#[derive(Clone, Copy)]
enum Work {
    Sleep(Duration),
    /// Waits for its cancellation (at most this long).
    UntilCancelled(Duration),
    /// Waits for a permit of `release`.
    UntilReleased,
}

impl Queuing {
    fn new(running: usize, ahead: usize, work: fn(usize) -> Work) -> Arc<Self> {
        Arc::new(Self {
            ahead,
            given: AtomicUsize::new(0),
            most_given: AtomicUsize::new(0),
            running: Semaphore::new(running),
            started: AtomicUsize::new(0),
            runs: Mutex::new(Vec::new()),
            work,
            release: Semaphore::new(0),
        })
    }

    fn most_given(&self) -> usize {
        self.most_given.load(Ordering::SeqCst)
    }

    fn runs(&self) -> Vec<(usize, bool, Duration)> {
        lock(&self.runs).clone()
    }
}

struct Handler(Arc<Queuing>);

impl EventHandler for Handler {
    type Error = TestError;

    fn queue_ahead(&self, _max_concurrency: usize) -> usize {
        self.0.ahead
    }

    async fn on_message(&self, context: Context, _message: Message) -> Result<(), TestError> {
        let queuing = &self.0;
        let given = queuing.given.fetch_add(1, Ordering::SeqCst) + 1;
        queuing.most_given.fetch_max(given, Ordering::SeqCst);
        let _running = queuing.running.acquire().await.expect("never closed");
        context.start();
        let order = queuing.started.fetch_add(1, Ordering::SeqCst);
        let began = Instant::now();
        match (queuing.work)(order) {
            Work::Sleep(time) => tokio::time::sleep(time).await,
            Work::UntilCancelled(limit) => {
                let _ = tokio::time::timeout(limit, context.on_cancel()).await;
            }
            Work::UntilReleased => queuing
                .release
                .acquire()
                .await
                .expect("never closed")
                .forget(),
        }
        lock(&queuing.runs).push((order, context.should_cancel(), began.elapsed()));
        queuing.given.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

fn produce(topic: &str, keys: usize) {
    support::produce(
        topic,
        (0..keys).map(|n| Record::json(&format!("key-{n}"), &json!({ "n": n }))),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_queues_ahead_is_given_that_many_calls_beyond_max_concurrency() {
    let topic = support::topic("queue-ahead", 1);
    produce(&topic, 40);
    let queuing = Queuing::new(2, 3, |_| Work::Sleep(Duration::from_millis(30)));
    let client = support::client(
        support::config(&support::unique("queue-ahead"), &topic).max_concurrency(2),
    );
    client
        .subscribe(Handler(Arc::clone(&queuing)))
        .expect("subscribe");

    support::wait_until("five calls given at once", || queuing.most_given() >= 5).await;
    support::wait_until("every message handled", || queuing.runs().len() >= 40).await;
    client.unsubscribe().await.expect("unsubscribe");

    assert_eq!(
        queuing.most_given(),
        5,
        "max_concurrency 2 plus 3 queued ahead, never more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_calls_timeout_and_run_time_count_from_its_start() {
    let topic = support::topic("queue-ahead-timeout", 1);
    produce(&topic, 3);
    // One call runs at a time, two wait queued. The first runs 250 ms, the
    // second 200 ms after waiting ~250 ms (450 ms after it was given: past the
    // 300 ms timeout counted from then), the third waits ~450 ms, then
    // overruns and must be cancelled 300 ms after its start. Retries succeed.
    let queuing = Queuing::new(1, 2, |order| match order {
        0 => Work::Sleep(Duration::from_millis(250)),
        1 => Work::Sleep(Duration::from_millis(200)),
        2 => Work::UntilCancelled(Duration::from_secs(10)),
        _ => Work::Sleep(Duration::ZERO),
    });
    let client = support::client(support::with(
        support::config(&support::unique("queue-ahead-timeout"), &topic).max_concurrency(1),
        &[("timeout", "300ms".into())],
    ));
    client
        .subscribe(Handler(Arc::clone(&queuing)))
        .expect("subscribe");

    support::wait_until("the three calls and a retry", || queuing.runs().len() >= 4).await;
    let page = client.metrics_text(prosody::MetricsFormat::Classic);
    client.unsubscribe().await.expect("unsubscribe");

    let runs = queuing.runs();
    let by_order = |order: usize| {
        runs.iter()
            .find(|run| run.0 == order)
            .copied()
            .expect("that call ran")
    };
    assert!(
        !by_order(0).1 && !by_order(1).1,
        "calls within their timeout from their start were cancelled: {runs:?}"
    );
    let (_, cancelled, ran) = by_order(2);
    assert!(
        cancelled,
        "the overrunning call was not cancelled: {runs:?}"
    );
    assert!(
        ran >= Duration::from_millis(280) && ran < Duration::from_secs(5),
        "the overrunning call was cancelled {ran:?} after its start, not ~300 ms: {runs:?}"
    );
    // Run times from each start: ~250 + ~200 + ~300 ms (+ a retry's ~0). From
    // when the calls were given, the queued waits (~250 and ~450 ms) would count too.
    let handler_seconds = support::metric_sum(&page, "prosody_handler_duration_seconds_sum", &[]);
    assert!(
        (0.7..1.1).contains(&handler_seconds),
        "handler run time {handler_seconds} s: queued time counted as running?"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_calls_count_as_running_only_once_started() {
    let topic = support::topic("queue-ahead-gauge", 1);
    produce(&topic, 3);
    let queuing = Queuing::new(1, 2, |order| match order {
        0 => Work::UntilReleased,
        _ => Work::Sleep(Duration::ZERO),
    });
    let client = support::client(
        support::config(&support::unique("queue-ahead-gauge"), &topic).max_concurrency(1),
    );
    client
        .subscribe(Handler(Arc::clone(&queuing)))
        .expect("subscribe");
    let in_flight = || {
        support::metric_sum(
            &client.metrics_text(prosody::MetricsFormat::Classic),
            "prosody_handlers_in_flight",
            &[],
        )
    };

    // The first call holds its slot until released; the other two wait queued.
    support::wait_until("three calls given", || queuing.most_given() >= 3).await;
    let while_queued = in_flight();
    queuing.release.add_permits(1);
    support::wait_until("every message handled", || queuing.runs().len() >= 3).await;
    support::wait_until("no call running", || in_flight() == 0.0).await;
    client.unsubscribe().await.expect("unsubscribe");

    assert_eq!(while_queued, 1.0, "queued calls counted as running");
}
