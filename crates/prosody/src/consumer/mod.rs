//! The consumer: a poll thread that feeds per-partition managers.
//!
//! ```text
//! poll thread ──► PartitionManager (one per assigned partition)
//!                   ├─ key queue ──► runner task ──► handler   (one runner per busy key)
//!                   └─ OffsetTracker ──► commit every commit_interval
//! ```
//! The poll thread owns the rdkafka consumer; librdkafka runs rebalance callbacks
//! on it (see [`hooks`]). Runners live on the tokio runtime.

mod dispatch;
mod failure;
mod filter;
mod hooks;
mod offsets;
mod partition;
mod shared;
mod timer_queue;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::Consumer as _;
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use rdkafka::Offset;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

pub use filter::SkipCounts;
pub use partition::PartitionStats;
pub(crate) use timer_queue::TimerQueue;

use crate::config::{Config, Role};
use crate::error::Result;
use crate::handler::EventHandler;
use crate::message::Header;
use crate::probe::{Health, ProbeServer};
use crate::producer::Producer;
use hooks::{commit_async, commit_by, commit_reserve, CommitError, Hooks};
use partition::{Accepted, Fetched};
use shared::{KafkaConsumer, Shared, TopicPartition};

/// Where the consumer is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumerState {
    /// No group id or no topics configured: this client can only produce.
    Unconfigured,
    /// Configured but not subscribed.
    Configured,
    /// Subscribed and consuming.
    Running,
}

/// A running subscription. Dropping it without [`Subscription::shutdown_blocking`]
/// cancels the handlers and stops the poll thread in the background.
pub(crate) struct Subscription {
    shared: Arc<Shared>,
    probe: Option<ProbeServer>,
    /// Carries the stop deadline to the poll thread.
    stop: Option<oneshot::Sender<Instant>>,
    /// The same deadline, for the rebalance callbacks.
    stop_deadline: Arc<OnceLock<Instant>>,
    thread: Option<JoinHandle<()>>,
    /// Disconnected once the poll thread has finished (or panicked).
    finished: crossbeam_channel::Receiver<()>,
}

