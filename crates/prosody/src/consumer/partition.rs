//! One assigned partition: per-key FIFO queues, backpressure and offset tracking.
//!
//! Each key with work gets one runner task that drains the key's queue in order,
//! so a key never runs twice at once while different keys run side by side. A
//! runner holds a permit from the consumer-wide semaphore only while a handler
//! runs, which is what bounds concurrency to `max_concurrency`.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, warn};

use rdkafka::consumer::base_consumer::PartitionQueue;

use super::dispatch::{Failure, FailureKind, Outcome};
use super::failure::{backoff, dead_letter_headers, decide, Decision};
use super::filter::{is_own, is_unwanted_type, Skip};
use super::hooks::Hooks;
use super::offsets::{Admission, OffsetTracker};
use super::shared::Shared;
use super::timer_queue::TimerQueue;
use crate::dedup::message_id;
use crate::handler::{from_millis, Context};
use crate::message::{Header, Message, Timer};
use crate::timers::PartitionScope;

/// A fetched message, copied out of librdkafka's buffer, payload not yet decoded.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub(crate) offset: i64,
    pub(crate) key: Result<Arc<str>, &'static str>,
    pub(crate) payload: Option<Vec<u8>>,
    pub(crate) timestamp: Option<SystemTime>,
    pub(crate) headers: Arc<[Header]>,
}

/// What waits in a key's queue: a fetched message or a due timer (ms since the epoch).
#[derive(Debug)]
enum Work {
    Message(Fetched),
    Timer(i64),
}

