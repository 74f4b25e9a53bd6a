//! The consumer: a poll thread that feeds per-partition managers.
//!
//! ```text
//! poll thread ──► PartitionManager (one per assigned partition)
//!                   ├─ key queue ──► runner task ──► handler   (one runner per busy key)
//!                   └─ OffsetTracker ──► commit every commit_interval
//! ```
//! The poll thread owns the rdkafka consumer; librdkafka runs rebalance callbacks
//! on it (see [`hooks`]). Runners live on the tokio runtime.

mod commit;
pub(crate) mod defer;
mod dispatch;
mod failure;
mod filter;
mod hooks;
mod monopoly;
mod offsets;
mod partition;
mod prefetch_queue;
pub(crate) mod scheduler;
mod settings;
mod shared;
mod stall_watch;
mod timer_queue;

use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::Consumer as _;
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::Offset;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

pub use filter::SkipCounts;
pub use partition::PartitionStats;
pub use scheduler::QosStats;

use crate::config::Config;
use crate::error::Result;
use crate::handler::EventHandler;
use crate::message::Header;
use crate::metrics::Metrics;
use crate::probe::{Health, ProbeServer};
use crate::producer::Producer;
use commit::{commit_finally, commit_reserve, PeriodicCommit};
use hooks::Hooks;
use partition::{Accepted, Fetched, UnusableKey};
use prefetch_queue::RawRecord;
use shared::{KafkaConsumer, Shared};

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
        metrics: Arc<Metrics>,
        runtime: Handle,
    ) -> Result<Self> {
        let group_id = config.group_id.clone().unwrap_or_default();
        let partitions = settings::subscribed_partitions(&config, bootstrap_servers);
        let client = settings::consumer_config(&config, bootstrap_servers, partitions);
        let stop_deadline = Arc::new(OnceLock::new());
        let mut consumer: KafkaConsumer =
            client.create_with_context(Hooks::new(Arc::clone(&stop_deadline)))?;
        let shared = Shared::new(
            Arc::clone(&config),
            Arc::new(handler),
            dead_letters,
            metrics,
            runtime,
            bootstrap_servers,
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
        info!(
            group_id,
            topics = ?topics,
            prefetch_per_partition = client.get("queued.min.messages").unwrap_or_default(),
            "subscribed"
        );

        let probe = config.probe_port.and_then(|port| {
            ProbeServer::start(
                port,
                Arc::clone(&shared) as Arc<dyn Health>,
                &shared.runtime,
            )
        });

        stall_watch::start(&shared);
        let (stop, stopped) = oneshot::channel();
        let (done, finished) = crossbeam_channel::bounded::<()>(0);
        let poll_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("prosody-poll".to_owned())
            .spawn(move || {
                PollLoop::new(consumer, poll_shared, stopped).run();
                drop(done);
            })
            .map_err(|source| crate::Error::Thread {
                name: "prosody-poll",
                source,
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

    pub(crate) fn refresh_metrics(&self) {
        self.shared.refresh_metrics();
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

    pub(crate) fn qos_stats(&self) -> QosStats {
        self.shared.scheduler.stats()
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
    commits: PeriodicCommit,
}

impl PollLoop {
    fn new(
        consumer: Arc<KafkaConsumer>,
        shared: Arc<Shared>,
        stopped: oneshot::Receiver<Instant>,
    ) -> Self {
        let commits = PeriodicCommit::new(shared.config.commit_interval);
        Self {
            consumer,
            shared,
            stopped,
            commits,
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
            self.commits.tick(&self.consumer, &self.shared);
            if !progressed {
                let _ = self
                    .shared
                    .wakeups
                    .recv_timeout(poll_interval.min(self.commits.until_due()));
            }
        };
        self.shut_down(deadline);
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
        commit_finally(&self.consumer, &self.shared, &managers, deadline);
        self.shared.partitions().clear();
        self.consumer.unsubscribe();
        self.shared.cancellation.cancel();
        let Self { consumer, .. } = self;
        close(consumer, deadline + LEAVE_GRACE);
        info!(elapsed = ?started.elapsed(), "unsubscribed");
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

/// The header list of a message without headers.
pub(crate) fn no_headers() -> &'static Arc<[Header]> {
    static EMPTY: OnceLock<Arc<[Header]>> = OnceLock::new();
    EMPTY.get_or_init(|| Arc::from([]))
}

/// Whether a record's `headers` are, in order, those of `list`.
fn same_headers<'a>(
    headers: impl ExactSizeIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    list: &[Header],
) -> bool {
    headers.len() == list.len()
        && headers.zip(list).all(|((key, value), (name, copied))| {
            key == name.as_bytes() && value == copied.as_deref()
        })
}

/// Copies what the handler needs out of librdkafka's buffer. The record is
/// read directly rather than through rdkafka's accessors, whose header reader
/// panics on a name that is not UTF-8.
pub(crate) fn fetched(message: &BorrowedMessage<'_>) -> Fetched {
    fetched_after(&RawRecord::borrowed(message), &mut Arc::clone(no_headers()))
}

/// [`fetched`], for a record read after one whose headers were `previous`:
/// equal headers share that list, which then stays `previous`. Messages from
/// one producer usually carry the same headers (its `source-system`, say), so
/// a batch copies them once rather than once per message (the Ruby side
/// likewise builds one Hash for a run of equal headers).
pub(crate) fn fetched_after(message: &RawRecord<'_>, previous: &mut Arc<[Header]>) -> Fetched {
    let key = match message.key() {
        None => Err(UnusableKey {
            problem: "it has no key",
            shown: "<none>".to_owned(),
        }),
        Some(bytes) => std::str::from_utf8(bytes)
            .map(Arc::from)
            .map_err(|_| UnusableKey {
                problem: "its key is not valid UTF-8",
                shown: bytes.escape_ascii().to_string(),
            }),
    };
    let headers: Arc<[Header]> = match message.headers() {
        Some(headers) if same_headers(headers.clone(), previous) => Arc::clone(previous),
        Some(headers) => {
            let copied: Arc<[Header]> = headers
                .map(|(key, value)| {
                    (
                        String::from_utf8_lossy(key).into_owned(),
                        value.map(<[u8]>::to_vec),
                    )
                })
                .collect();
            *previous = Arc::clone(&copied);
            copied
        }
        // One shared empty list rather than an allocation per message.
        None => Arc::clone(no_headers()),
    };
    let timestamp = message
        .timestamp_millis()
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
