//! The handler contract: what user code implements and what it receives.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::consumer::scheduler::Permit;
use crate::error::{Error, Result};
use crate::message::{Message, Timer};

/// Tells Prosody whether a handler error is worth retrying.
///
/// The default says "transient": retrying might succeed. Return `true` from
/// [`is_permanent`](Self::is_permanent) for errors that will fail the same way
/// every time (bad data, a rejected request).
pub trait ClassifyError {
    /// True when retrying the same message cannot succeed.
    fn is_permanent(&self) -> bool {
        false
    }

    /// The error's class as logs and dead-letter headers show it; the type name by default.
    fn class_name(&self) -> String {
        std::any::type_name::<Self>().to_owned()
    }
}

impl ClassifyError for std::convert::Infallible {}

/// How a handler call failed, as logs (`kind`) and dead-letter headers
/// (`prosody-failure-kind`) report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureKind {
    /// The handler returned an error that is not permanent: retrying may succeed.
    Transient,
    /// The handler returned a permanent error: retrying cannot succeed.
    Permanent,
    /// The handler overran `timeout` (retried like a transient failure).
    Timeout,
    /// The message itself is unusable (no key, not JSON): never retried.
    BadInput,
}

impl FailureKind {
    /// The kind as logs and the `prosody-failure-kind` header spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transient => "transient",
            Self::Permanent => "permanent",
            Self::Timeout => "timeout",
            Self::BadInput => "bad-input",
        }
    }

    pub(crate) fn is_permanent(self) -> bool {
        matches!(self, Self::Permanent | Self::BadInput)
    }
}

/// User code that processes messages.
///
/// Prosody calls [`on_message`](Self::on_message) for every message, concurrently
/// for different keys and strictly one after another for the same key of a partition.
///
/// ```no_run
/// use prosody::{ClassifyError, Context, EventHandler, Message};
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("downstream unavailable")]
/// struct Unavailable;
/// impl ClassifyError for Unavailable {}
///
/// struct Printer;
///
/// impl EventHandler for Printer {
///     type Error = Unavailable;
///
///     async fn on_message(&self, _context: Context, message: Message) -> Result<(), Unavailable> {
///         println!("{} {}: {}", message.key(), message.offset(), message.payload());
///         Ok(())
///     }
/// }
/// ```
pub trait EventHandler: Send + Sync + 'static {
    /// The handler's error; its [`ClassifyError`] decides retries.
    type Error: std::error::Error + ClassifyError + Send + Sync + 'static;

    /// Processes one message. Watch `context` for cancellation on long work.
    fn on_message(
        &self,
        context: Context,
        message: Message,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Handles a timer scheduled with [`Context::schedule`]; it runs through the
    /// key's queue, never at the same time as a message or timer of that key.
    /// The timer is deleted once this returns `Ok`. Does nothing by default.
    fn on_timer(
        &self,
        context: Context,
        timer: Timer,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        let _ = (context, timer);
        async { Ok(()) }
    }

    /// Whether this handler can still run calls; true by default. Return false
    /// once it never can again (the thread that runs its calls died): the
    /// consumer then counts as stalled at once, so `/livez` answers 503 and an
    /// orchestrator restarts the process instead of it retrying forever.
    fn is_alive(&self) -> bool {
        true
    }

    /// The class name logs and dead-letter headers (`prosody-error-class`) give
    /// a failure Prosody found itself rather than one this handler returned:
    /// [`FailureKind::Timeout`] or [`FailureKind::BadInput`]. The kind's name
    /// by default; a language binding names its own error classes here.
    fn failure_class(&self, kind: FailureKind) -> String {
        kind.as_str().to_owned()
    }

    /// How many calls beyond `max_concurrency` this handler takes before it
    /// runs them; none by default (each call it is given runs at once).
    ///
    /// For handlers that run calls on a thread of their own, fed by a queue
    /// (the Ruby gem's processor): with calls already waiting there, a
    /// finished call's successor starts at once instead of after a round trip
    /// through the consumer's tasks and a wake-up of that thread. Such a
    /// handler must itself run at most `max_concurrency` calls at once, and
    /// call [`Context::start`] as each one starts: the call's timeout and the
    /// run time charged to its key (fair scheduling, monopolization, the
    /// handler duration metric) count from there, not from when it was queued.
    fn queue_ahead(&self, max_concurrency: usize) -> usize {
        let _ = max_concurrency;
        0
    }
}

