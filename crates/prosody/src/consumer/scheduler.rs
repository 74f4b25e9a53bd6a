//! The fair scheduler: who gets a handler slot when `max_concurrency` is saturated.
//!
//! One scheduler per subscription (in [`Shared`](super::shared::Shared)), so it
//! spans every partition the process consumes. It replaces a plain semaphore:
//! while a slot is free, a call takes it at once (one uncontended lock); when
//! none is, the call waits in a queue ordered by **virtual time**, and each
//! freed slot goes to the waiting call that ranks first.
//!
//! - **Virtual time** is a key's handler run time, decaying exponentially with
//!   half-life `scheduler_decay`: a key that has kept slots busy ranks behind
//!   keys that have not. A key is its string, whatever the topic or partition
//!   (one customer's key in two topics is one key). Stored inflated by
//!   `2^(t/half-life)` so that adding run time never touches other keys; the
//!   sweep rebases it.
//! - **Waiting boost**: a call's rank is its key's virtual time (when it
//!   queued, then at each re-ranking), scaled by [`boost`]: with `f = waited /
//!   max_wait`, by `(1 − f) / (1 + wait_weight · f²)`, ties going to the
//!   earlier arrival. Short waits barely change the order, so fairness holds at
//!   the scale of single calls; `scheduler_wait_weight` makes long waits count
//!   (by default a call that has waited a tenth of `max_wait` ranks as if its
//!   key had under a third of its virtual time); a call that has waited
//!   `scheduler_max_wait` ranks 0, ahead of everything that arrived after it:
//!   nothing starves. The queue is a binary heap (O(log n) per call, no
//!   allocation once grown) whose ranks are recomputed in place from the keys'
//!   current virtual time every 10 ms while calls wait (less often for long
//!   queues, and at least every `max_wait / 1000`, so the boost is never more
//!   than 0.1% stale). A waiting call's state (its waker, then its grant) sits
//!   in a slab beside the heap: granting a slot allocates nothing.
//! - **Pools**: fresh calls and retries (second and later attempts) queue
//!   apart. When both have waiters, a slot goes to a retry only while retries
//!   have had less than `scheduler_failure_share` of the execution time granted
//!   under that contention (decayed like virtual time, running calls counted),
//!   so a retry storm cannot crowd out fresh work.
//! - **Memory**: a sweep every quarter half-life evicts keys whose virtual time
//!   decayed below [`EVICT_BELOW`] and whose monopolization window is empty.
//!
//! Monopolization detection (`:pipeline`, see `monopoly.rs`) lives here too:
//! it reads the same per-key run time, and a call of a key over its limit is
//! refused before it takes a slot.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::monopoly::{MonopolySettings, Usage};
use crate::config::{Config, Mode};

/// A key whose decayed virtual time is below this many seconds is forgotten
/// by the sweep (it ranks like a key never seen).
const EVICT_BELOW: f64 = 1e-3;

/// A cheap multiply-and-rotate hash for the key map, looked up once per
/// handler call. Keys come from producers, not attackers choosing collisions
/// against a process's map; the map is bounded by the sweep regardless.
#[derive(Default)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0; 8];
            word.copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(MULTIPLIER);
        }
        let mut tail = [0; 8];
        let rest = chunks.remainder();
        tail[..rest.len()].copy_from_slice(rest);
        self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(tail)).wrapping_mul(MULTIPLIER);
    }

    fn write_u8(&mut self, byte: u8) {
        self.write(&[byte]);
    }

    fn finish(&self) -> u64 {
        // Mix the high bits down: the table indexes with the low ones.
        self.0 ^ (self.0 >> 29)
    }
}

/// The shortest time between two re-rankings of the waiting calls, in seconds.
const RERANK_MIN: f64 = 0.01;

/// Seconds between re-rankings per waiting call (10k waiting: every 100 ms).
const RERANK_PER_WAITER: f64 = 1e-5;

/// The scheduler's settings, read from the configuration in one place.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct QosSettings {
    /// Handler slots: `max_concurrency`, plus the calls the handler queues
    /// ahead ([`crate::EventHandler::queue_ahead`]).
    pub(crate) slots: usize,
    /// Virtual time's half-life.
    pub(crate) decay: Duration,
    /// The most of contended execution time retries get while fresh calls wait.
    pub(crate) failure_share: f64,
    /// How long a call waits at most before it ranks ahead of new arrivals.
    pub(crate) max_wait: Duration,
    /// How strongly waiting lowers a call's rank before `max_wait` (see [`boost`]).
    pub(crate) wait_weight: f64,
    /// Monopolization detection, in `:pipeline` mode unless `monopolization_enabled` is off.
    pub(crate) monopolization: Option<MonopolySettings>,
}

impl QosSettings {
    pub(crate) fn new(config: &Config, queue_ahead: usize) -> Self {
        Self {
            slots: config.max_concurrency.saturating_add(queue_ahead),
            decay: config.scheduler_decay,
            failure_share: config.scheduler_failure_share,
            max_wait: config.scheduler_max_wait,
            wait_weight: f64::from(config.scheduler_wait_weight),
            monopolization: (config.mode == Mode::Pipeline && config.monopolization_enabled).then(
                || {
                    MonopolySettings::new(
                        config.monopolization_window,
                        config.monopolization_threshold,
                    )
                },
            ),
        }
    }
}

/// Which queue a call waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pool {
    /// A message's or timer's first attempt.
    Fresh,
    /// A later attempt after a failure.
    Retry,
}

impl Pool {
    fn index(self) -> usize {
        match self {
            Self::Fresh => 0,
            Self::Retry => 1,
        }
    }
}

