//! Settling: running one message or due timer to a conclusion.
//!
//! Both go through one retry loop ([`PartitionManager::retry`]): each attempt
//! holds a concurrency permit only while the handler runs, a failure is
//! classified and `consumer/failure.rs` decides between another attempt after a
//! backoff and giving up. Giving up on a message dead-letters or skips it;
//! giving up on a timer logs it. Side effects that must not be lost (writing a
//! dead letter, deleting a fired timer) are retried until they succeed or the
//! partition is cancelled ([`PartitionManager::retry_until_cancelled`]).
//! A message failing transiently may be deferred instead of retried in place
//! (`defer.rs`).

mod defer;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, error, info, warn};

use super::{Fetched, PartitionManager};
use crate::consumer::dispatch::{Failure, FailureKind, Outcome};
use crate::consumer::failure::{backoff, dead_letter_headers, decide, Decision};
use crate::consumer::filter::{is_own, is_unwanted_type, Skip};
use crate::consumer::scheduler::{Permit, Pool, Rejected};
use crate::dedup::message_id;
use crate::events::{Event, EventKind};
use crate::handler::{from_millis, Context, KeyTimers};
use crate::message::{Message, Timer};
use crate::producer::SOURCE_SYSTEM_HEADER;
use crate::traces::{self, Position};
use defer::Behind;

/// Awaits `$future` within the span `$trace` when there is one.
///
/// Unlike an `async fn` wrapper, which holds its argument and the wrapped
/// future side by side, this keeps one copy of `$future` in the caller's
/// state: the key runner's future is allocated and moved per busy key, so its
/// size is a per-message cost.
macro_rules! traced {
    ($trace:expr, $future:expr) => {
        match $trace {
            Some(context) => opentelemetry::trace::FutureExt::with_context($future, context).await,
            None => $future.await,
        }
    };
}

/// A call's context, whose handler slot goes back to the scheduler when the
/// attempt ends however it ends (its future dropped too), unless the handler
/// gave it back already: a clone of the context may outlive the call (the Ruby
/// side keeps one until garbage collection).
struct Lent(Context);

impl Drop for Lent {
    fn drop(&mut self) {
        drop(self.0.take_slot());
    }
}

/// One handler invocation.
#[derive(Clone)]
enum Call {
    Message(Message),
    /// A timer and its time in ms since the epoch.
    Timer(Timer, i64),
}

impl Call {
    /// The handler method's name in logs.
    fn handler(&self) -> &'static str {
        match self {
            Self::Message(_) => "handler",
            Self::Timer(..) => "timer handler",
        }
    }

    fn noun(&self) -> &'static str {
        match self {
            Self::Message(_) => "message",
            Self::Timer(..) => "timer",
        }
    }

    fn offset(&self) -> Option<i64> {
        match self {
            Self::Message(message) => Some(message.offset),
            Self::Timer(..) => None,
        }
    }

    fn at(&self) -> Option<i64> {
        match self {
            Self::Message(_) => None,
            Self::Timer(_, at) => Some(*at),
        }
    }
}

impl Settled {
    /// Why the call failed, when it gave up.
    fn failure(&self) -> Option<&str> {
        match self {
            Self::GaveUp { failure, .. } => Some(&failure.message),
            _ => None,
        }
    }
}

/// How a call's attempts ended.
enum Settled {
    Succeeded,
    /// The mode's policy gave up after `attempts`, deciding `decision`.
    GaveUp {
        failure: Failure,
        attempts: u32,
        decision: Decision,
    },
    /// The partition stopped first: the work runs again under the next owner.
    Cancelled,
    /// Deferred (stored for a later retry): the message counts as finished.
    Deferred,
}

