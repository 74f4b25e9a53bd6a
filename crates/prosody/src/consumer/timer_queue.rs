//! One partition's timers: loads those due soon from the store and hands each to
//! its key's queue when its time comes.
//!
//! Only a window of `WINDOW` ahead is held in memory (at most `PAGE` timers per
//! load), so millions of stored timers cost nothing until they are nearly due.
//! A timer stays in the store until `on_timer` succeeded; a partition that moves
//! to another consumer takes its timers along, because the new owner loads them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::partition::PartitionManager;
use crate::error::Result;
use crate::handler::{to_millis, KeyTimers, TimersFuture};
use crate::metrics::Metrics;
use crate::timers::{PartitionScope, TimerStore};

/// How far ahead timers are loaded.
const WINDOW: Duration = Duration::from_secs(10);
/// Most timers loaded at once.
const PAGE: usize = 1_000;
/// Pause after a failed load before trying again.
const RETRY: Duration = Duration::from_secs(1);

type Entry = (i64, Arc<str>);

/// The `traceparent` of the handler call that scheduled a timer, if traced.
type TraceParent = Option<Arc<str>>;

#[derive(Default)]
struct State {
    /// Loaded and not yet due.
    waiting: BTreeMap<Entry, TraceParent>,
    /// Handed to a key queue and not yet settled.
    queued: HashMap<Entry, TraceParent>,
    /// Every timer due before this (ms) is in `waiting` or `queued` (or done).
    horizon: i64,
    /// The last timer loaded, where the next load continues.
    cursor: Option<Entry>,
}

pub(crate) struct TimerQueue {
    store: Arc<dyn TimerStore>,
    scope: PartitionScope,
    state: Mutex<State>,
    changed: Notify,
    metrics: Arc<Metrics>,
}

impl TimerQueue {
    pub(crate) fn new(
        store: Arc<dyn TimerStore>,
        scope: PartitionScope,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            store,
            scope,
            state: Mutex::new(State {
                horizon: i64::MIN,
                ..State::default()
            }),
            changed: Notify::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps a timer that falls inside the loaded window in memory too. One
    /// already waiting keeps its trace context, as it does in the store.
    fn remember(&self, key: &Arc<str>, at: i64, trace_parent: Option<&Arc<str>>) {
        let mut state = self.state();
        if at <= state.horizon {
            state
                .waiting
                .entry((at, Arc::clone(key)))
                .or_insert_with(|| trace_parent.cloned());
            drop(state);
            self.changed.notify_one();
        }
    }

    fn forget_key(&self, key: &str) {
        let mut state = self.state();
        state.waiting.retain(|(_, waiting), _| &**waiting != key);
        state.queued.retain(|(_, queued), _| &**queued != key);
    }

    /// False when the timer was unscheduled after it was handed to its key's queue.
    /// Counts a failed store operation in the metrics, passing the result on.
    fn counted<T, E>(&self, result: std::result::Result<T, E>) -> std::result::Result<T, E> {
        if result.is_err() {
            self.metrics.store_error();
        }
        result
    }

    pub(crate) fn is_queued(&self, key: &Arc<str>, at: i64) -> bool {
        self.state().queued.contains_key(&(at, Arc::clone(key)))
    }

    /// The `traceparent` of the call that scheduled a queued timer, if it was traced.
    pub(crate) fn trace_parent(&self, key: &Arc<str>, at: i64) -> TraceParent {
        self.state()
            .queued
            .get(&(at, Arc::clone(key)))
            .cloned()
            .flatten()
    }

    /// Deletes a timer that has run (or was given up on).
    pub(crate) async fn finished(&self, key: &Arc<str>, at: i64) -> Result<()> {
        self.counted(self.store.unschedule(&self.scope, key, at).await)?;
        self.state().queued.remove(&(at, Arc::clone(key)));
        Ok(())
    }

    /// Loads due-soon timers and hands each to its key's queue when due, until cancelled.
    pub(crate) async fn run(
        self: Arc<Self>,
        manager: Weak<PartitionManager>,
        cancellation: CancellationToken,
    ) {
        loop {
            let now = to_millis(SystemTime::now());
            let reload_at = self.state().horizon.saturating_sub(millis(WINDOW) / 2);
            if now >= reload_at {
                if let Err(error) = self.counted(self.load(now).await) {
                    warn!(scope = %self.scope, "cannot load timers; retrying in {RETRY:?}: {error}");
                    tokio::select! {
                        () = cancellation.cancelled() => return,
                        () = tokio::time::sleep(RETRY) => continue,
                    }
                }
            }
            let Some(manager) = manager.upgrade() else {
                return;
            };
            let (due, next) = self.take_due(to_millis(SystemTime::now()));
            for (at, key) in due {
                manager.accept_timer(key, at);
            }
            drop(manager);
            let reload_at = self.state().horizon.saturating_sub(millis(WINDOW) / 2);
            let wake_at = next.map_or(reload_at, |next| next.min(reload_at));
            let delay =
                u64::try_from(wake_at.saturating_sub(to_millis(SystemTime::now()))).unwrap_or(0);
            tokio::select! {
                () = cancellation.cancelled() => return,
                () = self.changed.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(delay)) => {}
            }
        }
    }