/// A snapshot of the scheduler, for tests, benchmarks and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QosStats {
    /// Calls waiting for a handler slot right now (the virtual-time queue's length).
    pub waiting: usize,
    /// Of `waiting`, retries.
    pub waiting_retries: usize,
    /// The most `waiting` has been.
    pub max_waiting: usize,
    /// Calls that had to wait for a slot (the others found one free).
    pub waited: u64,
    /// Keys whose virtual time (or monopolization window) is tracked now.
    pub tracked_keys: usize,
    /// Calls refused because their key monopolized handler time (`:pipeline`).
    pub rejections: u64,
}

/// A call refused by monopolization detection.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rejected {
    /// The key's handler seconds within the rolling window.
    pub(crate) used: f64,
    /// The window's length.
    pub(crate) window: Duration,
    /// The first rejection of this key in this window: log it at WARN.
    pub(crate) warn: bool,
}

pub(crate) struct Scheduler {
    /// [`clock`] when the scheduler started.
    origin: f64,
    core: Mutex<Core>,
}

/// Seconds on a cheap monotonic clock: `CLOCK_MONOTONIC_COARSE` on Linux
/// (~6 ns a read against ~40 ns for `Instant::now`, read twice per handler
/// call), elsewhere `Instant`.
///
/// The coarse clock advances in ticks (4 ms on most kernels), so one short
/// call may measure 0 or a tick; the sum over many calls, which is what
/// virtual time, pool shares and monopolization windows add up, stays right
/// on average (a call starts at a random phase of the tick).
#[cfg(target_os = "linux")]
pub(crate) fn clock() -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec for the duration of the
    // call, which only writes it; CLOCK_MONOTONIC_COARSE exists since Linux 2.6.32.
    let failed = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) } != 0;
    if failed {
        return fallback_clock();
    }
    // Seconds since boot fit an f64 to well under a microsecond.
    #[allow(clippy::cast_precision_loss)]
    let seconds = now.tv_sec as f64 + now.tv_nsec as f64 * 1e-9;
    seconds
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn clock() -> f64 {
    fallback_clock()
}

/// Seconds since the first call, on `Instant`.
fn fallback_clock() -> f64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_secs_f64()
}

impl Scheduler {
    pub(crate) fn new(settings: QosSettings) -> Self {
        Self {
            origin: clock(),
            core: Mutex::new(Core::new(settings)),
        }
    }

    /// Waits for a handler slot for a call of `key`; the slot is held until
    /// the permit drops. Refused at once when `key` monopolizes handler time;
    /// `None` once `draining` (the call's partition stops starting calls) is
    /// cancelled before a slot is granted.
    ///
    /// A waiting call registers nothing with `draining`: a registration on a
    /// partition's token, shared by all its waiting calls, took a contended
    /// lock twice per call. Instead, whoever cancels a partition's `draining`
    /// calls [`wake_all`](Self::wake_all), and a woken call checks its token.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        key: &Arc<str>,
        pool: Pool,
        draining: &CancellationToken,
    ) -> Option<Result<Permit, Rejected>> {
        let mut waiting = Waiting {
            scheduler: self,
            ticket: None,
            done: false,
        };
        let shared_at = match std::future::poll_fn(|cx| waiting.poll(cx, key, pool, draining)).await
        {
            Grant::Slot(shared_at) => shared_at,
            Grant::Refused(rejected) => return Some(Err(rejected)),
            Grant::Draining => return None,
        };
        Some(Ok(Permit {
            scheduler: Arc::clone(self),
            key: Arc::clone(key),
            pool,
            started: self.now(),
            shared_at,
        }))
    }

    /// Wakes every waiting call, to look at its partition's `draining` token:
    /// called after one was cancelled (rarely: a rebalance or a shutdown).
    pub(crate) fn wake_all(&self) {
        let wakers: Vec<Waker> = self
            .core()
            .waiters
            .iter()
            .flatten()
            .filter_map(|waiter| match &waiter.state {
                WaitState::Queued(waker) => Some(waker.clone()),
                WaitState::Granted(_) => None,
            })
            .collect();
        for waker in wakers {
            waker.wake();
        }
    }

    pub(crate) fn stats(&self) -> QosStats {
        self.core().stats()
    }

    /// Seconds since the scheduler started: the clock of [`Core`].
    fn now(&self) -> f64 {
        (clock() - self.origin).max(0.0)
    }

    fn core(&self) -> MutexGuard<'_, Core> {
        // Plain data; a panic elsewhere while holding the lock leaves it usable.
        self.core
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A handler slot, given back (and its run time charged to its key) on drop.
/// Owned, so that a handler finishing on another thread can give it back
/// there (see [`crate::Context::take_slot`]).
pub(crate) struct Permit {
    scheduler: Arc<Scheduler>,
    key: Arc<str>,
    pool: Pool,
    /// When the call started, in [`Scheduler::now`] seconds.
    started: f64,
    /// When granted while both pools had waiters: counts toward the pools' shares.
    shared_at: Option<f64>,
}

impl Permit {
    /// The call starts running only now (it was queued by its handler, see
    /// [`crate::EventHandler::queue_ahead`]): its key is charged from here.
    pub(crate) fn restart(&mut self) {
        self.started = self.scheduler.now();
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let now = self.scheduler.now();
        let ran = (now - self.started).max(0.0);
        let granted = self
            .scheduler
            .core()
            .release(&self.key, self.pool, ran, self.shared_at, now);
        // Outside the lock: waking may unpark a worker thread.
        if let Some(waker) = granted {
            waker.wake();
        }
    }
}

/// A call getting a slot: it takes a free one at once, or queues until one is
/// granted. Dropped while queued (cancellation), it leaves the queue, handing
/// on a slot granted meanwhile.
struct Waiting<'a> {
    scheduler: &'a Scheduler,
    /// Where the call waits, once queued.
    ticket: Option<Ticket>,
    /// It got its slot (or was refused): nothing to undo on drop.
    done: bool,
}

