//! Deferred retry (`:pipeline` mode): a message whose handler fails
//! transiently is set aside instead of blocking its partition.
//!
//! ```text
//! handler fails transiently ──► gate open? ──no──► blocking retry (backpressure), as before
//!                                   │yes
//!                                   ▼
//!             DeferStore::put (key, offset, attempt, retry_at) ──► offset finished (commit moves on)
//!                                   │
//!   later messages of the key ──► deferred behind it (attempt 0), offsets finished
//!                                   │
//!   DeferQueue::run: retry_at due ──► Work::Deferred into the key's queue ──► reload by offset
//!                                     (reload.rs) ──► handler ──► ok: next deferred message
//!                                                              └► transient: back off again
//! ```
//!
//! - `store.rs`: [`DeferStore`] and the memory store; `postgres.rs`: the
//!   `prosody_deferred` table. The new owner of a partition loads its deferred
//!   messages ([`DeferQueue::run`]) before any message of the partition runs.
//! - the gate: the partition's outcomes over the last `defer_failure_window`
//!   (counted per slice of it); while more than `defer_failure_threshold` of
//!   them failed (and at least a handful were seen), nothing new is deferred,
//!   because then the downstream is down for everyone and blocking (with
//!   backpressure) is the better answer.
//! - permanent failures are never deferred: they take the dead-letter path.
//!
//! The glue with the partition's key queues is `partition/defer.rs`.

pub(crate) mod postgres;
pub(crate) mod reload;
pub(crate) mod store;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::partition::{Fetched, PartitionManager};
use crate::config::{Config, Mode};
use crate::handler::to_millis;
use crate::store::StoreError;
use crate::timers::PartitionScope;
pub(crate) use store::{DeferStore, DeferredRecord, MemoryDeferred};

/// Slices the gate's window is cut into: outcomes leave the window a slice
/// at a time, so the window spans `defer_failure_window` plus at most one slice.
const SLICES: u32 = 20;

/// Outcomes the gate needs before it may close: a handful of early failures
/// must not turn deferral off.
const MIN_OUTCOMES: u64 = 20;

/// Deferred messages a partition keeps in memory as fetched, so that their
/// retry need not read them back from Kafka; the rest are read back.
const CACHED: usize = 1_000;

/// Pause after a failed load before trying again.
const LOAD_RETRY: Duration = Duration::from_secs(1);

/// Deferral's settings, read from the configuration in one place.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct DeferSettings {
    /// Whether failing messages are deferred at all (`defer`; pipeline mode only).
    pub(crate) enabled: bool,
    /// Failure rate of the recent outcomes above which nothing new is deferred
    /// (`defer_failure_threshold`).
    pub(crate) failure_threshold: f64,
    /// How far back "recent" reaches (`defer_failure_window`).
    pub(crate) failure_window: Duration,
}

impl DeferSettings {
    /// The settings `config` asks for; deferral applies in `:pipeline` mode only
    /// (the other modes give up after `max_retries` instead of blocking).
    pub(crate) fn from_config(config: &Config) -> Self {
        Self {
            enabled: config.defer && config.mode == Mode::Pipeline,
            failure_threshold: config.defer_failure_threshold,
            failure_window: config.defer_failure_window,
        }
    }
}

/// The partition's outcomes over the last `defer_failure_window`, counted
/// per slice of the window (memory stays small whatever the message rate).
#[derive(Debug)]
struct Gate {
    window: Duration,
    /// Oldest first; a slice counts the outcomes from its start on.
    slices: VecDeque<Slice>,
    outcomes: u64,
    failures: u64,
    /// Whether the last look found the gate closed (logged on change).
    closed: bool,
}

#[derive(Debug)]
struct Slice {
    start: Instant,
    outcomes: u64,
    failures: u64,
}

impl Gate {
    fn new(window: Duration) -> Self {
        Self {
            window,
            slices: VecDeque::new(),
            outcomes: 0,
            failures: 0,
            closed: false,
        }
    }

    fn slice_length(&self) -> Duration {
        (self.window / SLICES).max(Duration::from_millis(1))
    }

    fn record(&mut self, failed: bool, now: Instant) {
        self.forget_before(now);
        let length = self.slice_length();
        match self.slices.back_mut() {
            Some(current) if now < current.start + length => {
                current.outcomes += 1;
                current.failures += u64::from(failed);
            }
            _ => self.slices.push_back(Slice {
                start: now,
                outcomes: 1,
                failures: u64::from(failed),
            }),
        }
        self.outcomes += 1;
        self.failures += u64::from(failed);
    }

    /// Drops the slices that ended more than a window before `now`.
    fn forget_before(&mut self, now: Instant) {
        let reach = self.slice_length() + self.window;
        while let Some(oldest) = self.slices.front() {
            if now.saturating_duration_since(oldest.start) < reach {
                break;
            }
            self.outcomes -= oldest.outcomes;
            self.failures -= oldest.failures;
            self.slices.pop_front();
        }
    }