    async fn load(&self, now: i64) -> Result<()> {
        let before = now.saturating_add(millis(WINDOW));
        let cursor = self.state().cursor.clone();
        let after = cursor.as_ref().map(|(at, key)| (*at, &**key));
        let page = self
            .store
            .due_traced(&self.scope, after, before, PAGE)
            .await?;
        let mut state = self.state();
        let full = page.len() == PAGE;
        for (key, at, trace_parent) in page {
            let entry = (at, Arc::<str>::from(key));
            if !state.queued.contains_key(&entry) {
                state
                    .waiting
                    .insert(entry.clone(), trace_parent.map(Arc::from));
            }
            state.cursor = Some(entry);
        }
        state.horizon = match (&state.cursor, full) {
            // More may be due before `before`: the window ends at the last one loaded.
            (Some((at, _)), true) => *at,
            _ => before,
        };
        Ok(())
    }

    /// Moves due timers to `queued`; returns them and the next due time, if any.
    fn take_due(&self, now: i64) -> (Vec<Entry>, Option<i64>) {
        let mut state = self.state();
        let mut due = Vec::new();
        while let Some(first) = state.waiting.first_entry() {
            let at = first.key().0;
            if at > now {
                return (due, Some(at));
            }
            let (entry, trace_parent) = first.remove_entry();
            state.queued.insert(entry.clone(), trace_parent);
            due.push(entry);
        }
        (due, None)
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// What a handler's [`crate::Context`] does with its key's timers: the store
/// changes first, then the loaded window follows.
impl KeyTimers for TimerQueue {
    fn schedule<'a>(
        &'a self,
        key: &'a Arc<str>,
        at: i64,
        trace_parent: Option<&'a Arc<str>>,
    ) -> TimersFuture<'a, ()> {
        Box::pin(async move {
            let stored = trace_parent.map(|trace_parent| &**trace_parent);
            self.counted(
                self.store
                    .schedule_traced(&self.scope, key, at, stored)
                    .await,
            )?;
            self.metrics.timer_scheduled();
            self.remember(key, at, trace_parent);
            Ok(())
        })
    }

    fn unschedule<'a>(&'a self, key: &'a Arc<str>, at: i64) -> TimersFuture<'a, ()> {
        Box::pin(async move {
            self.counted(self.store.unschedule(&self.scope, key, at).await)?;
            let entry = (at, Arc::clone(key));
            let mut state = self.state();
            state.waiting.remove(&entry);
            state.queued.remove(&entry);
            Ok(())
        })
    }

    fn clear<'a>(&'a self, key: &'a Arc<str>) -> TimersFuture<'a, ()> {
        Box::pin(async move {
            self.counted(self.store.clear(&self.scope, key).await)?;
            self.forget_key(key);
            Ok(())
        })
    }

    fn clear_and_schedule<'a>(
        &'a self,
        key: &'a Arc<str>,
        at: i64,
        trace_parent: Option<&'a Arc<str>>,
    ) -> TimersFuture<'a, ()> {
        Box::pin(async move {
            let stored = trace_parent.map(|trace_parent| &**trace_parent);
            self.counted(
                self.store
                    .clear_and_schedule_traced(&self.scope, key, at, stored)
                    .await,
            )?;
            self.metrics.timer_scheduled();
            self.forget_key(key);
            self.remember(key, at, trace_parent);
            Ok(())
        })
    }

    fn scheduled<'a>(&'a self, key: &'a Arc<str>) -> TimersFuture<'a, Vec<i64>> {
        Box::pin(async move { Ok(self.counted(self.store.scheduled(&self.scope, key).await)?) })
    }
}