/// How [`Waiting`] ends.
enum Grant {
    /// A slot, with when it was granted if under both pools' contention.
    Slot(Option<f64>),
    /// Refused: the key monopolizes handler time.
    Refused(Rejected),
    /// The partition stopped starting calls first.
    Draining,
}

impl Waiting<'_> {
    /// Takes a free slot or queues for one. `draining` is read under the lock,
    /// which [`Scheduler::wake_all`] takes after it is cancelled: a call either
    /// sees it cancelled or is queued in time to be woken.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        key: &Arc<str>,
        pool: Pool,
        draining: &CancellationToken,
    ) -> Poll<Grant> {
        let mut core = self.scheduler.core();
        let Some(ticket) = self.ticket else {
            if core.monopolized > 0 {
                if let Err(rejected) = core.check(key, self.scheduler.now()) {
                    self.done = true;
                    return Poll::Ready(Grant::Refused(rejected));
                }
            }
            if core.free > 0 {
                core.free -= 1;
                self.done = true;
                return Poll::Ready(Grant::Slot(None));
            }
            if draining.is_cancelled() {
                self.done = true;
                return Poll::Ready(Grant::Draining);
            }
            let ticket = core.enqueue(key, pool, self.scheduler.now(), cx.waker().clone());
            self.ticket = Some(ticket);
            return Poll::Pending;
        };
        // A slot granted meanwhile is taken even when draining, as a free one is.
        if let Some(shared_at) = core.take_grant(ticket) {
            self.done = true;
            return Poll::Ready(Grant::Slot(shared_at));
        }
        if draining.is_cancelled() {
            // Not done: the drop leaves the queue.
            return Poll::Ready(Grant::Draining);
        }
        core.rewake(ticket, cx.waker());
        Poll::Pending
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let (Some(ticket), false) = (self.ticket, self.done) else {
            return;
        };
        let now = self.scheduler.now();
        let granted = self.scheduler.core().leave(ticket, now);
        if let Some(waker) = granted {
            waker.wake();
        }
    }
}

/// A queued call's handle: its entry in the slab, and its arrival number,
/// which tells it from a later call reusing the entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ticket {
    index: usize,
    seq: u64,
}

/// A queue's entry: the call's rank, then its arrival number (ties go to the
/// earlier arrival), then its slab entry. A call that left the queue stays in
/// the heap until popped or re-ranked, and is then skipped (its entry is gone
/// or reused: the arrival number no longer matches).
type Queued = Reverse<(Rank, u64, usize)>;

/// An `f64` rank with a total order.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rank(f64);

impl Eq for Rank {}

impl PartialOrd for Rank {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Rank {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// The factor a waiting call's virtual time is scaled by after it has waited
/// `waited` (a share of `max_wait`): 1 on arrival, barely lower for short
/// waits (quadratic in `waited` with `wait_weight`), and 0 from `max_wait` on.
fn boost(waited: f64, wait_weight: f64) -> f64 {
    let waited = waited.clamp(0.0, 1.0);
    (1.0 - waited) / wait_weight.mul_add(waited * waited, 1.0)
}

/// A queued call's entry in the slab.
#[derive(Debug)]
struct Waiter {
    seq: u64,
    key: Arc<str>,
    pool: Pool,
    /// When it queued.
    since: f64,
    state: WaitState,
}

#[derive(Debug)]
enum WaitState {
    /// In its pool's queue; woken when granted.
    Queued(Waker),
    /// Given a slot (with when, if granted under both pools' contention),
    /// not yet taken by its call.
    Granted(Option<f64>),
}

#[derive(Debug, Default)]
struct KeyEntry {
    /// Virtual time, inflated by `2^((now − epoch) / half-life)`.
    vt: f64,
    usage: Usage,
}

/// Calls running on slots granted under contention of both pools.
#[derive(Debug, Default, Clone, Copy)]
struct Running {
    count: u32,
    /// The sum of their grant times.
    since: f64,
}

impl Running {
    fn seconds(self, now: f64) -> f64 {
        f64::from(self.count) * now - self.since
    }
}

/// The scheduler's state; every time is in seconds since the scheduler started,
/// passed in, so the arithmetic is testable with any clock.
struct Core {
    settings: QosSettings,
    free: usize,
    /// Waiting calls by pool ([`Pool::index`]), possibly with some that left.
    queues: [BinaryHeap<Queued>; 2],
    /// How many calls really wait in each pool.
    queued: [usize; 2],
    /// Waiting and granted calls' state, by [`Ticket::index`].
    waiters: Vec<Option<Waiter>>,
    /// Free entries of `waiters`.
    vacant: Vec<usize>,
    keys: HashMap<Arc<str>, KeyEntry, BuildHasherDefault<KeyHasher>>,
    /// Execution time granted to each pool under contention, inflated like `vt`.
    pool_time: [f64; 2],
    running: [Running; 2],
    half_life: f64,
    max_wait: f64,
    /// When waiting calls are ranked again.
    next_rerank: f64,
    /// Time at which the inflation factor is 1.
    epoch: f64,
    next_sweep: f64,
    seq: u64,
    /// Keys flagged over the monopolization limit.
    monopolized: usize,
    max_waiting: usize,
    waited: u64,
    rejections: u64,
}

impl Core {
    fn new(settings: QosSettings) -> Self {
        let half_life = settings.decay.as_secs_f64().max(1e-3);
        let max_wait = settings.max_wait.as_secs_f64().max(1e-3);
        Self {
            free: settings.slots,
            settings,
            queues: [BinaryHeap::new(), BinaryHeap::new()],
            queued: [0; 2],
            waiters: Vec::new(),
            vacant: Vec::new(),
            keys: HashMap::default(),
            pool_time: [0.0; 2],
            running: [Running::default(); 2],
            half_life,
            max_wait,
            next_rerank: 0.0,
            epoch: 0.0,
            next_sweep: half_life / 4.0,
            seq: 0,
            monopolized: 0,
            max_waiting: 0,
            waited: 0,
            rejections: 0,
        }
    }