    /// Whether deferring is allowed now.
    fn is_open(&mut self, threshold: f64, now: Instant) -> bool {
        self.forget_before(now);
        #[allow(clippy::cast_precision_loss)] // counts far below 2^52
        let rate = self.failures as f64 / self.outcomes.max(1) as f64;
        self.outcomes < MIN_OUTCOMES || rate <= threshold
    }
}

/// One key's deferred messages: offset → attempts so far (0 for those not
/// tried since they were deferred behind the first).
#[derive(Debug, Default)]
struct DeferredKey {
    offsets: BTreeMap<i64, u32>,
    /// When the first one is retried (ms since the epoch).
    due_ms: i64,
    /// Handed to the key's queue and not settled yet.
    queued: bool,
}

struct State {
    keys: HashMap<Arc<str>, DeferredKey>,
    messages: usize,
    gate: Gate,
    /// Deferred messages as fetched, by offset (at most [`CACHED`]).
    cached: HashMap<i64, Fetched>,
}

/// One partition's deferred messages, mirrored from the [`DeferStore`], and
/// the task that hands each key's first one to the key's queue when it is due.
pub(crate) struct DeferQueue {
    store: Arc<dyn DeferStore>,
    scope: PartitionScope,
    settings: DeferSettings,
    state: Mutex<State>,
    /// True once the partition's stored deferred messages are loaded.
    loaded: watch::Sender<bool>,
    /// Whether any key is deferred right now (kept with `state.keys`), so a
    /// partition with none checks each message without a lock.
    any: AtomicBool,
    changed: Notify,
}

