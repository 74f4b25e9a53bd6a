//! One assigned partition: per-key FIFO queues, backpressure and offset tracking.
//!
//! Each key with work gets one runner task that drains the key's queue in order,
//! so a key never runs twice at once while different keys run side by side. A
//! runner holds a permit from the consumer-wide semaphore only while a handler
//! runs, which is what bounds concurrency to `max_concurrency`.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, warn};

use rdkafka::consumer::base_consumer::PartitionQueue;

use super::dispatch::Outcome;
use super::hooks::Hooks;
use super::offsets::{Admission, OffsetTracker};
use super::shared::Shared;
use crate::handler::Context;
use crate::message::{Header, Message};

/// A fetched message, copied out of librdkafka's buffer, payload not yet decoded.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub(crate) offset: i64,
    pub(crate) key: Result<Arc<str>, &'static str>,
    pub(crate) payload: Option<Vec<u8>>,
    pub(crate) timestamp: Option<SystemTime>,
    pub(crate) headers: Arc<[Header]>,
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
    /// Whether consumption is paused because the buffer is full.
    pub paused: bool,
    /// Times consumption paused.
    pub pauses: u64,
    /// Times consumption resumed.
    pub resumes: u64,
    /// Messages whose handler finished (or which were skipped as done).
    pub finished: u64,
}

struct State {
    /// A key is present exactly while its runner task is alive.
    queues: HashMap<Arc<str>, VecDeque<Fetched>>,
    offsets: OffsetTracker,
    paused: bool,
    released: bool,
    max_buffered: usize,
    pauses: u64,
    resumes: u64,
    finished: u64,
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
    runners: TaskTracker,
    /// librdkafka's prefetch queue for this partition; read only by the poll thread.
    queue: Mutex<Option<PartitionQueue<Hooks>>>,
}

impl PartitionManager {
    pub(crate) fn new(
        shared: Arc<Shared>,
        topic: Arc<str>,
        partition: i32,
        offsets: OffsetTracker,
    ) -> Arc<Self> {
        let cancellation = shared.cancellation.child_token();
        Arc::new(Self {
            topic,
            partition,
            shared,
            state: Mutex::new(State {
                queues: HashMap::new(),
                offsets,
                paused: false,
                released: false,
                max_buffered: 0,
                pauses: 0,
                resumes: 0,
                finished: 0,
            }),
            draining: cancellation.child_token(),
            cancellation,
            runners: TaskTracker::new(),
            queue: Mutex::new(None),
        })
    }

    /// Gives the manager its own prefetch queue (see [`fill`](Self::fill)).
    pub(crate) fn attach_queue(&self, queue: PartitionQueue<Hooks>) {
        *self
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(queue);
    }

    /// Moves messages from librdkafka's prefetch queue into key queues while the
    /// buffer has room. Returns how many were taken.
    ///
    /// This is how backpressure works without pausing the partition in Kafka:
    /// librdkafka keeps prefetching (bounded by `queued.min.messages` and
    /// `queued.max.messages.kbytes`) and Prosody stops reading when its buffer is
    /// full, so a drained buffer refills at memory speed instead of waiting for a
    /// new fetch round trip.
    pub(crate) fn fill(self: &Arc<Self>) -> usize {
        let queue = self
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(queue) = queue.as_ref() else {
            return 0;
        };
        let mut taken = 0;
        while self.has_room() {
            match queue.poll(Duration::ZERO) {
                None => break,
                Some(Err(error)) => {
                    warn!(topic = %self.topic, partition = self.partition, "fetch error: {error}")
                }
                Some(Ok(message)) => {
                    if self.accept(super::fetched(&message)) == Accepted::Taken {
                        taken += 1;
                    }
                }
            }
        }
        taken
    }