    /// The inflation factor at `now`.
    fn growth(&self, now: f64) -> f64 {
        ((now - self.epoch) / self.half_life).exp2()
    }

    /// A key's decayed virtual time at `now`.
    fn virtual_time(&self, key: &str, now: f64) -> f64 {
        self.keys
            .get(key)
            .map_or(0.0, |entry| entry.vt / self.growth(now))
    }

    /// Refuses a call of a key flagged over the monopolization limit, unless
    /// its share has fallen since.
    fn check(&mut self, key: &str, now: f64) -> Result<(), Rejected> {
        let Some(settings) = self.settings.monopolization else {
            return Ok(());
        };
        let Some(entry) = self.keys.get_mut(key) else {
            return Ok(());
        };
        if !entry.usage.over {
            return Ok(());
        }
        if !entry.usage.is_over(&settings, now) {
            self.monopolized = self.monopolized.saturating_sub(1);
            return Ok(());
        }
        self.rejections += 1;
        Err(Rejected {
            used: entry.usage.estimate(&settings, now),
            window: Duration::from_secs_f64(settings.window),
            warn: entry.usage.first_warning(&settings, now),
        })
    }

    /// Queues a call, to be woken through `waker` when granted a slot.
    fn enqueue(&mut self, key: &Arc<str>, pool: Pool, now: f64, waker: Waker) -> Ticket {
        let vt = self.virtual_time(key, now);
        self.seq += 1;
        let seq = self.seq;
        let waiter = Waiter {
            seq,
            key: Arc::clone(key),
            pool,
            since: now,
            state: WaitState::Queued(waker),
        };
        let index = match self.vacant.pop() {
            Some(index) => {
                self.waiters[index] = Some(waiter);
                index
            }
            None => {
                self.waiters.push(Some(waiter));
                self.waiters.len() - 1
            }
        };
        self.queues[pool.index()].push(Reverse((Rank(vt), seq, index)));
        self.queued[pool.index()] += 1;
        self.waited += 1;
        self.max_waiting = self.max_waiting.max(self.waiting());
        Ticket { index, seq }
    }

    /// The ticket's waiter, if it is still there.
    fn waiter(&mut self, ticket: Ticket) -> Option<&mut Waiter> {
        self.waiters
            .get_mut(ticket.index)
            .and_then(Option::as_mut)
            .filter(|waiter| waiter.seq == ticket.seq)
    }

    /// Frees a waiter's entry.
    fn remove(&mut self, ticket: Ticket) -> Option<Waiter> {
        self.waiter(ticket)?;
        self.vacant.push(ticket.index);
        self.waiters[ticket.index].take()
    }

    /// The grant of a queued call, taking it out of the slab, or `None` while
    /// it still waits.
    fn take_grant(&mut self, ticket: Ticket) -> Option<Option<f64>> {
        match self.waiter(ticket)?.state {
            WaitState::Granted(shared_at) => {
                self.remove(ticket);
                Some(shared_at)
            }
            WaitState::Queued(_) => None,
        }
    }

    /// Keeps the waker of a still-queued call current.
    fn rewake(&mut self, ticket: Ticket, waker: &Waker) {
        if let Some(Waiter {
            state: WaitState::Queued(current),
            ..
        }) = self.waiter(ticket)
        {
            current.clone_from(waker);
        }
    }

    /// A call gave up waiting: out of its queue, or, if it was granted a slot
    /// meanwhile, the slot goes to the next (whose waker is returned).
    fn leave(&mut self, ticket: Ticket, now: f64) -> Option<Waker> {
        let waiter = self.remove(ticket)?;
        match waiter.state {
            WaitState::Granted(shared_at) => self.abandon(waiter.pool, shared_at, now),
            WaitState::Queued(_) => {
                let pool = waiter.pool.index();
                self.queued[pool] -= 1;
                if self.queued[pool] == 0 {
                    // Only calls that left are in there.
                    self.queues[pool].clear();
                }
                None
            }
        }
    }

    /// Recomputes waiting calls' ranks from their keys' virtual time now (a key
    /// with several calls waiting, from several partitions, ran meanwhile) and
    /// the boost of their wait so far.
    ///
    /// Every [`RERANK_MIN`], or less often with many waiting so the work stays
    /// a small share of the time, and at least every `max_wait / 1000`.
    fn rerank(&mut self, now: f64) {
        let waiting = self.waiting();
        #[allow(clippy::cast_precision_loss)] // queue lengths are far below 2^52
        let interval = (waiting as f64 * RERANK_PER_WAITER)
            .max(RERANK_MIN)
            .min(self.max_wait / 1000.0);
        self.next_rerank = now + interval;
        if waiting == 0 {
            return;
        }
        let growth = self.growth(now);
        for pool in 0..self.queues.len() {
            // In place: the heap's buffer is re-ranked and re-heapified, and
            // calls that left are dropped.
            let mut queue = std::mem::take(&mut self.queues[pool]).into_vec();
            queue.retain_mut(|Reverse((rank, seq, index))| {
                let Some(waiter) = self.waiters[*index]
                    .as_ref()
                    .filter(|waiter| waiter.seq == *seq)
                else {
                    return false;
                };
                let vt = self
                    .keys
                    .get(&waiter.key)
                    .map_or(0.0, |entry| entry.vt / growth);
                let waited = (now - waiter.since) / self.max_wait;
                *rank = Rank(vt * boost(waited, self.settings.wait_weight));
                true
            });
            self.queues[pool] = BinaryHeap::from(queue);
        }
    }