/// A boxed future of the timer calls [`Context`] makes.
pub(crate) type TimersFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// The timers of the partition a call runs for, as [`Context`] reaches them
/// (times in ms since the epoch). The consumer's per-partition timer queue
/// implements it; a trait, so the handler contract does not depend on the consumer.
pub(crate) trait KeyTimers: Send + Sync {
    /// Adds a timer for `key` at `at_ms`, keeping `trace_parent` (the
    /// scheduling call's span) for its firing's span.
    fn schedule<'a>(
        &'a self,
        key: &'a Arc<str>,
        at_ms: i64,
        trace_parent: Option<&'a Arc<str>>,
    ) -> TimersFuture<'a, ()>;
    /// Replaces every timer of `key` with one at `at_ms`, keeping `trace_parent`.
    fn clear_and_schedule<'a>(
        &'a self,
        key: &'a Arc<str>,
        at_ms: i64,
        trace_parent: Option<&'a Arc<str>>,
    ) -> TimersFuture<'a, ()>;
    /// Removes `key`'s timer at `at_ms`, if there is one.
    fn unschedule<'a>(&'a self, key: &'a Arc<str>, at_ms: i64) -> TimersFuture<'a, ()>;
    /// Removes every timer of `key`.
    fn clear<'a>(&'a self, key: &'a Arc<str>) -> TimersFuture<'a, ()>;
    /// `key`'s timers, earliest first.
    fn scheduled<'a>(&'a self, key: &'a Arc<str>) -> TimersFuture<'a, Vec<i64>>;
}

/// A call's key and its partition's timers.
pub(crate) type KeyTimerHandle = (Arc<dyn KeyTimers>, Arc<str>);

/// Per-call context: cancellation, the timers of the call's key, and the
/// attempt's trace context.
#[derive(Clone)]
pub struct Context {
    call: Arc<CallCancellation>,
    timers: Option<KeyTimerHandle>,
    trace_parent: Option<Arc<str>>,
}

/// One call's cancellation: its partition's token, or the call's own stop
/// (its timeout). The call's own token, a child of the partition's, is only
/// made when a handler asks for it: most calls never do, and making and
/// dropping one locks the partition token's tree (once each) for every call.
struct CallCancellation {
    /// The partition's token, shared by its calls (an `Arc`, as cloning a
    /// token locks its tree).
    partition: Arc<CancellationToken>,
    /// Set when the call itself is cancelled (it ran past its timeout).
    stopped: AtomicBool,
    /// Wakes [`Context::on_cancel`] when `stopped` is set.
    stop: Notify,
    /// The call's token, once asked for.
    token: OnceLock<CancellationToken>,
    /// The call's handler slot while the consumer holds it for the call (see
    /// [`Context::take_slot`]). Here rather than in an allocation of its own:
    /// this one is made per call anyway.
    slot: Mutex<Option<Permit>>,
    /// When a handler that queues calls ahead started this one
    /// ([`Context::start`]): nanoseconds since [`origin`] plus one; 0 until
    /// then, [`ENDED`] once the consumer stopped counting the call unstarted.
    started: AtomicU64,
    /// The running-handlers gauge the call joins when it starts (a queued call).
    in_flight: OnceLock<Gauge>,
}

/// [`CallCancellation::started`] of a call that ended before it started.
const ENDED: u64 = u64::MAX;

/// The instant [`CallCancellation::started`] counts from.
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// A call's handler slot, one of `max_concurrency`, taken out of its context
/// with [`Context::take_slot`]. Dropping it gives the slot to the next call
/// waiting for one, and ends the time charged to the call's key.
#[must_use = "dropping the slot gives it to the next waiting call"]
pub struct HandlerSlot {
    /// Held for its `Drop`, which gives the slot back.
    _permit: Permit,
}

impl std::fmt::Debug for HandlerSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HandlerSlot")
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("cancelled", &self.should_cancel())
            .field("key", &self.timers.as_ref().map(|(_, key)| key))
            .finish()
    }
}

impl Context {
    /// A call's context under its partition's token. Built inside the
    /// attempt's span, whose trace context it keeps for handlers that run
    /// elsewhere (the Ruby processor thread).
    pub(crate) fn new(partition: Arc<CancellationToken>, timers: Option<KeyTimerHandle>) -> Self {
        Self {
            call: Arc::new(CallCancellation {
                partition,
                stopped: AtomicBool::new(false),
                stop: Notify::new(),
                token: OnceLock::new(),
                slot: Mutex::new(None),
                started: AtomicU64::new(0),
                in_flight: OnceLock::new(),
            }),
            timers,
            trace_parent: crate::traces::current_traceparent().map(Arc::from),
        }
    }