impl Subscription {
    pub(crate) fn start<H: EventHandler>(
        config: Arc<Config>,
        bootstrap_servers: &str,
        handler: H,
        dead_letters: Option<Arc<Producer>>,
        runtime: Handle,
    ) -> Result<Self> {
        let group_id = config.group_id.clone().unwrap_or_default();
        let mut client = config.client_config(Role::Consumer);
        // Defaults the passthrough may override.
        let mut defaults = vec![
            ("auto.offset.reset", "earliest"),
            ("partition.assignment.strategy", "cooperative-sticky"),
        ];
        if config.mock {
            // The mock cluster holds a group for the session timeout after its last
            // member leaves (44 s by default); a short session keeps restarts quick.
            defaults.push(("session.timeout.ms", "6000"));
        }
        for (key, value) in defaults {
            if !config.kafka.contains_key(key) {
                client.set(key, value);
            }
        }
        // Prosody owns offsets: these are not negotiable through the passthrough.
        client
            .set("bootstrap.servers", bootstrap_servers)
            .set("group.id", &group_id)
            .set("client.id", &config.source_system)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        // librdkafka prefetches up to `queued.min.messages` per partition (100k by
        // default), then re-checks every `fetch.queue.backoff.ms` (1 s by default).
        // A smaller prefetch bounds memory under a large backlog; the short re-check
        // keeps a drained prefetch from stalling the partition for a second.
        //
        // A broker keeps one fetch in flight per connection, and holds it up to
        // `fetch.wait.max.ms` (500 ms by default) when the partitions it asks for
        // have nothing new. A partition whose small prefetch drains meanwhile waits
        // for that fetch to return: with idle and backlogged partitions on one
        // broker, consumption stalled for ~450 ms every ~15k messages (measured on
        // the mock cluster: 170k msg/s with 500 ms, 780k msg/s with 50 ms). The
        // price is one idle fetch per broker every 50 ms.
        let prefetch = (config.max_uncommitted * 16).max(10_000).to_string();
        for (key, value) in [
            ("queued.min.messages", prefetch.as_str()),
            ("fetch.queue.backoff.ms", "10"),
            ("fetch.wait.max.ms", "50"),
        ] {
            if !config.kafka.contains_key(key) {
                client.set(key, value);
            }
        }
        let stop_deadline = Arc::new(OnceLock::new());
        let mut consumer: KafkaConsumer =
            client.create_with_context(Hooks::new(Arc::clone(&stop_deadline)))?;
        let shared = Shared::new(
            Arc::clone(&config),
            Arc::new(handler),
            dead_letters,
            runtime,
        );
        let waker = Arc::clone(&shared);
        consumer.set_nonempty_callback(move || waker.wake());
        let consumer = Arc::new(consumer);
        consumer.context().set_shared(Arc::clone(&shared));
        shared.attach(&consumer);
        let topics: Vec<&str> = config
            .subscribed_topics
            .iter()
            .map(String::as_str)
            .collect();
        consumer.subscribe(&topics)?;
        info!(group_id, topics = ?topics, "subscribed");

        let probe = config.probe_port.and_then(|port| {
            ProbeServer::start(
                port,
                Arc::clone(&shared) as Arc<dyn Health>,
                &shared.runtime,
            )
        });

        let (stop, stopped) = oneshot::channel();
        let (done, finished) = crossbeam_channel::bounded::<()>(0);
        let poll_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("prosody-poll".to_owned())
            .spawn(move || {
                PollLoop::new(consumer, poll_shared, stopped).run();
                drop(done);
            })
            .map_err(|error| {
                crate::Error::Mock(format!("cannot start the poll thread: {error}"))
            })?;
        Ok(Self {
            shared,
            probe,
            stop: Some(stop),
            stop_deadline,
            thread: Some(thread),
            finished,
        })
    }

    pub(crate) fn assigned_partitions(&self) -> usize {
        self.shared.partitions().len()
    }

    pub(crate) fn is_stalled(&self) -> bool {
        self.shared.is_stalled()
    }

    pub(crate) fn skip_counts(&self) -> SkipCounts {
        self.shared.skips.snapshot()
    }

    pub(crate) fn probe_address(&self) -> Option<std::net::SocketAddr> {
        self.probe.as_ref().map(ProbeServer::address)
    }

    pub(crate) fn stats(&self) -> Vec<PartitionStats> {
        let mut stats: Vec<_> = self
            .shared
            .managers()
            .iter()
            .map(|manager| manager.stats())
            .collect();
        stats.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        stats
    }

    /// Graceful stop: see [`PollLoop::shut_down`]. Blocks; call from a blocking context.
    ///
    /// Returns by `shutdown_timeout` after the call, plus at most [`LEAVE_GRACE`]
    /// (and a little slack for the poll thread to notice): every step of the stop
    /// works to one deadline, and a poll thread still busy past it is left behind.
    pub(crate) fn shutdown_blocking(mut self) {
        let deadline = self.stop_deadline();
        if let Some(thread) = self.thread.take() {
            let limit = deadline + LEAVE_GRACE + JOIN_SLACK;
            let left = limit.saturating_duration_since(Instant::now());
            match self.finished.recv_timeout(left) {
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    warn!("the poll thread did not stop within shutdown_timeout; leaving it to finish in the background");
                }
                _ => {
                    if thread.join().is_err() {
                        error!("the poll thread panicked during shutdown");
                    }
                }
            }
        }
        if let Some(probe) = self.probe.take() {
            if Instant::now() < deadline + LEAVE_GRACE {
                probe.shut_down();
            } else {
                // Closes the port without waiting for it.
                drop(probe);
            }
        }
    }

    /// Starts the stop (once): its deadline is now + `shutdown_timeout`.
    fn stop_deadline(&mut self) -> Instant {
        let deadline = *self
            .stop_deadline
            .get_or_init(|| Instant::now() + self.shared.config.shutdown_timeout);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(deadline);
            self.shared.wake();
        }
        deadline
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.stop.is_some() {
            self.shared.cancellation.cancel();
            self.stop_deadline();
        }
    }
}