    /// A call of `key` ran `ran` seconds until `now`: charge it, hand the slot
    /// on; returns the waker of the call it went to.
    fn release(
        &mut self,
        key: &Arc<str>,
        pool: Pool,
        ran: f64,
        shared_at: Option<f64>,
        now: f64,
    ) -> Option<Waker> {
        if now >= self.next_sweep {
            self.sweep(now);
        }
        let growth = self.growth(now);
        // A call shorter than the clock's tick usually measures 0: nothing to
        // charge, and no key to look up (see `clock`).
        if ran > 0.0 {
            self.charge(key, ran, growth, now);
        }
        if let Some(at) = shared_at {
            self.finish_shared(pool, at);
            self.pool_time[pool.index()] += (now - at) * growth;
        }
        self.hand_off(now)
    }

    /// Adds `ran` seconds ending at `now` to `key`'s virtual time and window.
    fn charge(&mut self, key: &Arc<str>, ran: f64, growth: f64, now: f64) {
        let monopolization = self.settings.monopolization;
        let charge = |entry: &mut KeyEntry| {
            entry.vt += ran * growth;
            let Some(settings) = &monopolization else {
                return false;
            };
            let over = entry.usage.add(settings, ran, now);
            let flagged = over && !entry.usage.over;
            entry.usage.over |= over;
            flagged
        };
        let flagged = match self.keys.get_mut(&**key) {
            Some(entry) => charge(entry),
            None => {
                let mut entry = KeyEntry::default();
                let flagged = charge(&mut entry);
                self.keys.insert(Arc::clone(key), entry);
                flagged
            }
        };
        if flagged {
            self.monopolized += 1;
        }
    }

    /// A waiter left after being granted a slot: give the slot to the next.
    fn abandon(&mut self, pool: Pool, shared_at: Option<f64>, now: f64) -> Option<Waker> {
        if let Some(at) = shared_at {
            self.finish_shared(pool, at);
        }
        self.hand_off(now)
    }

    fn finish_shared(&mut self, pool: Pool, at: f64) {
        let running = &mut self.running[pool.index()];
        running.count = running.count.saturating_sub(1);
        running.since -= at;
        if running.count == 0 {
            running.since = 0.0;
        }
    }

    /// Gives a freed slot to the first-ranked waiter of the pool whose turn it
    /// is (returning its waker), or marks it free.
    fn hand_off(&mut self, now: f64) -> Option<Waker> {
        if now >= self.next_rerank {
            self.rerank(now);
        }
        let (pool, shared) = match (self.queued[0] > 0, self.queued[1] > 0) {
            (false, false) => {
                self.free += 1;
                return None;
            }
            (true, false) => (Pool::Fresh, false),
            (false, true) => (Pool::Retry, false),
            (true, true) if self.retries_turn(now) => (Pool::Retry, true),
            (true, true) => (Pool::Fresh, true),
        };
        let shared_at = shared.then_some(now);
        // `queued` counts a live entry in this heap: the loop ends at it.
        while let Some(Reverse((_, seq, index))) = self.queues[pool.index()].pop() {
            let Some(waiter) = self.waiters[index]
                .as_mut()
                .filter(|waiter| waiter.seq == seq && matches!(waiter.state, WaitState::Queued(_)))
            else {
                continue; // it left
            };
            let WaitState::Queued(waker) =
                std::mem::replace(&mut waiter.state, WaitState::Granted(shared_at))
            else {
                continue;
            };
            self.queued[pool.index()] -= 1;
            if let Some(at) = shared_at {
                let running = &mut self.running[pool.index()];
                running.count += 1;
                running.since += at;
            }
            return Some(waker);
        }
        // Unreachable while the counts are right; a slot must never be lost.
        self.queued[pool.index()] = 0;
        self.hand_off(now)
    }

    /// Whether retries are under their share of contended execution time.
    fn retries_turn(&self, now: f64) -> bool {
        let growth = self.growth(now);
        let used = |pool: Pool| {
            self.pool_time[pool.index()] / growth + self.running[pool.index()].seconds(now)
        };
        let retries = used(Pool::Retry);
        let total = retries + used(Pool::Fresh);
        retries < self.settings.failure_share * total
    }

    /// Rebases inflated times to `now` and forgets keys with nothing left to say.
    fn sweep(&mut self, now: f64) {
        let factor = self.growth(now).recip();
        self.epoch = now;
        self.next_sweep = now + self.half_life / 4.0;
        for time in &mut self.pool_time {
            *time *= factor;
        }
        let monopolization = self.settings.monopolization;
        let mut monopolized = 0;
        self.keys.retain(|_, entry| {
            entry.vt *= factor;
            let usage_left = match &monopolization {
                Some(settings) => {
                    if entry.usage.over && entry.usage.is_over(settings, now) {
                        monopolized += 1;
                    }
                    !entry.usage.is_idle(settings, now)
                }
                None => false,
            };
            entry.vt >= EVICT_BELOW || usage_left
        });
        self.monopolized = monopolized;
    }

    fn waiting(&self) -> usize {
        self.queued[0] + self.queued[1]
    }