impl DeferQueue {
    pub(crate) fn new(
        store: Arc<dyn DeferStore>,
        scope: PartitionScope,
        settings: DeferSettings,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            scope,
            settings,
            state: Mutex::new(State {
                keys: HashMap::new(),
                messages: 0,
                gate: Gate::new(settings.failure_window),
                cached: HashMap::new(),
            }),
            loaded: watch::Sender::new(false),
            any: AtomicBool::new(false),
            changed: Notify::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits until the stored deferred messages are loaded: until then nobody
    /// knows which keys are deferred. False when `stop` fires first.
    pub(crate) async fn wait_loaded(&self, stop: &CancellationToken) -> bool {
        if *self.loaded.borrow() {
            return true;
        }
        let mut loaded = self.loaded.subscribe();
        tokio::select! {
            biased;
            result = loaded.wait_for(|loaded| *loaded) => result.is_ok(),
            () = stop.cancelled() => false,
        }
    }

    /// Records whether a message's attempt failed, for the gate.
    pub(crate) fn record(&self, failed: bool) {
        self.state().gate.record(failed, Instant::now());
    }

    /// Whether a failing message may be deferred now (logs when that changes).
    pub(crate) fn gate_is_open(&self) -> bool {
        let mut state = self.state();
        let open = state
            .gate
            .is_open(self.settings.failure_threshold, Instant::now());
        if open == state.gate.closed {
            state.gate.closed = !open;
            let (scope, threshold) = (&self.scope, self.settings.failure_threshold);
            if open {
                info!(%scope, "failure rate back under defer_failure_threshold ({threshold}); deferring failing messages again");
            } else {
                warn!(%scope, "more than defer_failure_threshold ({threshold}) of the partition's messages in the last defer_failure_window failed: retrying in place (blocking) instead of deferring");
            }
        }
        open
    }

    /// False when a fresh message of `key` surely runs now: the partition's
    /// deferred messages are loaded and none is deferred. Lock-free.
    pub(crate) fn may_defer(&self) -> bool {
        !*self.loaded.borrow() || self.any.load(Ordering::Acquire)
    }

    /// Whether `key` has deferred messages.
    pub(crate) fn is_deferred(&self, key: &str) -> bool {
        self.state().keys.contains_key(key)
    }

    /// Whether the message at `offset` of `key` is deferred already (it came
    /// again after a rebalance that happened before its offset was committed).
    pub(crate) fn contains(&self, key: &str, offset: i64) -> bool {
        self.state()
            .keys
            .get(key)
            .is_some_and(|deferred| deferred.offsets.contains_key(&offset))
    }

    /// The first deferred message of `key` and its attempts so far.
    pub(crate) fn head(&self, key: &str) -> Option<(i64, u32)> {
        let state = self.state();
        let (offset, attempt) = state.keys.get(key)?.offsets.first_key_value()?;
        Some((*offset, *attempt))
    }

    /// Defers a message: stored first, so a committed offset implies a stored
    /// deferral. `retry_at_ms` matters only when it is the key's first.
    pub(crate) async fn defer(
        &self,
        key: &Arc<str>,
        offset: i64,
        attempt: u32,
        retry_at_ms: i64,
    ) -> Result<(), StoreError> {
        self.store_record(key, offset, attempt, retry_at_ms).await?;
        let mut state = self.state();
        let deferred = state
            .keys
            .entry(Arc::clone(key))
            .or_insert_with(|| DeferredKey {
                due_ms: retry_at_ms,
                ..DeferredKey::default()
            });
        if deferred.offsets.insert(offset, attempt).is_none() {
            state.messages += 1;
        }
        self.any.store(true, Ordering::Release);
        drop(state);
        self.changed.notify_one();
        Ok(())
    }

    /// Writes a deferred message's attempts and next retry to the store.
    async fn store_record(
        &self,
        key: &str,
        offset: i64,
        attempt: u32,
        retry_at_ms: i64,
    ) -> Result<(), StoreError> {
        let record = DeferredRecord {
            key: key.to_owned(),
            offset,
            attempt,
            retry_at_ms,
        };
        self.store.put(&self.scope, &record).await
    }

    /// Keeps a deferred message as fetched, while there is room, so that its
    /// retry need not read it back.
    pub(crate) fn cache(&self, fetched: Fetched) {
        let mut state = self.state();
        if state.cached.len() < CACHED {
            state.cached.insert(fetched.offset, fetched);
        }
    }

    /// The deferred message at `offset` as fetched, if it was kept.
    pub(crate) fn cached(&self, offset: i64) -> Option<Fetched> {
        self.state().cached.remove(&offset)
    }

    /// The first deferred message of `key` ran (or was given up on): forget it
    /// and make the next one due now.
    pub(crate) async fn done(&self, key: &str, offset: i64) -> Result<(), StoreError> {
        self.store.remove(&self.scope, offset).await?;
        let mut state = self.state();
        state.cached.remove(&offset);
        let Some(deferred) = state.keys.get_mut(key) else {
            return Ok(());
        };
        let removed = deferred.offsets.remove(&offset).is_some();
        deferred.due_ms = i64::MIN;
        let empty = deferred.offsets.is_empty();
        if empty {
            state.keys.remove(key);
            self.any.store(!state.keys.is_empty(), Ordering::Release);
        }
        state.messages -= usize::from(removed);
        Ok(())
    }

    /// The first deferred message of `key` failed again: store its attempts and
    /// next retry, then wait for it.
    pub(crate) async fn failed(
        &self,
        key: &Arc<str>,
        offset: i64,
        attempt: u32,
        retry_at_ms: i64,
    ) -> Result<(), StoreError> {
        self.store_record(key, offset, attempt, retry_at_ms).await?;
        let mut state = self.state();
        if let Some(deferred) = state.keys.get_mut(&**key) {
            deferred.offsets.insert(offset, attempt);
            deferred.due_ms = retry_at_ms;
        }
        Ok(())
    }

    /// The key's queued retry is over (whatever its outcome): it may be handed
    /// to the key's queue again when due.
    pub(crate) fn settled(&self, key: &str) {
        if let Some(deferred) = self.state().keys.get_mut(key) {
            deferred.queued = false;
        }
        self.changed.notify_one();
    }

    /// Deferred keys and messages, for [`super::PartitionStats`].
    pub(crate) fn counts(&self) -> (usize, usize) {
        let state = self.state();
        (state.keys.len(), state.messages)
    }

    /// Loads the partition's deferred messages, then hands each key's first one
    /// to its queue when due, until cancelled.
    pub(crate) async fn run(
        self: Arc<Self>,
        manager: Weak<PartitionManager>,
        cancellation: CancellationToken,
    ) {
        loop {
            match self.store.load(&self.scope).await {
                Ok(records) => {
                    self.restore(records);
                    break;
                }
                Err(error) => {
                    warn!(scope = %self.scope, "cannot load deferred messages; the partition waits; retrying in {LOAD_RETRY:?}: {error}");
                    tokio::select! {
                        () = cancellation.cancelled() => return,
                        () = tokio::time::sleep(LOAD_RETRY) => {}
                    }
                }
            }
        }
        loop {
            let Some(manager) = manager.upgrade() else {
                return;
            };
            let (due, next) = self.take_due(to_millis(SystemTime::now()));
            for key in due {
                manager.accept_deferred(key);
            }
            drop(manager);
            let delay = next.map_or(Duration::from_secs(3600), |next| {
                Duration::from_millis(
                    u64::try_from(next.saturating_sub(to_millis(SystemTime::now()))).unwrap_or(0),
                )
            });
            tokio::select! {
                () = cancellation.cancelled() => return,
                () = self.changed.notified() => {}
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn restore(&self, records: Vec<DeferredRecord>) {
        let mut state = self.state();
        let count = records.len();
        for record in records {
            let key: Arc<str> = Arc::from(record.key);
            let deferred = state.keys.entry(key).or_insert_with(|| DeferredKey {
                due_ms: record.retry_at_ms,
                ..DeferredKey::default()
            });
            deferred.offsets.insert(record.offset, record.attempt);
        }
        state.messages = count;
        self.any.store(count > 0, Ordering::Release);
        if count > 0 {
            info!(scope = %self.scope, messages = count, keys = state.keys.len(), "loaded deferred messages");
        }
        drop(state);
        self.loaded.send_replace(true);
    }

    /// Marks due keys as queued; returns them and the next due time, if any.
    fn take_due(&self, now: i64) -> (Vec<Arc<str>>, Option<i64>) {
        let mut state = self.state();
        let mut due = Vec::new();
        let mut next: Option<i64> = None;
        for (key, deferred) in &mut state.keys {
            if deferred.queued {
                continue;
            }
            if deferred.due_ms <= now {
                deferred.queued = true;
                due.push(Arc::clone(key));
            } else {
                next = Some(next.map_or(deferred.due_ms, |next| next.min(deferred.due_ms)));
            }
        }
        (due, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_needs_enough_outcomes_and_closes_above_the_threshold() {
        let start = Instant::now();
        let mut gate = Gate::new(Duration::from_secs(300));
        for _ in 0..MIN_OUTCOMES - 1 {
            gate.record(true, start);
        }
        assert!(gate.is_open(0.9, start), "too few outcomes to judge");
        gate.record(true, start);
        assert!(!gate.is_open(0.9, start), "everything failed");
        // Successes within the window dilute the failures.
        let later = start + Duration::from_secs(60);
        for failed in (0..180).map(|n| n % 10 != 0) {
            gate.record(failed, later);
        }
        // 20 + 162 failures out of 200: 91%.
        assert!(!gate.is_open(0.9, later), "91% failed");
        gate.record(false, later);
        gate.record(false, later);
        assert!(!gate.is_open(0.9, later), "182 of 202: still above 90%");
        gate.record(false, later);
        assert!(gate.is_open(0.9, later), "182 of 203: under 90%");
    }

    #[test]
    fn outcomes_older_than_the_window_leave_it() {
        let start = Instant::now();
        let window = Duration::from_secs(300);
        let mut gate = Gate::new(window);
        for _ in 0..100 {
            gate.record(true, start);
        }
        assert!(
            !gate.is_open(0.9, start + window / 2),
            "the failures are recent"
        );
        // A window and a slice later they are gone, with nothing new: open.
        let after = start + window + window / SLICES;
        assert!(
            gate.is_open(0.9, after),
            "the failures slid out of the window"
        );
        assert_eq!((gate.outcomes, gate.failures, gate.slices.len()), (0, 0, 0));
        // Many outcomes in one slice take one slice of memory.
        for _ in 0..10_000 {
            gate.record(false, after);
        }
        assert_eq!(gate.slices.len(), 1);
    }

    #[tokio::test]
    async fn deferred_messages_are_stored_before_they_count_and_reload_in_order() {
        let store: Arc<dyn DeferStore> = Arc::new(MemoryDeferred::default());
        let scope = PartitionScope::new("g", "t", 0);
        let settings = DeferSettings {
            enabled: true,
            failure_threshold: 0.9,
            failure_window: Duration::from_secs(300),
        };
        let queue = DeferQueue::new(Arc::clone(&store), scope.clone(), settings);
        let key: Arc<str> = Arc::from("k");
        queue.defer(&key, 7, 1, 1_000).await.unwrap();
        queue.defer(&key, 9, 0, 0).await.unwrap();
        assert_eq!(queue.counts(), (1, 2));
        assert_eq!(queue.head("k"), Some((7, 1)));
        queue.failed(&key, 7, 2, 2_000).await.unwrap();

        let next_owner = DeferQueue::new(Arc::clone(&store), scope.clone(), settings);
        next_owner.restore(store.load(&scope).await.unwrap());
        assert_eq!(next_owner.counts(), (1, 2));
        assert_eq!(next_owner.head("k"), Some((7, 2)));
        let (due, next) = next_owner.take_due(1_500);
        assert!(due.is_empty());
        assert_eq!(next, Some(2_000));
        next_owner.done("k", 7).await.unwrap();
        assert_eq!(next_owner.head("k"), Some((9, 0)));
        next_owner.settled("k");
        let (due, _) = next_owner.take_due(1_500);
        assert_eq!(due, vec![Arc::clone(&key)], "the next one is due at once");
        next_owner.done("k", 9).await.unwrap();
        assert_eq!(next_owner.counts(), (0, 0));
        assert!(store.load(&scope).await.unwrap().is_empty());
    }
}