/// Every this many commit ticks, all commit points are sent, moved or not.
const FULL_COMMIT_EVERY: u64 = 5;

/// How long past the stop deadline the consumer may take to leave the group
/// (`rd_kafka_consumer_close`) before it is left to close in the background.
/// The close sends LeaveGroup; with the coordinator gone it waits out
/// `session.timeout.ms`, so it cannot be given more than a short grace.
const LEAVE_GRACE: Duration = Duration::from_secs(1);

/// How long after [`LEAVE_GRACE`] `unsubscribe` still waits for the poll thread
/// to wind up.
const JOIN_SLACK: Duration = Duration::from_millis(250);

/// Most librdkafka events the poll thread serves before it fills partitions again.
const EVENTS_PER_TURN: usize = 1_000;

struct PollLoop {
    consumer: Arc<KafkaConsumer>,
    shared: Arc<Shared>,
    stopped: oneshot::Receiver<Instant>,
    last_commit: Instant,
    /// Commit ticks so far.
    ticks: u64,
    committed: HashMap<TopicPartition, (i64, String)>,
}

impl PollLoop {
    fn new(
        consumer: Arc<KafkaConsumer>,
        shared: Arc<Shared>,
        stopped: oneshot::Receiver<Instant>,
    ) -> Self {
        Self {
            consumer,
            shared,
            stopped,
            last_commit: Instant::now(),
            ticks: 0,
            committed: HashMap::new(),
        }
    }