    fn stats(&self) -> QosStats {
        QosStats {
            waiting: self.waiting(),
            waiting_retries: self.queued[1],
            max_waiting: self.max_waiting,
            waited: self.waited,
            tracked_keys: self.keys.len(),
            rejections: self.rejections,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(slots: usize) -> QosSettings {
        QosSettings {
            slots,
            decay: Duration::from_secs(10),
            failure_share: 0.3,
            max_wait: Duration::from_secs(20),
            wait_weight: 0.0,
            monopolization: None,
        }
    }

    /// A core driven by hand: `take` a slot (or queue), `finish` a call.
    struct Harness {
        core: Core,
        queued: Vec<(Arc<str>, Pool, Ticket)>,
    }

    impl Harness {
        fn new(settings: QosSettings) -> Self {
            Self {
                core: Core::new(settings),
                queued: Vec::new(),
            }
        }

        /// True when the call got a slot at once.
        fn take(&mut self, key: &str, pool: Pool, now: f64) -> bool {
            if self.core.free > 0 {
                self.core.free -= 1;
                return true;
            }
            let ticket = self
                .core
                .enqueue(&Arc::from(key), pool, now, Waker::noop().clone());
            self.queued.push((Arc::from(key), pool, ticket));
            false
        }

        /// Ends a call of `key` that ran `ran` seconds until `now`; returns the
        /// call the slot went to, if any.
        fn finish(
            &mut self,
            key: &str,
            pool: Pool,
            ran: f64,
            shared_at: Option<f64>,
            now: f64,
        ) -> Option<(Arc<str>, Pool, Option<f64>)> {
            let woken = self
                .core
                .release(&Arc::from(key), pool, ran, shared_at, now);
            for index in 0..self.queued.len() {
                if let Some(shared_at) = self.core.take_grant(self.queued[index].2) {
                    assert!(woken.is_some(), "the granted call is woken");
                    let (key, pool, _) = self.queued.remove(index);
                    return Some((key, pool, shared_at));
                }
            }
            assert!(woken.is_none(), "only a granted call is woken");
            None
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9 * a.abs().max(1.0)
    }

    fn settings_for_bench() -> QosSettings {
        let mut settings = settings(32);
        settings.monopolization = Some(MonopolySettings::new(Duration::from_secs(300), 0.9));
        settings
    }

    /// A call its handler queued before running it is charged from its
    /// start (`Permit::restart`), not from its grant.
    #[tokio::test]
    async fn a_restarted_permit_charges_its_key_from_the_restart() {
        let scheduler = Arc::new(Scheduler::new(settings(2)));
        let draining = CancellationToken::new();
        let (queued, plain): (Arc<str>, Arc<str>) = (Arc::from("queued"), Arc::from("plain"));
        let mut first = scheduler.acquire(&queued, Pool::Fresh, &draining).await;
        let second = scheduler.acquire(&plain, Pool::Fresh, &draining).await;
        // Time passes on the coarse clock (4 ms ticks) while both hold slots.
        std::thread::sleep(Duration::from_millis(60));
        if let Some(Ok(permit)) = first.as_mut() {
            permit.restart();
        }
        drop((first, second));
        let now = scheduler.now();
        let core = scheduler.core();
        let (queued, plain) = (
            core.virtual_time(&queued, now),
            core.virtual_time(&plain, now),
        );
        assert!(plain >= 0.05, "the plain call ran ~60 ms: charged {plain}");
        assert!(
            queued < 0.02,
            "the restarted call ran ~0 ms: charged {queued}"
        );
    }

    /// Uncontended acquire + release against a tokio semaphore permit:
    /// `cargo test --release -p prosody --lib uncontended -- --ignored --nocapture`.
    #[tokio::test]
    #[ignore = "a measurement, not a check"]
    async fn uncontended_acquire_costs_about_a_semaphore_permit() {
        const CALLS: u32 = 1_000_000;
        let mut settings = settings(32);
        settings.monopolization = Some(MonopolySettings::new(Duration::from_secs(300), 0.9));
        let scheduler = Arc::new(Scheduler::new(settings));
        let keys: Vec<Arc<str>> = (0..1_000).map(|n| Arc::from(format!("key-{n}"))).collect();
        let semaphore = Arc::new(tokio::sync::Semaphore::new(32));
        let draining = CancellationToken::new();
        for round in 0..3 {
            let started = Instant::now();
            for n in 0..CALLS {
                let key = &keys[n as usize % keys.len()];
                let permit = scheduler.acquire(key, Pool::Fresh, &draining).await;
                drop(std::hint::black_box(permit));
            }
            let ours = started.elapsed() / CALLS;
            let started = Instant::now();
            for _ in 0..CALLS {
                let permit = Arc::clone(&semaphore).acquire_owned().await;
                drop(std::hint::black_box(permit));
            }
            let theirs = started.elapsed() / CALLS;
            let mut core = Core::new(settings_for_bench());
            let started = Instant::now();
            for n in 0..CALLS {
                let key = &keys[n as usize % keys.len()];
                core.free -= 1;
                core.release(key, Pool::Fresh, 1e-6, None, f64::from(n) * 1e-6);
            }
            let bare = started.elapsed() / CALLS;
            eprintln!("round {round}: scheduler {ours:?} per call (its core alone {bare:?}), semaphore {theirs:?}");
        }
    }

    #[test]
    fn virtual_time_halves_every_half_life_and_survives_rebasing() {
        let mut core = Core::new(settings(4));
        let key: Arc<str> = Arc::from("a");
        core.release(&key, Pool::Fresh, 8.0, None, 1.0);
        assert!(close(core.virtual_time("a", 1.0), 8.0));
        assert!(close(core.virtual_time("a", 11.0), 4.0));
        assert!(close(core.virtual_time("a", 21.0), 2.0));
        // A release past the next sweep rebases every key; the decay is unchanged.
        core.release(&Arc::from("b"), Pool::Fresh, 1.0, None, 31.0);
        assert!(core.epoch > 30.0);
        assert!(close(core.virtual_time("a", 31.0), 1.0));
        assert!(close(core.virtual_time("b", 31.0), 1.0));
        core.release(&key, Pool::Fresh, 3.0, None, 41.0);
        assert!(close(core.virtual_time("a", 41.0), 3.5));
    }

    #[test]
    fn decayed_keys_are_evicted() {
        let mut core = Core::new(settings(4));
        for n in 0..1_000 {
            core.release(&Arc::from(format!("k{n}")), Pool::Fresh, 0.01, None, 0.5);
        }
        assert_eq!(core.stats().tracked_keys, 1_000);
        // 0.01 s decays below 1 ms after log2(10) ≈ 3.3 half-lives.
        core.release(&Arc::from("late"), Pool::Fresh, 1.0, None, 40.0);
        assert_eq!(core.stats().tracked_keys, 1, "only the fresh key is left");
    }

    #[test]
    fn the_waiting_key_with_the_lowest_virtual_time_runs_next() {
        let mut harness = Harness::new(settings(1));
        // "hot" ran 5 s, "warm" 1 s; "cold" never ran.
        harness
            .core
            .release(&Arc::from("hot"), Pool::Fresh, 5.0, None, 1.0);
        harness
            .core
            .release(&Arc::from("warm"), Pool::Fresh, 1.0, None, 1.0);
        harness.core.free = 1;
        assert!(harness.take("busy", Pool::Fresh, 1.0));
        assert!(!harness.take("hot", Pool::Fresh, 1.0));
        assert!(!harness.take("warm", Pool::Fresh, 1.1));
        assert!(!harness.take("cold", Pool::Fresh, 1.2));
        let order: Vec<_> = (0..3)
            .filter_map(|_| harness.finish("busy", Pool::Fresh, 0.1, None, 1.3))
            .map(|(key, ..)| key.to_string())
            .collect();
        assert_eq!(order, ["cold", "warm", "hot"]);
        assert_eq!(harness.core.free, 0, "every freed slot went to a waiter");
    }

    #[test]
    fn a_waiting_call_ranks_ahead_of_every_arrival_after_max_wait() {
        let mut harness = Harness::new(settings(1));
        // "hot" has held a slot for a long time.
        for second in 0..100 {
            harness
                .core
                .release(&Arc::from("hot"), Pool::Fresh, 1.0, None, f64::from(second));
        }
        harness.core.free = 0;
        assert!(harness.core.virtual_time("hot", 100.0) > 10.0);
        assert!(!harness.take("hot", Pool::Fresh, 100.0));
        // A stream of never-seen keys, one arrival and one finished call per second.
        let mut ran_at = None;
        for second in 1..60 {
            let now = 100.0 + f64::from(second);
            assert!(!harness.take(&format!("cold{second}"), Pool::Fresh, now));
            if let Some((key, ..)) = harness.finish("other", Pool::Fresh, 1.0, None, now) {
                if &*key == "hot" {
                    ran_at = Some(now);
                    break;
                }
            }
        }
        let waited = ran_at.expect("the hot call ran") - 100.0;
        // max_wait is 20 s: the hot call ranks first once it has waited that long.
        assert!((19.0..=21.0).contains(&waited), "waited {waited} s");
    }

    /// How long a call of a key with ~14 s of virtual time waits for a slot
    /// while calls of keys with 1 s each keep arriving, one per second.
    fn hot_call_wait(wait_weight: f64) -> f64 {
        let mut harness = Harness::new(QosSettings {
            wait_weight,
            ..settings(1)
        });
        for second in 0..100 {
            harness
                .core
                .release(&Arc::from("hot"), Pool::Fresh, 1.0, None, f64::from(second));
        }
        harness.core.free = 0;
        assert!(!harness.take("hot", Pool::Fresh, 100.0));
        for second in 1..30 {
            let now = 100.0 + f64::from(second);
            let warm = format!("warm{second}");
            harness.core.charge(
                &Arc::from(warm.as_str()),
                1.0,
                harness.core.growth(now),
                now,
            );
            assert!(!harness.take(&warm, Pool::Fresh, now));
            if let Some((key, ..)) = harness.finish("other", Pool::Fresh, 1.0, None, now) {
                if &*key == "hot" {
                    return f64::from(second);
                }
            }
        }
        panic!("the hot call never ran");
    }

    #[test]
    fn the_wait_weight_lets_a_long_waiting_call_ahead_sooner() {
        // Scaled by 1 − f alone, ~14 s falls below 1 s at ~16 s of 20.
        let linear = hot_call_wait(0.0);
        assert!((14.0..=18.0).contains(&linear), "waited {linear} s");
        // With weight 200 the factor is 1/9 at a fifth of max_wait.
        let weighted = hot_call_wait(200.0);
        assert!((3.0..=6.0).contains(&weighted), "waited {weighted} s");
    }

    #[test]
    fn the_boost_is_one_on_arrival_and_zero_from_max_wait_on() {
        for weight in [0.0, 200.0] {
            assert!((boost(0.0, weight) - 1.0).abs() < f64::EPSILON);
            assert!(boost(1.0, weight).abs() < f64::EPSILON);
            assert!(boost(3.0, weight).abs() < f64::EPSILON);
        }
        // Short waits barely move the order: 1% of max_wait is worth 3%.
        assert!(boost(0.01, 200.0) > 0.97);
    }

    #[test]
    fn retries_get_their_share_of_contended_time_and_no_more() {
        let mut harness = Harness::new(settings(2));
        harness.core.free = 0;
        // A retry storm: many retries and many fresh calls wait, all equal in virtual time.
        let mut running: Vec<(Pool, Option<f64>)> = vec![(Pool::Fresh, None), (Pool::Fresh, None)];
        let mut now = 0.0;
        let mut time = [0.0_f64; 2];
        for n in 0..50 {
            let pool = if n % 2 == 0 { Pool::Fresh } else { Pool::Retry };
            harness.take(&format!("k{n}"), pool, now);
        }
        for n in 0..2_000 {
            now += 0.01;
            let (pool, shared_at) = running.remove(0);
            if let Some(at) = shared_at {
                time[pool.index()] += now - at;
            }
            let (_, next, shared_at) = harness
                .finish(&format!("r{n}"), pool, 0.02, shared_at, now)
                .expect("a waiter got the slot");
            running.push((next, shared_at));
            // Every pool keeps its waiters: a call granted is replaced by one alike.
            harness.take(&format!("k{n}"), next, now);
        }
        let share = time[1] / (time[0] + time[1]);
        assert!((0.25..=0.35).contains(&share), "retries took {share:.2}");
    }

    #[test]
    fn a_call_leaving_the_queue_is_found_after_a_re_ranking() {
        let mut core = Core::new(settings(0));
        core.release(&Arc::from("a"), Pool::Fresh, 1.0, None, 0.0);
        core.free = 0;
        let waker = Waker::noop();
        let a = core.enqueue(&Arc::from("a"), Pool::Fresh, 1.0, waker.clone());
        let b = core.enqueue(&Arc::from("b"), Pool::Fresh, 1.0, waker.clone());
        let c = core.enqueue(&Arc::from("c"), Pool::Fresh, 1.0, waker.clone());
        core.rerank(5.0);
        assert!(core.leave(a, 5.0).is_none());
        assert!(core.leave(b, 5.0).is_none());
        assert_eq!(core.stats().waiting, 1);
        // A later call reuses b's entry; b's stale place in the heap is skipped.
        let d = core.enqueue(&Arc::from("d"), Pool::Fresh, 6.0, waker.clone());
        assert_eq!(d.index, b.index);
        assert!(core
            .release(&Arc::from("x"), Pool::Fresh, 0.0, None, 7.0)
            .is_some());
        assert_eq!(core.take_grant(c), Some(None), "c queued first");
        assert_eq!(core.take_grant(d), None);
        // d leaves after being granted the next slot: it goes back to the free ones.
        assert!(core
            .release(&Arc::from("x"), Pool::Fresh, 0.0, None, 8.0)
            .is_some());
        assert!(core.leave(d, 8.0).is_none());
        assert_eq!((core.stats().waiting, core.free), (0, 1));
    }

    /// A call waiting for a slot ends once its partition drains (and
    /// `wake_all` runs); a call of another partition keeps waiting and gets
    /// the slot; no slot is lost.
    #[tokio::test]
    async fn a_waiting_call_ends_when_its_partition_drains() {
        let scheduler = Arc::new(Scheduler::new(settings(1)));
        let (key, other_key): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let (draining, other) = (CancellationToken::new(), CancellationToken::new());
        let held = scheduler
            .acquire(&key, Pool::Fresh, &draining)
            .await
            .expect("not draining")
            .expect("not monopolizing");
        let waiter = {
            let (scheduler, key, draining) =
                (Arc::clone(&scheduler), Arc::clone(&key), draining.clone());
            tokio::spawn(async move {
                scheduler
                    .acquire(&key, Pool::Fresh, &draining)
                    .await
                    .map(|permit| permit.is_ok())
            })
        };
        let bystander = {
            let (scheduler, key, other) = (
                Arc::clone(&scheduler),
                Arc::clone(&other_key),
                other.clone(),
            );
            tokio::spawn(async move {
                scheduler
                    .acquire(&key, Pool::Fresh, &other)
                    .await
                    .map(|permit| permit.is_ok())
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while scheduler.stats().waiting < 2 {
            assert!(Instant::now() < deadline, "both calls queue");
            tokio::task::yield_now().await;
        }
        draining.cancel();
        scheduler.wake_all();
        let drained = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the drained call ends")
            .expect("no panic");
        assert_eq!(drained, None);
        assert_eq!(
            scheduler.stats().waiting,
            1,
            "the other partition's call still waits"
        );
        drop(held);
        let granted = tokio::time::timeout(Duration::from_secs(5), bystander)
            .await
            .expect("the other call gets the slot")
            .expect("no panic");
        assert_eq!(granted, Some(true));
        assert_eq!(scheduler.core().free, 1, "the slot came back");
    }

    #[test]
    fn retries_take_every_slot_when_no_fresh_call_waits() {
        let mut harness = Harness::new(settings(1));
        harness.core.free = 0;
        for n in 0..5 {
            harness.take(&format!("r{n}"), Pool::Retry, 0.0);
        }
        for n in 0..5 {
            let (_, pool, shared_at) = harness
                .finish("x", Pool::Fresh, 1.0, None, f64::from(n))
                .expect("granted");
            assert_eq!((pool, shared_at), (Pool::Retry, None));
        }
    }

    #[test]
    fn a_monopolizing_key_is_refused_until_its_window_share_falls() {
        let mut settings = settings(4);
        settings.monopolization = Some(MonopolySettings::new(Duration::from_secs(10), 0.5));
        let mut core = Core::new(settings);
        let key: Arc<str> = Arc::from("hog");
        core.free -= 1;
        core.release(&key, Pool::Fresh, 4.0, None, 4.0);
        assert_eq!(core.monopolized, 0);
        assert!(core.check("hog", 4.0).is_ok());
        core.free -= 1;
        core.release(&key, Pool::Fresh, 2.0, None, 6.0);
        assert_eq!(core.monopolized, 1);
        let first = core.check("hog", 6.5).expect_err("refused");
        assert!(first.warn && close(first.used, 6.0));
        assert!(!core.check("hog", 7.0).expect_err("refused").warn);
        assert!(core.check("other", 7.0).is_ok());
        // The next window warns again; by 13 s only 70% of 6 s overlaps: 4.2 s ≤ 5 s.
        assert!(core.check("hog", 11.0).expect_err("refused").warn);
        assert!(core.check("hog", 13.0).is_ok());
        assert_eq!(core.monopolized, 0);
        assert_eq!(core.stats().rejections, 3);
        assert_eq!(core.free, 4);
    }
}
