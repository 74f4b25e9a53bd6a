//! One assigned partition: its key queues, its buffer and its offsets.
//!
//! - `runner`: one task per busy key drains the key's queue in order, so a key
//!   never runs twice at once while different keys run side by side;
//! - `settle`: runs one message or timer to a conclusion (retries, dead
//!   letters, skips);
//! - `backpressure`: moves prefetched messages into the key queues while the
//!   buffer has room, and stops reading the partition's queue when it is full.
//!
//! A runner holds a permit from the consumer-wide semaphore only while a handler
//! runs, which is what bounds concurrency to `max_concurrency`.

mod backpressure;
mod runner;
mod settle;

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use futures_util::task::AtomicWaker;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::defer::DeferQueue;
use super::offsets::{Admission, OffsetTracker};
use super::scheduler::{clock, KeyHasher};
use super::shared::Shared;
use super::timer_queue::TimerQueue;
use crate::events::{Event, EventKind};
use crate::message::Header;
use crate::metrics::{PartitionLabels, PartitionMetrics};
use crate::timers::PartitionScope;
use backpressure::{Backpressure, Prefetch};
use runner::{Kick, Starting};

/// A fetched message, copied out of librdkafka's buffer, payload not yet decoded.
#[derive(Debug, Clone)]
pub(crate) struct Fetched {
    pub(crate) offset: i64,
    pub(crate) key: Result<Arc<str>, UnusableKey>,
    pub(crate) payload: Option<Vec<u8>>,
    pub(crate) timestamp: Option<SystemTime>,
    pub(crate) headers: Arc<[Header]>,
}

impl Fetched {
    /// The key as log lines show it: an unusable key hex-escaped, so two bad
    /// keys can be told apart.
    pub(crate) fn shown_key(&self) -> &str {
        match &self.key {
            Ok(key) => key,
            Err(unusable) => &unusable.shown,
        }
    }
}

/// Why a record's key cannot be used (the message then fails as bad input).
#[derive(Debug, Clone)]
pub(crate) struct UnusableKey {
    /// E.g. "its key is not valid UTF-8".
    pub(crate) problem: &'static str,
    /// The raw key with non-ASCII bytes escaped (`\xff`), or `<none>`.
    pub(crate) shown: String,
}

/// What waits in a key's queue: a fetched message, a due timer (ms since the
/// epoch), or the key's deferred messages, due for a retry.
#[derive(Debug)]
enum Work {
    Message(Fetched),
    Timer(i64),
    Deferred,
}

/// Whether a message was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Accepted {
    /// Taken (queued, or counted as done).
    Taken,
    /// Not taken: the buffer is full or the partition is stopping. The caller
    /// must make sure it is fetched again.
    Refused,
}

/// A snapshot of one partition's buffer, for tests, benchmarks and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionStats {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: i32,
    /// Messages accepted and not finished right now.
    pub buffered: usize,
    /// The most `buffered` has ever been.
    pub max_buffered: usize,
    /// Whether the buffer is full, so the consumer is not reading the
    /// partition's prefetched messages.
    pub full: bool,
    /// Times the buffer filled up and the consumer stopped reading the partition.
    pub fills: u64,
    /// Times a full buffer drained by a quarter and the consumer read on.
    pub drains: u64,
    /// Messages whose handler finished (or which were skipped as done).
    pub finished: u64,
    /// Keys with deferred messages (failed transiently, set aside for a retry
    /// so that the partition moves on; `:pipeline` mode).
    pub deferred_keys: usize,
    /// Deferred messages, waiting for their key's retry.
    pub deferred_messages: usize,
}

struct State {
    /// A key is present exactly while its runner is alive (or waits in `starting`).
    /// Hashed like the scheduler's keys (looked up twice per message).
    queues: HashMap<Arc<str>, VecDeque<Work>, BuildHasherDefault<KeyHasher>>,
    /// Keys that got work while idle, for the driver to start (see `runner`).
    starting: VecDeque<Starting>,
    /// Whether the partition's driver task is alive.
    driving: bool,
    offsets: OffsetTracker,
    buffer: Backpressure,
    released: bool,
    finished: u64,
    /// The commit point the periodic commit last sent.
    sent: Option<(i64, String)>,
    /// When a message last finished here (or the partition was assigned), in
    /// seconds of the scheduler's coarse clock: read per message, and a stall
    /// is measured in seconds.
    last_progress: f64,
}