    /// Lends the call the handler slot it runs in, until the call ends or
    /// [`take_slot`](Self::take_slot) takes it.
    pub(crate) fn hold(&self, permit: Permit) {
        *self.slot() = Some(permit);
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Permit>> {
        // A panic while holding this lock leaves an Option behind; keep going.
        self.call
            .slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes this call's handler slot (one of `max_concurrency`), so that the
    /// next waiting call may start as soon as the slot is dropped, before
    /// this call's future has been polled to its end.
    ///
    /// For handlers whose work runs elsewhere (another thread or runtime) and
    /// whose future only waits for the result: take the slot when the work
    /// has finished and drop it where it finished. The time between the work
    /// finishing and the consumer's task seeing the result then no longer
    /// holds a slot. Taking it earlier lets more handlers run at once than
    /// `max_concurrency` allows. `None` once taken, or when the call's slot
    /// was already given back (the call ended).
    pub fn take_slot(&self) -> Option<HandlerSlot> {
        self.slot()
            .take()
            .map(|permit| HandlerSlot { _permit: permit })
    }

    /// Says this call starts running now: for handlers that take calls
    /// before they run them ([`EventHandler::queue_ahead`]). The call's
    /// timeout and the run time charged to its key count from the first
    /// `start`; later ones do nothing. Other handlers need not call it.
    pub fn start(&self) {
        let now = Instant::now();
        // Past u64 nanoseconds after 584 years; saturate rather than wrap.
        let since = u64::try_from(now.duration_since(origin()).as_nanos()).unwrap_or(ENDED - 2);
        let first = self
            .call
            .started
            .compare_exchange(0, since + 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first {
            if let Some(permit) = self.slot().as_mut() {
                permit.restart();
            }
            if let Some(in_flight) = self.call.in_flight.get() {
                in_flight.inc();
            }
        }
    }

    /// When [`start`](Self::start) was first called, if it was.
    pub(crate) fn started_at(&self) -> Option<Instant> {
        Self::instant(self.call.started.load(Ordering::Acquire))
    }

    fn instant(started: u64) -> Option<Instant> {
        match started {
            0 | ENDED => None,
            since => Some(origin() + Duration::from_nanos(since - 1)),
        }
    }

    /// Makes [`start`](Self::start) add this call to `in_flight` (a call its
    /// handler queued, counted as running only once it starts).
    pub(crate) fn count_running_in(&self, in_flight: &Gauge) {
        let _ = self.call.in_flight.set(in_flight.clone());
    }

    /// The call ends for the running-handlers count: when it started, if it
    /// did (its count is then the caller's to take back); a call not started
    /// by now is never counted, even if its handler starts it later.
    pub(crate) fn end_running_count(&self) -> Option<Instant> {
        match self
            .call
            .started
            .compare_exchange(0, ENDED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => None,
            Err(started) => Self::instant(started),
        }
    }

    /// The W3C `traceparent` of this handler attempt's span, when tracing is
    /// on: pass it as the `traceparent` header of a send made outside this
    /// call's task (another thread, another runtime) to continue the trace.
    /// Sends from within the call continue it without this.
    pub fn trace_parent(&self) -> Option<&str> {
        self.trace_parent.as_deref()
    }

    /// Cancels this call alone (its timeout passed); the handler sees it as
    /// it sees a revoke.
    pub(crate) fn cancel(&self) {
        // SeqCst pairs with `cancellation_token`: either it sees `stopped`, or
        // this sees its token.
        self.call.stopped.store(true, Ordering::SeqCst);
        self.call.stop.notify_waiters();
        if let Some(token) = self.call.token.get() {
            token.cancel();
        }
    }

    fn timers(&self) -> Result<(&dyn KeyTimers, &Arc<str>)> {
        match &self.timers {
            Some((queue, key)) => Ok((&**queue, key)),
            None => Err(Error::config(
                "database_url",
                "timers need a store: set database_url (or state_store: memory to accept timers that do not survive a restart)",
            )),
        }
    }

    /// Schedules a timer for this call's key at `time` (a time in the past fires promptly).
    ///
    /// When this call is traced, the timer's firing span is a child of this
    /// call's span or linked to it (option `timer_spans`).
    pub async fn schedule(&self, time: SystemTime) -> Result<()> {
        let (queue, key) = self.timers()?;
        queue
            .schedule(key, to_millis(time), self.trace_parent.as_ref())
            .await
    }

    /// Replaces all of this key's timers with one at `time`, traced like
    /// [`schedule`](Self::schedule)'s.
    pub async fn clear_and_schedule(&self, time: SystemTime) -> Result<()> {
        let (queue, key) = self.timers()?;
        queue
            .clear_and_schedule(key, to_millis(time), self.trace_parent.as_ref())
            .await
    }

    /// Removes this key's timer at `time`, if there is one.
    pub async fn unschedule(&self, time: SystemTime) -> Result<()> {
        let (queue, key) = self.timers()?;
        queue.unschedule(key, to_millis(time)).await
    }

    /// Removes all of this key's timers.
    pub async fn clear_scheduled(&self) -> Result<()> {
        let (queue, key) = self.timers()?;
        queue.clear(key).await
    }

    /// This key's pending timers, earliest first.
    pub async fn scheduled(&self) -> Result<Vec<SystemTime>> {
        let (queue, key) = self.timers()?;
        Ok(queue
            .scheduled(key)
            .await?
            .into_iter()
            .map(from_millis)
            .collect())
    }

    /// True once the partition was revoked, the client is shutting down, or the deadline passed.
    pub fn should_cancel(&self) -> bool {
        self.call.stopped.load(Ordering::SeqCst) || self.call.partition.is_cancelled()
    }

    /// Resolves when the call should stop. Needs no token of its own (see
    /// [`cancellation_token`](Self::cancellation_token)), so it is the cheap
    /// way to wait for cancellation beside a call's work.
    pub async fn on_cancel(&self) {
        let call = &*self.call;
        // Made before `stopped` is read: `cancel` stores it, then notifies
        // every `Notified` made so far, polled or not.
        let stopped = call.stop.notified();
        if call.stopped.load(Ordering::SeqCst) {
            return;
        }
        tokio::select! {
            // Either ends the wait; a fixed order skips the random pick.
            biased;
            () = call.partition.cancelled() => {}
            () = stopped => {}
        }
    }

    /// The token behind [`should_cancel`](Self::should_cancel), for `select!` and child tasks.
    pub fn cancellation_token(&self) -> &CancellationToken {
        let call = &*self.call;
        let token = call.token.get_or_init(|| call.partition.child_token());
        if call.stopped.load(Ordering::SeqCst) {
            token.cancel();
        }
        token
    }
}

/// Milliseconds since the Unix epoch (negative before it), the timer stores' unit.
pub(crate) fn to_millis(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

pub(crate) fn from_millis(millis: i64) -> SystemTime {
    let magnitude = Duration::from_millis(millis.unsigned_abs());
    if millis >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_cancelled_alone_cancels_its_token_whenever_it_is_asked_for() {
        let partition = Arc::new(CancellationToken::new());
        let early = Context::new(Arc::clone(&partition), None);
        let token = early.cancellation_token().clone();
        let late = Context::new(Arc::clone(&partition), None);
        let other = Context::new(Arc::clone(&partition), None);
        assert!(!early.should_cancel() && !token.is_cancelled());
        early.cancel();
        late.cancel();
        assert!(early.should_cancel() && token.is_cancelled());
        // Asked for only after the call was cancelled: born cancelled.
        assert!(late.should_cancel() && late.cancellation_token().is_cancelled());
        // Other calls of the partition go on; the partition's token is untouched.
        assert!(!other.should_cancel() && !partition.is_cancelled());
        partition.cancel();
        assert!(other.should_cancel() && other.cancellation_token().is_cancelled());
    }

    /// `on_cancel` makes no token of its own, so it must hear both ways a
    /// call is cancelled by itself, whether it waits already or comes late.
    #[tokio::test]
    async fn on_cancel_wakes_on_the_calls_own_stop_and_on_its_partitions() {
        let within = |context: &Context| {
            let context = context.clone();
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(5), context.on_cancel()).await
            })
        };
        let partition = Arc::new(CancellationToken::new());
        let stopped = Context::new(Arc::clone(&partition), None);
        let other = Context::new(Arc::clone(&partition), None);
        let (waiting_stopped, waiting_other) = (within(&stopped), within(&other));
        tokio::task::yield_now().await;
        stopped.cancel();
        assert!(
            waiting_stopped.await.expect("task").is_ok(),
            "a stop wakes its call"
        );
        assert!(
            !waiting_other.is_finished(),
            "another call of the partition waits on"
        );
        partition.cancel();
        assert!(
            waiting_other.await.expect("task").is_ok(),
            "the partition's cancel wakes it"
        );
        // Asked after the fact: resolves at once.
        assert!(within(&stopped).await.expect("task").is_ok());
        assert!(stopped.call.token.get().is_none(), "no token was made");
    }
}
