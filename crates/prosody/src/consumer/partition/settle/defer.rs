//! The partition's side of deferred retry (see `consumer/defer/`): deferring a
//! failing message, deferring a deferred key's later messages behind it, and
//! running a key's deferred messages again when their retry is due.
//!
//! All of it runs in the key's runner, so a key's deferred retries never run
//! alongside its other work, and its messages keep their order.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{error, info, warn};

use super::super::{Fetched, PartitionManager, Work};
use super::Call;
use crate::consumer::defer::reload::ReloadError;
use crate::consumer::defer::DeferQueue;
use crate::consumer::dispatch::Outcome;
use crate::consumer::failure::{decide, defer_backoff, Decision};
use crate::consumer::filter::Skip;
use crate::consumer::scheduler::Pool;
use crate::dedup::message_id;
use crate::handler::to_millis;
use crate::message::Message;
use crate::traces::{self, Position};
use opentelemetry::trace::FutureExt as _;
use opentelemetry::Context;

/// What to do with a fresh message of a key that may be deferred.
pub(super) enum Behind {
    /// Run it: deferral is off or its key has nothing deferred.
    Run,
    /// Deferred behind its key's deferred messages: it counts as finished.
    Deferred,
    /// The partition stopped first.
    Cancelled,
}

impl PartitionManager {
    /// Queues a key whose first deferred message is due (from `DeferQueue::run`).
    pub(crate) fn accept_deferred(self: &Arc<Self>, key: Arc<str>) {
        let kick = {
            let mut state = self.state();
            if self.is_open(&state) {
                self.enqueue(&mut state, key, Work::Deferred)
            } else {
                super::super::Kick::None
            }
        };
        self.kick(kick);
    }

    /// Before a fresh message runs: when its key has deferred messages, the
    /// message is deferred behind them (stored, retried until it is), so the
    /// key keeps its order while its offset is finished.
    pub(super) async fn defer_behind(&self, key: &Arc<str>, fetched: &Fetched) -> Behind {
        let offset = fetched.offset;
        let Some(defer) = self.defer.as_ref().filter(|defer| defer.may_defer()) else {
            return Behind::Run;
        };
        if !defer.wait_loaded(&self.draining).await {
            return Behind::Cancelled;
        }
        if !defer.is_deferred(key) {
            return Behind::Run;
        }
        if defer.contains(key, offset) {
            // Came again after a rebalance before its offset was committed.
            return Behind::Deferred;
        }
        let stored = self
            .retry_until_cancelled(
                || defer.defer(key, offset, 0, 0),
                |error, delay| warn!(topic = %self.topic, partition = self.partition, offset, key = %key, "cannot store a message deferred behind its key; retrying in {delay:?}: {error}"),
            )
            .await;
        if stored {
            self.shared.metrics.deferred(self.labels());
            defer.cache(fetched.clone());
            Behind::Deferred
        } else {
            Behind::Cancelled
        }
    }

    /// After a transient failure of a fresh message: defers it instead of
    /// retrying in place, if deferral is on and the gate open, with the
    /// deferral backoff (`defer_base`). False means retry in place (as without
    /// deferral).
    pub(super) async fn defer_failed(&self, key: &Arc<str>, offset: i64, attempt: u32) -> bool {
        let Some(defer) = self.defer.as_ref() else {
            return false;
        };
        if !defer.gate_is_open() {
            return false;
        }
        let delay = defer_backoff(&self.shared.config, attempt);
        let retry_at = to_millis(SystemTime::now() + delay);
        match defer.defer(key, offset, attempt, retry_at).await {
            Ok(()) => {
                self.shared.metrics.deferred(self.labels());
                info!(topic = %self.topic, partition = self.partition, offset, key = %key, attempt, "deferred the message; retrying in {delay:?}, the key's later messages wait behind it");
                true
            }
            Err(error) => {
                warn!(topic = %self.topic, partition = self.partition, offset, key = %key, "cannot store the deferred message; retrying it in place: {error}");
                false
            }
        }
    }

    /// Runs `key`'s deferred messages in order until one fails again (it is
    /// then due after the mode's backoff) or none is left; false on cancellation
    /// (the stored state stays for the next owner).
    pub(in crate::consumer::partition) async fn settle_deferred(&self, key: &Arc<str>) -> bool {
        let Some(defer) = self.defer.as_ref() else {
            return true;
        };
        let settled = self.run_deferred(defer, key).await;
        defer.settled(key);
        settled
    }

