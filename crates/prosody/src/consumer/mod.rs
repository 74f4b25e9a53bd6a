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
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{CommitMode, Consumer as _};
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
use hooks::{commit, Hooks};
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

/// A running subscription. Dropping it without [`Subscription::shutdown`] stops
/// the poll thread without the graceful wait.
pub(crate) struct Subscription {
    shared: Arc<Shared>,
    probe: Option<ProbeServer>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
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
        let mut consumer: KafkaConsumer = client.create_with_context(Hooks::new())?;
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
        let poll_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("prosody-poll".to_owned())
            .spawn(move || PollLoop::new(consumer, poll_shared, stopped).run())
            .map_err(|error| {
                crate::Error::Mock(format!("cannot start the poll thread: {error}"))
            })?;
        Ok(Self {
            shared,
            probe,
            stop: Some(stop),
            thread: Some(thread),
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
    pub(crate) fn shutdown_blocking(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
            self.shared.wake();
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!("the poll thread panicked during shutdown");
            }
        }
        if let Some(probe) = self.probe.take() {
            probe.shut_down();
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            self.shared.cancellation.cancel();
            let _ = stop.send(());
            self.shared.wake();
        }
    }
}

/// Every this many commit ticks, all commit points are sent, moved or not.
const FULL_COMMIT_EVERY: u64 = 5;

/// The final commit may retry at least this long, even when handlers used up
/// `shutdown_timeout`.
const FINAL_COMMIT_FLOOR: Duration = Duration::from_secs(5);

/// Most librdkafka events the poll thread serves before it fills partitions again.
const EVENTS_PER_TURN: usize = 1_000;

struct PollLoop {
    consumer: Arc<KafkaConsumer>,
    shared: Arc<Shared>,
    stopped: oneshot::Receiver<()>,
    last_commit: Instant,
    /// Commit ticks so far.
    ticks: u64,
    committed: HashMap<TopicPartition, (i64, String)>,
}

impl PollLoop {
    fn new(
        consumer: Arc<KafkaConsumer>,
        shared: Arc<Shared>,
        stopped: oneshot::Receiver<()>,
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
        while let Err(oneshot::error::TryRecvError::Empty) = self.stopped.try_recv() {
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
        }
        self.shut_down();
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
            if let Err(error) = commit(&self.consumer, &moved, false, CommitMode::Async) {
                warn!("commit failed; the next full commit sends it again: {error}");
            }
        }
    }

    /// Stops fetching, lets in-flight handlers finish until near the end of
    /// `shutdown_timeout`, cancels what is left, commits, and leaves the group.
    fn shut_down(self) {
        let budget = self.shared.config.shutdown_timeout;
        let cancel_at = budget.saturating_sub((budget / 5).min(Duration::from_secs(5)));
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
        self.wait_until_idle(&managers, started + cancel_at);
        if managers.iter().any(|manager| !manager.is_idle()) {
            warn!("shutdown budget nearly spent; cancelling the remaining handlers");
            self.shared.cancellation.cancel();
            self.wait_until_idle(&managers, started + budget);
        }
        self.commit_finally(
            &managers,
            (started + budget).max(Instant::now() + FINAL_COMMIT_FLOOR),
        );
        self.shared.partitions().clear();
        self.consumer.unsubscribe();
        self.shared.cancellation.cancel();
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
            match commit(&self.consumer, &ours, release, CommitMode::Sync) {
                Ok(()) => {
                    debug!("final commit done");
                    return;
                }
                Err(error) if hooks::is_retriable(&error) && Instant::now() + pause < deadline => {
                    debug!("final commit failed, retrying: {error}");
                    release = false;
                    let _ = self.consumer.poll(Duration::ZERO);
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(500));
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
        while managers.iter().any(|manager| !manager.is_idle()) && Instant::now() < deadline {
            // Messages fetched now are not accepted: they stay uncommitted and run next time.
            let _ = self.consumer.poll(Duration::ZERO);
            let _ = self.shared.wakeups.recv_timeout(Duration::from_millis(20));
        }
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