/// One handler invocation.
enum Call {
    Message(Message),
    Timer(Timer),
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
    queues: HashMap<Arc<str>, VecDeque<Work>>,
    offsets: OffsetTracker,
    paused: bool,
    released: bool,
    max_buffered: usize,
    pauses: u64,
    resumes: u64,
    finished: u64,
    /// When a message last finished here (or the partition was assigned).
    last_progress: Instant,
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
    /// This partition's timers, when a timer store is configured.
    timers: Option<Arc<TimerQueue>>,
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
            TimerQueue::new(Arc::clone(store), scope)
        });
        let manager = Arc::new(Self {
            topic,
            partition,
            timers,
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
                last_progress: Instant::now(),
            }),
            draining: cancellation.child_token(),
            cancellation,
            runners: TaskTracker::new(),
            queue: Mutex::new(None),
        });
        if let Some(timers) = &manager.timers {
            let run =
                Arc::clone(timers).run(Arc::downgrade(&manager), manager.cancellation.clone());
            manager.shared.runtime.spawn(run);
        }
        manager
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
        queue.as_ref().map_or(0, |queue| self.fill_from(queue))
    }

    /// Refills from a runner once a full buffer has drained a quarter, so in
    /// steady state the poll thread need not be woken (a context switch per
    /// refill). If the poll thread is filling right now, or nothing is
    /// prefetched, it is woken to take over instead.
    fn refill(self: &Arc<Self>) {
        let taken = match self.queue.try_lock() {
            Ok(queue) => queue.as_ref().map_or(0, |queue| self.fill_from(queue)),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => {
                let queue = poisoned.into_inner();
                queue.as_ref().map_or(0, |queue| self.fill_from(queue))
            }
            Err(std::sync::TryLockError::WouldBlock) => 0,
        };
        if taken == 0 {
            self.shared.wake();
        }
    }

    fn fill_from(self: &Arc<Self>, queue: &PartitionQueue<Hooks>) -> usize {
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
        // Messages without a usable key queue under "" and take the failure path there.
        let key = fetched
            .key
            .as_ref()
            .map_or_else(|_| Arc::from(""), Arc::clone);
        let buffered = state.offsets.pending();
        state.max_buffered = state.max_buffered.max(buffered);
        self.enqueue(&mut state, key, Work::Message(fetched));
        if buffered >= max && !state.paused {
            state.paused = true;
            state.pauses += 1;
        }
        Accepted::Taken
    }

    /// Queues a due timer behind its key's other work (timers do not count
    /// against `max_uncommitted`: they hold no offset).
    pub(crate) fn accept_timer(self: &Arc<Self>, key: Arc<str>, at: i64) {
        let mut state = self.state();
        if !state.released && !self.draining.is_cancelled() {
            self.enqueue(&mut state, key, Work::Timer(at));
        }
    }

    /// Appends work to its key's queue, starting a runner if the key was idle.
    fn enqueue(self: &Arc<Self>, state: &mut State, key: Arc<str>, work: Work) {
        match state.queues.entry(Arc::clone(&key)) {
            Entry::Occupied(mut queue) => queue.get_mut().push_back(work),
            Entry::Vacant(slot) => {
                slot.insert(VecDeque::new());
                let manager = Arc::clone(self);
                self.runners
                    .spawn_on(manager.run_key(key, work), &self.shared.runtime);
            }
        }
    }

    /// Drains one key's queue in order; exits when it is empty or the partition stops.
    ///
    /// A failing message stays at the head of its key's queue while it waits to be
    /// retried, so later messages of that key wait too, but no permit is held
    /// while waiting: the partition's other keys keep flowing. Its offset stays
    /// unfinished, so the committed offset never passes it.
    async fn run_key(self: Arc<Self>, key: Arc<str>, first: Work) {
        let mut next = first;
        loop {
            let (settled, offset) = match next {
                Work::Message(fetched) => {
                    let offset = fetched.offset;
                    (self.settle(&key, fetched).await, Some(offset))
                }
                Work::Timer(at) => (self.settle_timer(&key, at).await, None),
            };
            if !settled {
                // Cancelled: leave the rest of the key's queue to the next owner.
                return;
            }
            let (queued, resumed) = {
                let mut state = self.state();
                if let Some(offset) = offset {
                    state.offsets.finish(offset);
                    state.finished += 1;
                }
                state.last_progress = Instant::now();
                let resumed = self.resume_if_drained(&mut state);
                let queued = if self.draining.is_cancelled() {
                    None
                } else {
                    state.queues.get_mut(&key).and_then(VecDeque::pop_front)
                };
                if queued.is_none() {
                    state.queues.remove(&key);
                }
                (queued, resumed)
            };
            // Outside the state lock: refilling takes it per message.
            if resumed {
                self.refill();
            }
            match queued {
                Some(work) => next = work,
                None => return,
            }
        }
    }

    /// Runs one message to a conclusion: success, dead letter or skip (true), or
    /// cancellation (false, the message will run again under the next owner).
    async fn settle(&self, key: &Arc<str>, fetched: Fetched) -> bool {
        let offset = fetched.offset;
        if is_own(&self.shared.config, &fetched.headers) {
            return self.skip(key, offset, Skip::OwnMessage);
        }
        let message = match self.decode(key, &fetched) {
            Ok(message) if is_unwanted_type(&self.shared.config, message.payload()) => {
                return self.skip(key, offset, Skip::EventType);
            }
            Ok(message) => message,
            Err(failure) => {
                return self
                    .give_up(
                        key,
                        &fetched,
                        &failure,
                        1,
                        decide(&self.shared.config, failure.kind, 1),
                    )
                    .await
            }
        };
        let id = self
            .shared
            .dedup
            .as_ref()
            .and_then(|_| message_id(message.payload()));
        if let (Some(dedup), Some(id)) = (&self.shared.dedup, &id) {
            // The lookup first: a cache or memory-store answer is ready at once,
            // and then no cancellation waiter is registered.
            tokio::select! {
                biased;
                seen = dedup.seen(&self.topic, key, id) => if seen {
                    return self.skip(key, offset, Skip::Duplicate);
                },
                () = self.draining.cancelled() => return false,
            }
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let Some(outcome) = self
                .attempt_with_permit(key, Call::Message(message.clone()))
                .await
            else {
                return false;
            };
            let failure = match outcome {
                Outcome::Succeeded => {
                    if let (Some(dedup), Some(id)) = (&self.shared.dedup, &id) {
                        dedup.record(&self.topic, key, id).await;
                    }
                    return true;
                }
                Outcome::Failed(_) if self.cancellation.is_cancelled() => {
                    debug!(topic = %self.topic, partition = self.partition, offset, key = %key, "handler stopped by cancellation; the message will run again");
                    return false;
                }
                Outcome::Failed(failure) => failure,
            };
            match decide(&self.shared.config, failure.kind, attempt) {
                Decision::Retry(delay) => {
                    warn!(
                        topic = %self.topic, partition = self.partition, offset, key = %key, attempt, kind = failure.kind.as_str(),
                        "handler failed ({}): {}; retrying in {delay:?}", failure.class, failure.message
                    );
                    if !self.wait_to_retry(delay).await {
                        return false;
                    }
                }
                decision => {
                    return self
                        .give_up(key, &fetched, &failure, attempt, decision)
                        .await
                }
            }
        }
    }

    /// Runs a due timer to a conclusion like [`settle`](Self::settle) does a
    /// message: retried per the mode's policy, deleted from the store once
    /// `on_timer` succeeded or was given up on; false on cancellation (the timer
    /// stays stored and fires under the next owner).
    async fn settle_timer(&self, key: &Arc<str>, at: i64) -> bool {
        let Some(timers) = self.timers.as_ref() else {
            return true;
        };
        if !timers.is_queued(key, at) {
            // Unscheduled after it came due.
            return true;
        }
        let timer = Timer {
            key: Arc::clone(key),
            time: from_millis(at),
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let Some(outcome) = self
                .attempt_with_permit(key, Call::Timer(timer.clone()))
                .await
            else {
                return false;
            };
            match outcome {
                Outcome::Succeeded => break,
                Outcome::Failed(_) if self.cancellation.is_cancelled() => return false,
                Outcome::Failed(failure) => {
                    match decide(&self.shared.config, failure.kind, attempt) {
                        Decision::Retry(delay) => {
                            warn!(
                                topic = %self.topic, partition = self.partition, key = %key, at, attempt,
                                "timer handler failed ({}): {}; retrying in {delay:?}", failure.class, failure.message
                            );
                            if !self.wait_to_retry(delay).await {
                                return false;
                            }
                        }
                        Decision::DeadLetter | Decision::Skip => {
                            error!(
                                topic = %self.topic, partition = self.partition, key = %key, at, attempts = attempt,
                                "giving up on timer after failure ({}): {}", failure.class, failure.message
                            );
                            break;
                        }
                    }
                }
            }
        }
        // The timer ran (or was given up on): delete it, retrying while the store is down.
        let mut tries = 0;
        loop {
            tries += 1;
            match timers.finished(key, at).await {
                Ok(()) => return true,
                Err(error) => {
                    let delay = backoff(&self.shared.config, tries);
                    warn!(topic = %self.topic, partition = self.partition, key = %key, at, "cannot delete a fired timer; retrying in {delay:?}: {error}");
                    tokio::select! {
                        () = self.cancellation.cancelled() => return false,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Counts a filtered message as done without running the handler.
    fn skip(&self, key: &str, offset: i64, skip: Skip) -> bool {
        debug!(topic = %self.topic, partition = self.partition, offset, key, "skipping message: {}", skip.as_str());
        self.shared.skips.count(skip);
        true
    }

    /// One attempt holding a concurrency permit only while the handler runs;
    /// `None` when the partition stops before a permit is free.
    async fn attempt_with_permit(&self, key: &Arc<str>, call: Call) -> Option<Outcome> {
        let permit = tokio::select! {
            biased;
            () = self.draining.cancelled() => return None,
            permit = Arc::clone(&self.shared.permits).acquire_owned() => permit.ok()?,
        };
        let outcome = self.attempt(key, call).await;
        drop(permit);
        Some(outcome)
    }

    /// Sleeps before a retry; false when the partition stops meanwhile.
    async fn wait_to_retry(&self, delay: Duration) -> bool {
        tokio::select! {
            () = self.draining.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }

    /// One handler call, cancelled once it overruns `timeout`.
    async fn attempt(&self, key: &Arc<str>, work: Call) -> Outcome {
        let call = self.cancellation.child_token();
        let timers = self
            .timers
            .as_ref()
            .map(|timers| (Arc::clone(timers), Arc::clone(key)));
        let context = Context::new(call.clone(), timers);
        let handler = match work {
            Call::Message(message) => self.shared.handler.on_message(context, message),
            Call::Timer(timer) => self.shared.handler.on_timer(context, timer),
        };
        tokio::pin!(handler);
        let timeout = self.shared.config.timeout;
        // Handler first, and the timer built only when polled: a handler that
        // finishes on its first poll never reads the clock or arms a timer.
        tokio::select! {
            biased;
            outcome = &mut handler => outcome,
            () = async { tokio::time::sleep(timeout).await } => {
                call.cancel();
                // The handler should stop promptly now; one that ignores cancellation
                // holds its key until the partition is released and abandons it.
                handler.await;
                Outcome::Failed(Failure {
                    kind: FailureKind::Timeout,
                    class: "Prosody::TimeoutError".to_owned(),
                    message: format!("handler ran longer than the {timeout:?} timeout"),
                })
            }
        }
    }

    fn decode(&self, key: &Arc<str>, fetched: &Fetched) -> Result<Message, Failure> {
        let bad_input = |message: String| Failure {
            kind: FailureKind::BadInput,
            class: "Prosody::InvalidMessageError".to_owned(),
            message,
        };
        if let Err(problem) = &fetched.key {
            return Err(bad_input(format!("unusable message: {problem}")));
        }
        let payload = match fetched.payload.as_deref().map(serde_json::from_slice) {
            Some(Ok(payload)) => payload,
            Some(Err(problem)) => return Err(bad_input(format!("payload is not JSON: {problem}"))),
            None => return Err(bad_input("message has no payload".to_owned())),
        };
        Ok(Message {
            topic: Arc::clone(&self.topic),
            partition: self.partition,
            offset: fetched.offset,
            key: Arc::clone(key),
            timestamp: fetched.timestamp,
            payload: Arc::new(payload),
            headers: Arc::clone(&fetched.headers),
        })
    }

    /// Ends a message's retries: writes it to the failure topic or logs and skips it.
    /// A dead letter that cannot be written is retried until it is (or until cancellation),
    /// so a message is never lost on the way to the failure topic.
    async fn give_up(
        &self,
        key: &str,
        fetched: &Fetched,
        failure: &Failure,
        attempts: u32,
        decision: Decision,
    ) -> bool {
        let offset = fetched.offset;
        let (Decision::DeadLetter, Some(topic), Some(producer)) = (
            decision,
            self.shared.config.failure_topic.as_deref(),
            self.shared.dead_letters.as_ref(),
        ) else {
            error!(
                topic = %self.topic, partition = self.partition, offset, key = fetched.key.as_deref().unwrap_or("<unusable>"), attempts, kind = failure.kind.as_str(),
                "skipping message after failure ({}): {}", failure.class, failure.message
            );
            return true;
        };
        let headers = dead_letter_headers(
            &fetched.headers,
            &self.topic,
            self.partition,
            offset,
            failure,
            attempts,
        );
        let payload = fetched.payload.as_deref().unwrap_or_default();
        let mut tries = 0;
        loop {
            tries += 1;
            match producer.send_bytes(topic, key, payload, &headers).await {
                Ok(()) => {
                    warn!(
                        topic = %self.topic, partition = self.partition, offset, key = fetched.key.as_deref().unwrap_or("<unusable>"), attempts, kind = failure.kind.as_str(),
                        failure_topic = topic, "message dead-lettered after failure ({}): {}", failure.class, failure.message
                    );
                    return true;
                }
                Err(problem) => {
                    let delay = backoff(&self.shared.config, tries);
                    error!(topic = %self.topic, partition = self.partition, offset, failure_topic = topic, "cannot dead-letter message; retrying in {delay:?}: {problem}");
                    tokio::select! {
                        () = self.cancellation.cancelled() => return false,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// True when the partition has unfinished work and finished nothing for `threshold`.
    pub(crate) fn is_stalled(&self, threshold: Duration) -> bool {
        let state = self.state();
        state.offsets.pending() > 0 && state.last_progress.elapsed() >= threshold
    }

    /// Resumes a full partition once a quarter of its buffer is free again, so
    /// refills come in batches rather than one message at a time. True when it
    /// resumed: the caller then refills (see [`refill`](Self::refill)).
    fn resume_if_drained(&self, state: &mut State) -> bool {
        let max = self.shared.config.max_uncommitted;
        if state.paused && !state.released && state.offsets.pending() <= max - max.div_ceil(4) {
            state.paused = false;
            state.resumes += 1;
            return true;
        }
        false
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