    async fn run_deferred(&self, defer: &DeferQueue, key: &Arc<str>) -> bool {
        let config = &self.shared.config;
        while let Some((offset, tried)) = defer.head(key) {
            let reloaded = match defer.cached(offset) {
                Some(fetched) => Ok(fetched),
                None => tokio::select! {
                    biased;
                    () = self.draining.cancelled() => return false,
                    reloaded = self.shared.reloader.fetch(&self.topic, self.partition, offset) => reloaded,
                },
            };
            let attempt = tried + 1;
            let fetched = match reloaded {
                Ok(fetched) => fetched,
                Err(gone @ ReloadError::Gone { .. }) => {
                    error!(topic = %self.topic, partition = self.partition, offset, key = %key, "dropping a deferred message: {gone}");
                    if !self.forget_deferred(defer, key, offset).await {
                        return false;
                    }
                    continue;
                }
                Err(problem) => {
                    let delay = defer_backoff(config, attempt);
                    warn!(topic = %self.topic, partition = self.partition, offset, key = %key, "cannot read a deferred message back; retrying in {delay:?}: {problem}");
                    return self.back_off(defer, key, offset, tried, delay).await;
                }
            };
            let message = match self.decode(key, &fetched) {
                Ok(message) => message,
                Err(failure) => {
                    let decision = decide(config, failure.kind, attempt);
                    if !self
                        .give_up(key, &fetched, &failure, attempt, decision)
                        .await
                        || !self.forget_deferred(defer, key, offset).await
                    {
                        return false;
                    }
                    continue;
                }
            };
            let id = self
                .shared
                .dedup
                .as_ref()
                .and_then(|_| message_id(message.payload()));
            if let (Some(dedup), Some(id)) = (&self.shared.dedup, &id) {
                // Deferred behind an earlier copy that has run since.
                if dedup.seen(&self.topic, key, id).await {
                    self.skip(key, offset, Skip::Duplicate);
                    if !self.forget_deferred(defer, key, offset).await {
                        return false;
                    }
                    continue;
                }
            }
            // A deferred retry is a retry: it takes its share of handler time from the
            // scheduler's retry pool. A refusal for monopolizing handler time is an
            // ordinary transient failure here, which backs off again.
            let attempted = self.traced_retry(key, &fetched, message, attempt).await;
            let Some((outcome, _rejected)) = attempted else {
                return false;
            };
            let failure = match outcome {
                Outcome::Succeeded => {
                    self.metrics.handled();
                    if let (Some(dedup), Some(id)) = (&self.shared.dedup, &id) {
                        dedup.record(&self.topic, key, id).await;
                    }
                    if !self.forget_deferred(defer, key, offset).await {
                        return false;
                    }
                    continue;
                }
                Outcome::Failed(_) if self.cancellation.is_cancelled() => return false,
                Outcome::Failed(failure) => failure,
            };
            self.shared
                .metrics
                .failed(self.labels(), failure.kind.as_str());
            match decide(config, failure.kind, attempt) {
                Decision::Retry => {
                    let delay = defer_backoff(config, attempt);
                    self.shared.metrics.retried(self.labels());
                    self.observe_retry(key, offset, attempt, &failure);
                    warn!(
                        topic = %self.topic, partition = self.partition, offset, key = %key, attempt, kind = failure.kind.as_str(),
                        "deferred message failed again ({}): {}; retrying in {delay:?}", failure.class, failure.message
                    );
                    defer.cache(fetched);
                    return self.back_off(defer, key, offset, attempt, delay).await;
                }
                decision => {
                    if !self
                        .give_up(key, &fetched, &failure, attempt, decision)
                        .await
                        || !self.forget_deferred(defer, key, offset).await
                    {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// One deferred retry, traced as the first attempt was: a consumer span (a
    /// child of the sender's, from the message's headers) around the attempt's.
    async fn traced_retry(
        &self,
        key: &Arc<str>,
        fetched: &Fetched,
        mut message: Message,
        attempt: u32,
    ) -> Option<(Outcome, bool)> {
        let trace = traces::process_span(
            &Position {
                topic: &self.topic,
                partition: self.partition,
                offset: fetched.offset,
                key,
                group: self.shared.config.group_id.as_deref().unwrap_or_default(),
            },
            &fetched.headers,
            self.shared.config.message_spans,
        );
        message.trace_parent = trace.as_ref().and_then(traces::traceparent).map(Arc::from);
        let call = Call::Message(message);
        let attempted = within(trace.clone(), async {
            let span = traces::attempt_span(call.handler(), attempt, None);
            let attempted = within(
                span.clone(),
                self.attempt_with_permit(key, call, Pool::Retry),
            )
            .await;
            if let Some(span) = &span {
                traces::end(span, failure_of(attempted.as_ref()));
            }
            attempted
        })
        .await;
        if let Some(trace) = &trace {
            traces::end(trace, failure_of(attempted.as_ref()));
        }
        attempted
    }

    /// Stores the deferred message's next retry, `delay` from now.
    async fn back_off(
        &self,
        defer: &DeferQueue,
        key: &Arc<str>,
        offset: i64,
        attempt: u32,
        delay: Duration,
    ) -> bool {
        let retry_at = to_millis(SystemTime::now() + delay);
        self.retry_until_cancelled(
            || defer.failed(key, offset, attempt, retry_at),
            |error, delay| warn!(topic = %self.topic, partition = self.partition, offset, key = %key, "cannot store a deferred message's next retry; retrying in {delay:?}: {error}"),
        )
        .await
    }

    /// Deletes a deferred message that ran or was given up on.
    async fn forget_deferred(&self, defer: &DeferQueue, key: &Arc<str>, offset: i64) -> bool {
        self.retry_until_cancelled(
            || defer.done(key, offset),
            |error, delay| warn!(topic = %self.topic, partition = self.partition, offset, key = %key, "cannot delete a deferred message that ran; retrying in {delay:?}: {error}"),
        )
        .await
    }
}

/// The failure message of an attempt that failed, for its span's status.
fn failure_of(attempted: Option<&(Outcome, bool)>) -> Option<&str> {
    match attempted {
        Some((Outcome::Failed(failure), _)) => Some(failure.message.as_str()),
        _ => None,
    }
}

/// Runs `future` inside `context` when there is one (a deferred retry is a
/// rare path, boxed by its caller: the size concern of `traced!` does not apply).
async fn within<F: std::future::Future>(context: Option<Context>, future: F) -> F::Output {
    match context {
        Some(context) => future.with_context(context).await,
        None => future.await,
    }
}