pub(crate) struct PartitionManager {
    topic: Arc<str>,
    partition: i32,
    shared: Arc<Shared>,
    state: Mutex<State>,
    /// Stop starting queued messages (graceful shutdown).
    draining: CancellationToken,
    /// Stop everything: handlers see `should_cancel`.
    cancellation: CancellationToken,
    /// `cancellation`, shared by the calls' contexts (see [`crate::Context`]).
    calls_cancellation: Arc<CancellationToken>,
    /// Counts busy keys' runners.
    runners: TaskTracker,
    /// Wakes the driver task that runs the runners (see `runner`).
    driver: AtomicWaker,
    /// librdkafka's prefetch queue for this partition (see `backpressure`).
    queue: Mutex<Prefetch>,
    /// This partition's timers, when a timer store is configured.
    timers: Option<Arc<TimerQueue>>,
    /// This partition's deferred messages, when deferral is on.
    defer: Option<Arc<DeferQueue>>,
    /// Set by the partition's first own-message skip, which is explained at INFO.
    own_skip_explained: AtomicBool,
    /// This partition's series in the client's metrics.
    metrics: PartitionMetrics,
}

impl PartitionManager {
    pub(crate) fn new(
        shared: Arc<Shared>,
        topic: Arc<str>,
        partition: i32,
        offsets: OffsetTracker,
    ) -> Arc<Self> {
        let cancellation = shared.cancellation.child_token();
        let timers = shared.store.as_ref().map(|store| {
            let scope = PartitionScope::new(
                shared.config.group_id.clone().unwrap_or_default(),
                Arc::clone(&topic),
                partition,
            );
            TimerQueue::new(Arc::clone(store), scope, Arc::clone(&shared.metrics))
        });
        let defer = shared.deferred.as_ref().map(|store| {
            let scope = PartitionScope::new(
                shared.config.group_id.clone().unwrap_or_default(),
                Arc::clone(&topic),
                partition,
            );
            DeferQueue::new(Arc::clone(store), scope, shared.defer_settings)
        });
        let manager = Arc::new(Self {
            metrics: shared.metrics.partition(&topic, partition),
            topic,
            partition,
            timers,
            defer,
            own_skip_explained: AtomicBool::new(false),
            shared,
            state: Mutex::new(State {
                queues: HashMap::default(),
                starting: VecDeque::new(),
                driving: false,
                offsets,
                buffer: Backpressure::default(),
                released: false,
                finished: 0,
                sent: None,
                last_progress: clock(),
            }),
            draining: cancellation.child_token(),
            calls_cancellation: Arc::new(cancellation.clone()),
            cancellation,
            runners: TaskTracker::new(),
            driver: AtomicWaker::new(),
            queue: Mutex::new(Prefetch::default()),
        });
        // Calls waiting for a slot look at `draining` only when woken (see
        // `Scheduler::acquire`): one watcher per partition wakes them.
        let draining = manager.draining.clone();
        let shared = Arc::downgrade(&manager.shared);
        manager.shared.runtime.spawn(async move {
            draining.cancelled().await;
            if let Some(shared) = shared.upgrade() {
                shared.scheduler.wake_all();
            }
        });
        if let Some(timers) = &manager.timers {
            let run =
                Arc::clone(timers).run(Arc::downgrade(&manager), manager.cancellation.clone());
            manager.shared.runtime.spawn(run);
        }
        if let Some(defer) = &manager.defer {
            let run = Arc::clone(defer).run(Arc::downgrade(&manager), manager.cancellation.clone());
            manager.shared.runtime.spawn(run);
        }
        manager
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind; keep going.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether new work may still be queued: not handed back, not draining.
    fn is_open(&self, state: &State) -> bool {
        !state.released && !self.draining.is_cancelled()
    }

    /// Takes a fetched message into its key's queue, starting a runner if the key was idle.
    pub(crate) fn accept(self: &Arc<Self>, fetched: Fetched) -> Accepted {
        let (accepted, kick) = {
            let mut state = self.state();
            let open = self.is_open(&state);
            let max = self.shared.config.max_uncommitted;
            self.accept_locked(&mut state, open, max, fetched)
        };
        self.kick(kick);
        accepted
    }

    /// [`accept`](Self::accept) under the state lock; `open` is [`is_open`](Self::is_open),
    /// read once per batch, and a message is refused at `limit` buffered. The
    /// caller kicks the driver after letting go of the lock.
    fn accept_locked(
        &self,
        state: &mut State,
        open: bool,
        limit: usize,
        fetched: Fetched,
    ) -> (Accepted, Kick) {
        let max = self.shared.config.max_uncommitted;
        if !open || state.offsets.pending() >= limit {
            return (Accepted::Refused, Kick::None);
        }
        if state.offsets.admit(fetched.offset) == Admission::AlreadyDone {
            debug!(topic = %self.topic, partition = self.partition, offset = fetched.offset, "skipping offset finished before the last rebalance");
            state.finished += 1;
            return (Accepted::Taken, Kick::None);
        }
        // Messages without a usable key queue under "" and take the failure path there.
        let key = fetched
            .key
            .as_ref()
            .map_or_else(|_| Arc::from(""), Arc::clone);
        let buffered = state.offsets.pending();
        let offset = fetched.offset;
        self.shared.metrics.emit(EventKind::MessageReceived, || {
            Event::new(EventKind::MessageReceived, Arc::clone(&self.topic)).at(
                self.partition,
                Some(offset),
                Some(&key),
            )
        });
        let kick = self.enqueue(state, key, Work::Message(fetched));
        state.buffer.accepted(buffered, max);
        self.metrics.received();
        (Accepted::Taken, kick)
    }

    /// Queues a due timer behind its key's other work (timers do not count
    /// against `max_uncommitted`: they hold no offset).
    pub(crate) fn accept_timer(self: &Arc<Self>, key: Arc<str>, at: i64) {
        let kick = {
            let mut state = self.state();
            if self.is_open(&state) {
                self.enqueue(&mut state, key, Work::Timer(at))
            } else {
                Kick::None
            }
        };
        self.kick(kick);
    }

    /// True when the partition has unfinished work and finished nothing for `threshold`.
    pub(crate) fn is_stalled(&self, threshold: Duration) -> bool {
        let state = self.state();
        state.offsets.pending() > 0 && clock() - state.last_progress >= threshold.as_secs_f64()
    }

    /// Stops starting queued messages; in-flight handlers keep running.
    pub(crate) fn drain(&self) {
        self.draining.cancel();
    }

    /// Cancels in-flight handlers and stops starting queued messages.
    pub(crate) fn cancel(&self) {
        self.cancellation.cancel();
    }

    /// Waits until `deadline` for runners to exit; false if some are still running.
    /// An absolute deadline, so waiting on several partitions in turn shares one budget.
    pub(crate) async fn wait_idle(&self, deadline: Instant) -> bool {
        self.runners.close();
        tokio::time::timeout_at(deadline.into(), self.runners.wait())
            .await
            .is_ok()
    }

    /// Whether no handler of this partition is running.
    pub(crate) fn is_idle(&self) -> bool {
        self.runners.is_empty()
    }

    /// Marks the partition as handed back: nothing is read or queued from now on.
    /// Returns the offset to commit and its metadata.
    pub(crate) fn release(&self) -> Option<(i64, String)> {
        // The queue holds the consumer alive; let it go with the partition.
        drop(
            self.queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .queue
                .take(),
        );
        let mut state = self.state();
        state.released = true;
        let abandoned = self.runners.len();
        if abandoned > 0 {
            warn!(topic = %self.topic, partition = self.partition, abandoned, "handlers ignored cancellation; abandoning them");
        }
        state.offsets.commit_point()
    }

    /// The offset to commit now and its metadata.
    pub(crate) fn commit_point(&self) -> Option<(i64, String)> {
        self.state().offsets.commit_point()
    }

    /// The commit point for the periodic commit, remembered as sent; with
    /// `only_moved`, `None` when it has not moved since it was last sent.
    pub(crate) fn periodic_commit_point(&self, only_moved: bool) -> Option<(i64, String)> {
        let mut state = self.state();
        let point = state.offsets.commit_point()?;
        if only_moved && state.sent.as_ref() == Some(&point) {
            return None;
        }
        state.sent = Some(point.clone());
        Some(point)
    }

    pub(crate) fn topic(&self) -> &Arc<str> {
        &self.topic
    }

    pub(crate) fn partition(&self) -> i32 {
        self.partition
    }

    /// This partition's labels in the client's metrics.
    pub(crate) fn labels(&self) -> &PartitionLabels {
        &self.metrics.labels
    }

    pub(crate) fn stats(&self) -> PartitionStats {
        let (deferred_keys, deferred_messages) =
            self.defer.as_ref().map_or((0, 0), |defer| defer.counts());
        let state = self.state();
        PartitionStats {
            topic: self.topic.to_string(),
            partition: self.partition,
            buffered: state.offsets.pending(),
            max_buffered: state.buffer.max_buffered,
            full: state.buffer.full,
            fills: state.buffer.fills,
            drains: state.buffer.drains,
            finished: state.finished,
            deferred_keys,
            deferred_messages,
        }
    }
}