    fn has_room(&self) -> bool {
        let state = self.state();
        !state.released
            && !self.draining.is_cancelled()
            && state.offsets.pending() < self.shared.config.max_uncommitted
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind; keep going.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a fetched message into its key's queue, starting a runner if the key was idle.
    pub(crate) fn accept(self: &Arc<Self>, fetched: Fetched) -> Accepted {
        let max = self.shared.config.max_uncommitted;
        let mut state = self.state();
        if state.released || self.draining.is_cancelled() || state.offsets.pending() >= max {
            return Accepted::Refused;
        }
        if state.offsets.admit(fetched.offset) == Admission::AlreadyDone {
            debug!(topic = %self.topic, partition = self.partition, offset = fetched.offset, "skipping offset finished before the last rebalance");
            state.finished += 1;
            return Accepted::Taken;
        }
        let key = match &fetched.key {
            Ok(key) => Arc::clone(key),
            Err(problem) => {
                error!(topic = %self.topic, partition = self.partition, offset = fetched.offset, "skipping message: {problem}");
                state.offsets.finish(fetched.offset);
                state.finished += 1;
                return Accepted::Taken;
            }
        };
        let buffered = state.offsets.pending();
        state.max_buffered = state.max_buffered.max(buffered);
        match state.queues.entry(Arc::clone(&key)) {
            Entry::Occupied(mut queue) => queue.get_mut().push_back(fetched),
            Entry::Vacant(slot) => {
                slot.insert(VecDeque::new());
                let manager = Arc::clone(self);
                self.runners
                    .spawn_on(manager.run_key(key, fetched), &self.shared.runtime);
            }
        }
        if buffered >= max && !state.paused {
            state.paused = true;
            state.pauses += 1;
        }
        Accepted::Taken
    }

    /// Drains one key's queue in order; exits when it is empty or the partition stops.
    async fn run_key(self: Arc<Self>, key: Arc<str>, first: Fetched) {
        let mut next = first;
        loop {
            let permit = tokio::select! {
                biased;
                () = self.draining.cancelled() => return,
                permit = Arc::clone(&self.shared.permits).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let offset = next.offset;
            let done = self.process(&key, next).await;
            drop(permit);
            let mut state = self.state();
            if done {
                state.offsets.finish(offset);
                state.finished += 1;
                self.resume_if_drained(&mut state);
            }
            let queued = if done && !self.draining.is_cancelled() {
                state.queues.get_mut(&key).and_then(VecDeque::pop_front)
            } else {
                None
            };
            match queued {
                Some(fetched) => next = fetched,
                None => {
                    state.queues.remove(&key);
                    return;
                }
            }
        }
    }

    /// Runs the handler on one message; true when the message counts as done.
    async fn process(&self, key: &Arc<str>, fetched: Fetched) -> bool {
        let offset = fetched.offset;
        let payload = match fetched.payload.as_deref().map(serde_json::from_slice) {
            Some(Ok(payload)) => payload,
            Some(Err(problem)) => {
                error!(topic = %self.topic, partition = self.partition, offset, key = %key, "skipping message: payload is not JSON: {problem}");
                return true;
            }
            None => {
                error!(topic = %self.topic, partition = self.partition, offset, key = %key, "skipping message: it has no payload");
                return true;
            }
        };
        let message = Message {
            topic: Arc::clone(&self.topic),
            partition: self.partition,
            offset,
            key: Arc::clone(key),
            timestamp: fetched.timestamp,
            payload,
            headers: fetched.headers,
        };
        let context = Context::new(self.cancellation.child_token());
        match self.shared.handler.on_message(context, message).await {
            Outcome::Succeeded => true,
            Outcome::Failed { .. } if self.cancellation.is_cancelled() => {
                debug!(topic = %self.topic, partition = self.partition, offset, key = %key, "handler stopped by cancellation; the message will run again");
                false
            }
            Outcome::Failed { permanent, error } => {
                // Until retries land, a failed message is logged and counts as done.
                error!(topic = %self.topic, partition = self.partition, offset, key = %key, permanent, "handler failed: {error}");
                true
            }
        }
    }

    /// Resumes a full partition once a quarter of its buffer is free again, so
    /// refills come in batches rather than one message at a time.
    fn resume_if_drained(&self, state: &mut State) {
        let max = self.shared.config.max_uncommitted;
        if state.paused && !state.released && state.offsets.pending() <= max - max.div_ceil(4) {
            state.paused = false;
            state.resumes += 1;
            self.shared.wake();
        }
    }

    /// Stops starting queued messages; in-flight handlers keep running.
    pub(crate) fn drain(&self) {
        self.draining.cancel();
    }

    /// Cancels in-flight handlers and stops starting queued messages.
    pub(crate) fn cancel(&self) {
        self.cancellation.cancel();
    }

    /// Waits up to `budget` for runners to exit; false if some are still running.
    pub(crate) async fn wait_idle(&self, budget: Duration) -> bool {
        self.runners.close();
        tokio::time::timeout(budget, self.runners.wait())
            .await
            .is_ok()
    }

    /// Whether no handler of this partition is running.
    pub(crate) fn is_idle(&self) -> bool {
        self.runners.is_empty()
    }

    /// Marks the partition as handed back: no pause/resume calls from now on.
    /// Returns the offset to commit and its metadata.
    pub(crate) fn release(&self) -> Option<(i64, String)> {
        // The queue holds the consumer alive; let it go with the partition.
        drop(
            self.queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
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

    pub(crate) fn topic(&self) -> &Arc<str> {
        &self.topic
    }

    pub(crate) fn partition(&self) -> i32 {
        self.partition
    }

    pub(crate) fn stats(&self) -> PartitionStats {
        let state = self.state();
        PartitionStats {
            topic: self.topic.to_string(),
            partition: self.partition,
            buffered: state.offsets.pending(),
            max_buffered: state.max_buffered,
            paused: state.paused,
            pauses: state.pauses,
            resumes: state.resumes,
            finished: state.finished,
        }
    }
}