    /// Serves librdkafka events (rebalances run here), moves prefetched messages
    /// into partitions with room, commits, and sleeps until woken or `poll_interval`.
    fn run(mut self) {
        let poll_interval = self.shared.config.poll_interval;
        let deadline = loop {
            match self.stopped.try_recv() {
                Ok(deadline) => break deadline,
                Err(oneshot::error::TryRecvError::Closed) => {
                    break Instant::now() + self.shared.config.shutdown_timeout
                }
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            let mut progressed = false;
            // Bounded, so a stream of events cannot starve the partitions below.
            for _ in 0..EVENTS_PER_TURN {
                // poll(0) serves one event; `None` also follows a log, rebalance
                // or commit event, so keep going while the callbacks see events.
                let served = self.consumer.context().served();
                match self.consumer.poll(Duration::ZERO) {
                    Some(Ok(message)) => self.dispatch(&message),
                    Some(Err(error)) => warn!("consume error: {error}"),
                    None if self.consumer.context().served() != served => {}
                    None => break,
                }
                progressed = true;
            }
            for manager in self.shared.managers() {
                progressed |= manager.fill() > 0;
            }
            if self.last_commit.elapsed() >= self.shared.config.commit_interval {
                self.commit_progress();
            }
            if !progressed {
                let _ = self
                    .shared
                    .wakeups
                    .recv_timeout(poll_interval.min(self.until_commit()));
            }
        };
        self.shut_down(deadline);
    }

    fn until_commit(&self) -> Duration {
        self.shared
            .config
            .commit_interval
            .saturating_sub(self.last_commit.elapsed())
    }

    /// A message that arrived on the main queue (fetched before its partition got
    /// its own queue): hand it over, or rewind so it is fetched again.
    fn dispatch(&self, message: &BorrowedMessage<'_>) {
        let topic = message.topic();
        let partition = message.partition();
        let manager = self
            .shared
            .partitions()
            .get(&(Arc::from(topic), partition))
            .cloned();
        let Some(manager) = manager else {
            debug!(
                topic,
                partition, "dropping a message for a partition that is not assigned"
            );
            return;
        };
        let offset = message.offset();
        if manager.accept(fetched(message)) == Accepted::Refused {
            debug!(
                topic,
                partition, offset, "buffer full; rewinding to fetch this message again"
            );
            if let Err(error) =
                self.consumer
                    .seek(topic, partition, Offset::Offset(offset), Duration::ZERO)
            {
                warn!(topic, partition, offset, "cannot rewind: {error}");
            }
        }
    }

    /// Commits partitions whose commit point moved since their last commit, and
    /// every [`FULL_COMMIT_EVERY`] ticks all of them: librdkafka does not report
    /// async commit failures, so re-sending is how a rejected commit gets repaired
    /// (the Java client's auto-commit likewise re-sends unchanged positions).
    fn commit_progress(&mut self) {
        self.last_commit = Instant::now();
        self.ticks += 1;
        if self.ticks % FULL_COMMIT_EVERY == 0 {
            self.committed.clear();
        }
        let managers = self.shared.managers();
        self.committed.retain(|key, _| {
            managers
                .iter()
                .any(|m| (m.topic(), m.partition()) == (&key.0, key.1))
        });
        let moved: Vec<_> = managers
            .into_iter()
            .filter(|manager| {
                let Some(point) = manager.commit_point() else {
                    return false;
                };
                let key = (Arc::clone(manager.topic()), manager.partition());
                self.committed.insert(key, point.clone()).as_ref() != Some(&point)
            })
            .collect();
        if !moved.is_empty() {
            if let Err(error) = commit_async(&self.consumer, &moved) {
                warn!("commit failed; the next full commit sends it again: {error}");
            }
        }
    }

    /// Stops fetching, lets in-flight handlers finish until near `deadline`
    /// (`unsubscribe`'s start + `shutdown_timeout`), cancels what is left,
    /// commits, and leaves the group. Every step that can block works to that one
    /// deadline; only leaving the group gets [`LEAVE_GRACE`] past it:
    ///
    /// | step | bound |
    /// | --- | --- |
    /// | handlers run | until `deadline` − a fifth of the budget (at most 5 s) |
    /// | cancelled handlers stop | until `deadline` − [`commit_reserve`] |
    /// | final commit (retried) | until `deadline`, each answer awaited with the time left |
    /// | rebalance callbacks served meanwhile | their own deadline, never past `deadline` |
    /// | unsubscribe and close (LeaveGroup) | `deadline` + [`LEAVE_GRACE`], then closed in the background |
    fn shut_down(self, deadline: Instant) {
        let budget = self.shared.config.shutdown_timeout;
        let margin = (budget / 5).min(Duration::from_secs(5));
        let cancel_at = deadline.checked_sub(margin).unwrap_or(deadline);
        let cancelled_until = deadline
            .checked_sub(commit_reserve(budget))
            .unwrap_or(deadline);
        let started = Instant::now();
        self.shared.begin_stopping();
        let managers = self.shared.managers();
        info!(
            partitions = managers.len(),
            "unsubscribing: waiting for in-flight handlers"
        );
        if let Ok(assignment) = self.consumer.assignment() {
            let _ = self.consumer.pause(&assignment);
        }
        for manager in &managers {
            manager.drain();
        }
        self.wait_until_idle(&managers, cancel_at);
        if managers.iter().any(|manager| !manager.is_idle()) {
            warn!("shutdown budget nearly spent; cancelling the remaining handlers");
            self.shared.cancellation.cancel();
            self.wait_until_idle(&managers, cancelled_until);
        }
        self.commit_finally(&managers, deadline);
        self.shared.partitions().clear();
        self.consumer.unsubscribe();
        self.shared.cancellation.cancel();
        let Self { consumer, .. } = self;
        close(consumer, deadline + LEAVE_GRACE);
        info!(elapsed = ?started.elapsed(), "unsubscribed");
    }

    /// The last commit before leaving the group, sent again until `deadline` while
    /// the coordinator answers with a retriable error (a group-wide stop meets
    /// `REBALANCE_IN_PROGRESS`). Polls between attempts so the consumer can rejoin;
    /// a partition revoked meanwhile was committed by the revocation and drops out.
    fn commit_finally(&self, managers: &[Arc<partition::PartitionManager>], deadline: Instant) {
        let mut pause = Duration::from_millis(50);
        let mut release = true;
        loop {
            let ours: Vec<_> = if release {
                managers.to_vec()
            } else {
                self.shared.managers()
            };
            match commit_by(&self.consumer, &ours, release, deadline) {
                Ok(()) => {
                    debug!("final commit done");
                    return;
                }
                Err(CommitError::Kafka(error))
                    if hooks::is_retriable(&error) && Instant::now() + pause < deadline =>
                {
                    debug!("final commit failed, retrying: {error}");
                    release = false;
                    let _ = self.consumer.poll(Duration::ZERO);
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                Err(CommitError::Unconfirmed) => {
                    warn!("final commit not confirmed within shutdown_timeout; messages handled since the last confirmed commit may be handled again");
                    return;
                }
                Err(error) => {
                    error!("final commit failed; messages handled since the last commit will be handled again: {error}");
                    return;
                }
            }
        }
    }

    /// Keeps polling (so the group session stays alive) until every manager is idle or `deadline`.
    fn wait_until_idle(&self, managers: &[Arc<partition::PartitionManager>], deadline: Instant) {
        while managers.iter().any(|manager| !manager.is_idle()) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            // Messages fetched now are not accepted: they stay uncommitted and run next time.
            let _ = self.consumer.poll(Duration::ZERO);
            let _ = self
                .shared
                .wakeups
                .recv_timeout(left.min(Duration::from_millis(20)));
        }
    }
}

/// Closes the consumer (leaving the group) by `deadline`, or leaves it closing
/// in the background.
///
/// Dropping the last handle runs `rd_kafka_consumer_close`, which sends
/// LeaveGroup and waits for the group to wind down: with the coordinator gone
/// that is `session.timeout.ms`, and librdkafka has no shorter timeout for it.
/// The drop therefore runs on a thread of its own that is abandoned (not
/// joined) at the deadline; the process may exit before it ends, which is what
/// Kubernetes' SIGKILL would do anyway.
fn close(consumer: Arc<KafkaConsumer>, deadline: Instant) {
    let (closed, is_closed) = crossbeam_channel::bounded::<()>(0);
    let closer = std::thread::Builder::new()
        .name("prosody-close".to_owned())
        .spawn(move || {
            drop(consumer);
            drop(closed);
        });
    if let Err(error) = closer {
        // The closure, and with it the consumer, was dropped (closed) on this thread.
        warn!("could not close the consumer on a thread of its own, closed it in place: {error}");
        return;
    }
    let left = deadline.saturating_duration_since(Instant::now());
    if let Err(crossbeam_channel::RecvTimeoutError::Timeout) = is_closed.recv_timeout(left) {
        warn!("the consumer did not leave the group within shutdown_timeout; it goes on closing in the background, and the group notices this member is gone after session.timeout.ms");
    }
}

/// Copies what the handler needs out of librdkafka's buffer.
pub(crate) fn fetched(message: &BorrowedMessage<'_>) -> Fetched {
    let key = match message.key() {
        None => Err("it has no key"),
        Some(bytes) => std::str::from_utf8(bytes)
            .map(Arc::from)
            .map_err(|_| "its key is not valid UTF-8"),
    };
    let headers: Arc<[Header]> = match message.headers() {
        Some(headers) => headers
            .iter()
            .map(|header| (header.key.to_owned(), header.value.map(<[u8]>::to_vec)))
            .collect(),
        None => Arc::from([]),
    };
    let timestamp = message
        .timestamp()
        .to_millis()
        .and_then(|millis| u64::try_from(millis).ok())
        .map(|millis| UNIX_EPOCH + Duration::from_millis(millis));
    Fetched {
        offset: message.offset(),
        key,
        payload: message.payload().map(<[u8]>::to_vec),
        timestamp: timestamp.filter(|time| *time > SystemTime::UNIX_EPOCH),
        headers,
    }
}