impl PartitionManager {
    /// Runs one message to a conclusion: success, dead letter or skip (true), or
    /// cancellation (false, the message will run again under the next owner).
    pub(super) async fn settle_message(&self, key: &Arc<str>, fetched: Fetched) -> bool {
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
                let decision = decide(&self.shared.config, failure.kind, 1);
                // Rare paths are boxed so the runner's future stays small (see `traced!`).
                return Box::pin(self.give_up(key, &fetched, &failure, 1, decision)).await;
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
            let seen = Box::pin(async {
                tokio::select! {
                    biased;
                    seen = dedup.seen(&self.topic, key, id) => Some(seen),
                    () = self.draining.cancelled() => None,
                }
            })
            .await;
            match seen {
                Some(true) => return self.skip(key, offset, Skip::Duplicate),
                Some(false) => {}
                None => return false,
            }
        }
        if self.defer.as_ref().is_some_and(|defer| defer.may_defer()) {
            match Box::pin(self.defer_behind(key, &fetched)).await {
                Behind::Run => {}
                Behind::Deferred => return true,
                Behind::Cancelled => return false,
            }
        }
        let trace = traces::process_span(
            &Position {
                topic: &self.topic,
                partition: self.partition,
                offset,
                key,
                group: self.shared.config.group_id.as_deref().unwrap_or_default(),
            },
            &fetched.headers,
            self.shared.config.message_spans,
        );
        let mut message = message;
        message.trace_parent = trace.as_ref().and_then(traces::traceparent).map(Arc::from);
        let settled = traced!(trace.clone(), self.retry(key, Call::Message(message)));
        if let Some(trace) = &trace {
            traces::end(trace, settled.failure());
        }
        match settled {
            Settled::Deferred => {
                if let Some(defer) = &self.defer {
                    defer.cache(fetched);
                }
                true
            }
            Settled::Succeeded => {
                if let (Some(dedup), Some(id)) = (&self.shared.dedup, &id) {
                    Box::pin(dedup.record(&self.topic, key, id)).await;
                }
                true
            }
            Settled::GaveUp {
                failure,
                attempts,
                decision,
            } => Box::pin(self.give_up(key, &fetched, &failure, attempts, decision)).await,
            Settled::Cancelled => false,
        }
    }

    /// Runs a due timer to a conclusion like [`settle_message`](Self::settle_message)
    /// does a message, then deletes it from the store (retrying while the store is
    /// down); false on cancellation (the timer stays stored and fires under the
    /// next owner).
    pub(super) async fn settle_timer(&self, key: &Arc<str>, at: i64) -> bool {
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
        let late = std::time::SystemTime::now()
            .duration_since(timer.time)
            .unwrap_or_default();
        let trace = traces::timer_span(
            &self.topic,
            self.partition,
            key,
            timers.trace_parent(key, at).as_deref(),
            self.shared.config.timer_spans,
        );
        let settled = traced!(trace.clone(), self.retry(key, Call::Timer(timer, at)));
        if let Some(trace) = &trace {
            traces::end(trace, settled.failure());
        }
        match settled {
            Settled::Succeeded => self.shared.metrics.timer_fired(self.labels(), late),
            Settled::Deferred => {}
            Settled::GaveUp {
                failure, attempts, ..
            } => error!(
                topic = %self.topic, partition = self.partition, key = %key, at, attempts,
                "giving up on timer after failure ({}): {}", failure.class, failure.message
            ),
            Settled::Cancelled => return false,
        }
        self.retry_until_cancelled(
            || timers.finished(key, at),
            |error, delay| warn!(topic = %self.topic, partition = self.partition, key = %key, at, "cannot delete a fired timer; retrying in {delay:?}: {error}"),
        )
        .await
    }

    /// Attempts `call` until it succeeds, the mode's policy gives up, or the
    /// partition stops. Waiting to retry holds no permit.
    async fn retry(&self, key: &Arc<str>, call: Call) -> Settled {
        let mut attempt = 0;
        // A retry's span links to the first attempt's.
        let mut first_span = None;
        loop {
            attempt += 1;
            let pool = if attempt == 1 {
                Pool::Fresh
            } else {
                Pool::Retry
            };
            let span = traces::attempt_span(call.handler(), attempt, first_span.as_ref());
            if attempt == 1 {
                first_span.clone_from(&span);
            }
            let attempted = traced!(
                span.clone(),
                self.attempt_with_permit(key, call.clone(), pool)
            );
            let Some((outcome, rejected)) = attempted else {
                return Settled::Cancelled;
            };
            if let (Some(defer), Some(_)) = (&self.defer, call.offset()) {
                defer.record(!matches!(outcome, Outcome::Succeeded));
            }
            if let Some(span) = &span {
                let failure = match &outcome {
                    Outcome::Failed(failure) => Some(failure.message.as_str()),
                    Outcome::Succeeded => None,
                };
                traces::end(span, failure);
            }
            let failure = match outcome {
                Outcome::Succeeded => {
                    if matches!(call, Call::Message(_)) {
                        self.metrics.handled();
                    }
                    return Settled::Succeeded;
                }
                Outcome::Failed(_) if self.cancellation.is_cancelled() => {
                    debug!(topic = %self.topic, partition = self.partition, offset = call.offset(), key = %key, at = call.at(), "handler stopped by cancellation; the {} will run again", call.noun());
                    return Settled::Cancelled;
                }
                Outcome::Failed(failure) => failure,
            };
            self.shared
                .metrics
                .failed(self.labels(), failure.kind.as_str());
            match decide(&self.shared.config, failure.kind, attempt) {
                Decision::Retry if rejected => {
                    let delay = backoff(&self.shared.config, attempt);
                    // Logged at WARN once per window by `attempt_with_permit`.
                    debug!(topic = %self.topic, partition = self.partition, offset = call.offset(), key = %key, at = call.at(), attempt, "{}; retrying in {delay:?}", failure.message);
                    if !self.wait_to_retry(delay).await {
                        return Settled::Cancelled;
                    }
                }
                Decision::Retry => {
                    self.shared.metrics.retried(self.labels());
                    if let Some(offset) = call.offset() {
                        self.observe_retry(key, offset, attempt, &failure);
                        if Box::pin(self.defer_failed(key, offset, attempt)).await {
                            return Settled::Deferred;
                        }
                    }
                    let delay = backoff(&self.shared.config, attempt);
                    warn!(
                        topic = %self.topic, partition = self.partition, offset = call.offset(), key = %key, at = call.at(), attempt, kind = failure.kind.as_str(),
                        "{} failed ({}): {}; retrying in {delay:?}", call.handler(), failure.class, failure.message
                    );
                    if !self.wait_to_retry(delay).await {
                        return Settled::Cancelled;
                    }
                }
                decision => {
                    return Settled::GaveUp {
                        failure,
                        attempts: attempt,
                        decision,
                    }
                }
            }
        }
    }

    /// Runs `operation` until it succeeds, reporting each failure with the
    /// backoff before the next try; false when the partition is cancelled first.
    async fn retry_until_cancelled<E, Fut>(
        &self,
        mut operation: impl FnMut() -> Fut,
        report: impl Fn(&E, Duration),
    ) -> bool
    where
        Fut: Future<Output = Result<(), E>>,
    {
        let mut tries = 0;
        loop {
            tries += 1;
            let Err(error) = operation().await else {
                return true;
            };
            let delay = backoff(&self.shared.config, tries);
            report(&error, delay);
            tokio::select! {
                () = self.cancellation.cancelled() => return false,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Counts a filtered message as done without running the handler.
    fn skip(&self, key: &str, offset: i64, skip: Skip) -> bool {
        if skip == Skip::OwnMessage && !self.own_skip_explained.swap(true, Ordering::Relaxed) {
            // Without this, a client that sends and consumes with the default
            // source_system sees its own messages vanish with only debug lines.
            info!(
                topic = %self.topic, partition = self.partition, offset, key,
                "skipping a message whose `{SOURCE_SYSTEM_HEADER}` header is this consumer's group_id: \
                 a group does not consume what it sent itself (loop prevention; source_system defaults \
                 to group_id). To consume these messages, give the sending client a source_system \
                 different from this group_id. Further skips on this partition are logged at debug \
                 level and counted in skip_counts"
            );
        } else {
            debug!(topic = %self.topic, partition = self.partition, offset, key, "skipping message: {}", skip.as_str());
        }
        self.shared.skips.count(skip);
        self.shared.metrics.skipped(self.labels(), skip.label());
        // Routine, not lifecycle: telemetry sends only the skips of failing
        // messages, so nothing is built for it per filtered message.
        self.shared
            .metrics
            .emit_routine(EventKind::MessageSkipped, || {
                Event::new(EventKind::MessageSkipped, Arc::clone(&self.topic))
                    .at(self.partition, Some(offset), Some(&Arc::from(key)))
                    .because(skip.label())
            });
        true
    }

    /// One attempt holding a handler slot of the scheduler only while the
    /// handler runs; `None` when the partition stops before a slot is free.
    /// A key monopolizing handler time is refused with a transient failure
    /// (true beside the outcome) without running the handler.
    async fn attempt_with_permit(
        &self,
        key: &Arc<str>,
        call: Call,
        pool: Pool,
    ) -> Option<(Outcome, bool)> {
        if self.draining.is_cancelled() {
            return None;
        }
        // Waiting registers nothing with `draining` (see `Scheduler::acquire`).
        let permit = match self
            .shared
            .scheduler
            .acquire(key, pool, &self.draining)
            .await?
        {
            Ok(permit) => permit,
            Err(rejected) => return Some((Outcome::Failed(self.rejected(key, &rejected)), true)),
        };
        Some((self.attempt(key, call, permit).await, false))
    }

    /// The transient failure of a call refused for monopolizing handler time,
    /// logged at WARN the first time per window.
    fn rejected(&self, key: &str, rejected: &Rejected) -> Failure {
        self.shared.metrics.monopolization_rejected();
        let window = rejected.window;
        let used = Duration::from_secs_f64(rejected.used);
        if rejected.warn {
            warn!(
                topic = %self.topic, partition = self.partition, key, ?used, ?window,
                "key monopolizes handler time: its handlers ran {used:.1?} of the last {window:?}, \
                 over monopolization_threshold; its calls are refused as transient failures \
                 until its share falls (logged once per window)"
            );
        }
        Failure {
            kind: FailureKind::Transient,
            class: self.shared.handler.failure_class(FailureKind::Transient),
            message: format!(
                "key monopolizes handler time ({used:.1?} of the last {window:?}); refused for now"
            ),
        }
    }

    /// Sleeps before a retry; false when the partition stops meanwhile.
    async fn wait_to_retry(&self, delay: Duration) -> bool {
        tokio::select! {
            () = self.draining.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }

    /// One handler call in the slot `permit`, cancelled once it overruns
    /// `timeout`. The handler may give the slot back before it ends
    /// ([`Context::take_slot`]); otherwise it goes back once the call ends.
    async fn attempt(&self, key: &Arc<str>, work: Call, permit: Permit) -> Outcome {
        let timers = self
            .timers
            .as_ref()
            .map(|timers| (Arc::clone(timers) as Arc<dyn KeyTimers>, Arc::clone(key)));
        let context = Context::new(Arc::clone(&self.calls_cancellation), timers);
        context.hold(permit);
        let call = Lent(context.clone());
        // A call its handler queues counts (and times out) from its start.
        let queued = self.shared.queues_ahead.then_some(&call.0);
        let running = match queued {
            Some(context) => self.metrics.handler_queued(context),
            None => self.metrics.handler_running(),
        };
        let offset = work.offset();
        let handler = match work {
            Call::Message(message) => self.shared.handler.on_message(context, message),
            Call::Timer(timer, _) => self.shared.handler.on_timer(context, timer),
        };
        tokio::pin!(handler);
        let timeout = self.shared.config.timeout;
        // Handler first, and the timer built only when polled: a handler that
        // finishes on its first poll never reads the clock or arms a timer.
        let outcome = tokio::select! {
            biased;
            outcome = &mut handler => outcome,
            () = overrun(timeout, queued) => {
                call.0.cancel();
                // The handler should stop promptly now; one that ignores cancellation
                // holds its key until the partition is released and abandons it.
                handler.await;
                Outcome::Failed(Failure {
                    kind: FailureKind::Timeout,
                    class: self.shared.handler.failure_class(FailureKind::Timeout),
                    message: format!("handler ran longer than the {timeout:?} timeout"),
                })
            }
        };
        let took = running.finish();
        drop(call);
        if let Some(offset) = offset {
            self.observe_attempt(key, offset, &outcome, took);
        }
        outcome
    }

    /// Tells the observer a message's failed attempt will be retried.
    fn observe_retry(&self, key: &Arc<str>, offset: i64, attempt: u32, failure: &Failure) {
        self.shared.metrics.emit(EventKind::MessageRetried, || {
            Event::new(EventKind::MessageRetried, Arc::clone(&self.topic))
                .at(self.partition, Some(offset), Some(key))
                .attempts(attempt)
                .because(failure.kind.as_str())
                .error(&failure.class, &failure.message)
        });
    }

    /// Reports a message's handler attempt to the observer, if it wants to know.
    fn observe_attempt(&self, key: &Arc<str>, offset: i64, outcome: &Outcome, took: Duration) {
        let kind = match outcome {
            Outcome::Succeeded => EventKind::MessageHandled,
            Outcome::Failed(_) => EventKind::MessageFailed,
        };
        self.shared.metrics.emit(kind, || {
            let event = Event::new(kind, Arc::clone(&self.topic))
                .at(self.partition, Some(offset), Some(key))
                .took(took);
            match outcome {
                Outcome::Succeeded => event,
                Outcome::Failed(failure) => event
                    .because(failure.kind.as_str())
                    .error(&failure.class, &failure.message),
            }
        });
    }

    fn decode(&self, key: &Arc<str>, fetched: &Fetched) -> Result<Message, Failure> {
        let bad_input = |message: String| Failure {
            kind: FailureKind::BadInput,
            class: self.shared.handler.failure_class(FailureKind::BadInput),
            message,
        };
        if let Err(unusable) = &fetched.key {
            return Err(bad_input(format!("unusable message: {}", unusable.problem)));
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
            trace_parent: None,
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
                topic = %self.topic, partition = self.partition, offset, key = fetched.shown_key(), attempts, kind = failure.kind.as_str(),
                "skipping message after failure ({}): {}", failure.class, failure.message
            );
            self.shared.metrics.skipped(self.labels(), "failed");
            self.observe_give_up(EventKind::MessageSkipped, fetched, failure, attempts);
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
        let written = self
            .retry_until_cancelled(
                || producer.send_bytes(topic, key, payload, &headers),
                |problem, delay| error!(topic = %self.topic, partition = self.partition, offset, failure_topic = topic, "cannot dead-letter message; retrying in {delay:?}: {problem}"),
            )
            .await;
        if written {
            self.shared.metrics.dead_lettered(self.labels());
            self.observe_give_up(EventKind::MessageDeadLettered, fetched, failure, attempts);
            warn!(
                topic = %self.topic, partition = self.partition, offset, key = fetched.shown_key(), attempts, kind = failure.kind.as_str(),
                failure_topic = topic, "message dead-lettered after failure ({}): {}", failure.class, failure.message
            );
        }
        written
    }

    /// Reports a message whose retries ended to the observer, if it wants to know.
    fn observe_give_up(
        &self,
        kind: EventKind,
        fetched: &Fetched,
        failure: &Failure,
        attempts: u32,
    ) {
        self.shared.metrics.emit(kind, || {
            let reason = if kind == EventKind::MessageSkipped {
                "failed"
            } else {
                failure.kind.as_str()
            };
            Event::new(kind, Arc::clone(&self.topic))
                .at(
                    self.partition,
                    Some(fetched.offset),
                    fetched.key.as_ref().ok(),
                )
                .attempts(attempts)
                .because(reason)
                .error(&failure.class, &failure.message)
        });
    }
}

/// Waits until a call has run for `timeout`: from now, or for a call its
/// handler queued (`queued`, see [`crate::EventHandler::queue_ahead`]) from
/// when the handler started it. A queued call not started yet has not begun
/// to run, so its timeout has not begun either: it is looked at again a
/// `timeout` later.
async fn overrun(timeout: Duration, queued: Option<&Context>) {
    tokio::time::sleep(timeout).await;
    let Some(context) = queued else { return };
    loop {
        let left = context
            .started_at()
            .map_or(timeout, |started| timeout.saturating_sub(started.elapsed()));
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left).await;
    }
}
