//! Key runners: one future per key with queued work, draining the key's queue
//! in offset order and ending when it is empty.
//!
//! Order per key falls out of the structure: nothing else can pick up a key's
//! next message while its runner lives, and idle keys cost nothing.
//!
//! A partition's runners are driven by one task, the partition's **driver**
//! (a `FuturesUnordered`), rather than a task each: spawning a task per busy
//! key cost a task allocation, a registration in the runtime's task list and,
//! from the poll thread, a worker wake-up per message. The driver lives while
//! the partition has busy keys: the first key to get work spawns it, it takes
//! the keys that got work since (a batch per wake-up) and ends once every
//! runner has. Runners still run concurrently, interleaving at their `await`s,
//! and different partitions' drivers run in parallel on the runtime's workers.
//! A runner whose key ran dry takes on the next key waiting to start, if one
//! is there already, instead of ending: the driver then need not allocate a
//! runner (a few KB, moved into place) for that key. A key is still run by
//! one runner at a time, so its order holds.

use std::collections::hash_map::Entry;
use std::collections::VecDeque;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;

use futures_util::stream::{FuturesUnordered, Stream as _};
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::{clock, PartitionManager, State, Work};

/// A key that got work while idle, waiting for the driver to start its runner.
pub(super) struct Starting {
    key: Arc<str>,
    work: Work,
    /// Counts the runner in [`PartitionManager::is_idle`] from the moment the
    /// key got work, not only once the driver picked it up.
    token: TaskTrackerToken,
}

/// What the caller of [`PartitionManager::enqueue`] must do once it has let
/// go of the state lock (see [`PartitionManager::kick`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[must_use]
pub(crate) enum Kick {
    /// Nothing: the work joined a busy key's queue.
    #[default]
    None,
    /// Wake the partition's driver: a key it does not run yet got work.
    Wake,
    /// Start the partition's driver: there was none.
    Spawn,
}

impl Kick {
    /// The stronger of two kicks, for a batch of enqueues.
    pub(crate) fn and(self, other: Self) -> Self {
        match (self, other) {
            (Self::Spawn, _) | (_, Self::Spawn) => Self::Spawn,
            (Self::Wake, _) | (_, Self::Wake) => Self::Wake,
            _ => Self::None,
        }
    }
}

impl PartitionManager {
    /// Appends work to its key's queue; an idle key is handed to the driver.
    /// The caller calls [`kick`](Self::kick) with the result after releasing
    /// the state lock (once per batch of enqueues).
    pub(super) fn enqueue(&self, state: &mut State, key: Arc<str>, work: Work) -> Kick {
        match state.queues.entry(key) {
            Entry::Occupied(mut queue) => {
                queue.get_mut().push_back(work);
                Kick::None
            }
            Entry::Vacant(slot) => {
                let key = Arc::clone(slot.key());
                slot.insert(VecDeque::new());
                state.starting.push_back(Starting {
                    key,
                    work,
                    token: self.runners.token(),
                });
                if state.driving {
                    Kick::Wake
                } else {
                    state.driving = true;
                    Kick::Spawn
                }
            }
        }
    }

    /// Acts on what [`enqueue`](Self::enqueue) returned.
    pub(super) fn kick(self: &Arc<Self>, kick: Kick) {
        match kick {
            Kick::None => {}
            Kick::Wake => self.driver.wake(),
            Kick::Spawn => {
                self.shared.runtime.spawn(Arc::clone(self).drive());
            }
        }
    }

    /// The partition's driver: runs the runners of the keys handed to it
    /// until none is left and no key is waiting to start.
    async fn drive(self: Arc<Self>) {
        let mut running = pin!(FuturesUnordered::new());
        // Swapped with the state's list: neither is reallocated per wake-up.
        let mut starting = VecDeque::new();
        std::future::poll_fn(|cx| loop {
            // Register before looking, so work handed over after the look wakes us.
            self.driver.register(cx.waker());
            {
                let mut state = self.state();
                if state.starting.is_empty() && running.is_empty() {
                    // Under the lock: an enqueue from now on starts a new driver.
                    state.driving = false;
                    return Poll::Ready(());
                }
                std::mem::swap(&mut state.starting, &mut starting);
            }
            for Starting { key, work, token } in starting.drain(..) {
                running.push(Arc::clone(&self).run_key(key, work, token));
            }
            loop {
                match running.as_mut().poll_next(cx) {
                    Poll::Ready(Some(())) => {}
                    // None left: take newcomers, or end.
                    Poll::Ready(None) => break,
                    // Work handed over since the registration above wakes us.
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await;
    }

    /// Drains one key's queue in order, then takes on a key waiting to start,
    /// if any (which saves the driver allocating a runner for it); exits when
    /// there is none or the partition stops.
    ///
    /// A failing message stays at the head of its key's queue while it waits to be
    /// retried, so later messages of that key wait too, but no permit is held
    /// while waiting: the partition's other keys keep flowing. Its offset stays
    /// unfinished, so the committed offset never passes it.
    ///
    /// `_token` counts the runner in [`PartitionManager::is_idle`] until it ends.
    async fn run_key(
        self: Arc<Self>,
        mut key: Arc<str>,
        first: Work,
        mut _token: TaskTrackerToken,
    ) {
        {
            let mut next = first;
            loop {
                let (settled, offset) = match next {
                    Work::Message(fetched) => {
                        let offset = fetched.offset;
                        (self.settle_message(&key, fetched).await, Some(offset))
                    }
                    // Boxed: rare next to messages, and their futures would
                    // otherwise size every runner's.
                    Work::Timer(at) => (Box::pin(self.settle_timer(&key, at)).await, None),
                    Work::Deferred => (Box::pin(self.settle_deferred(&key)).await, None),
                };
                if !settled {
                    // Cancelled: leave the rest of the key's queue to the next owner.
                    return;
                }
                let (queued, drained) = {
                    let mut state = self.state();
                    if let Some(offset) = offset {
                        state.offsets.finish(offset);
                        state.finished += 1;
                    }
                    state.last_progress = clock();
                    let drained = self.drained(&mut state);
                    let draining = self.draining.is_cancelled();
                    let mut queued = if draining {
                        None
                    } else {
                        state.queues.get_mut(&key).and_then(VecDeque::pop_front)
                    };
                    if queued.is_none() {
                        state.queues.remove(&key);
                        let next = if draining {
                            None
                        } else {
                            state.starting.pop_front()
                        };
                        if let Some(starting) = next {
                            key = starting.key;
                            _token = starting.token;
                            queued = Some(starting.work);
                        }
                    }
                    (queued, drained)
                };
                // Outside the state lock: refilling takes it.
                if drained {
                    self.refill();
                }
                match queued {
                    Some(work) => next = work,
                    None => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::{PartitionManager, Work};
    use crate::config::Config;
    use crate::consumer::offsets::OffsetTracker;
    use crate::consumer::shared::Shared;
    use crate::handler::{Context, EventHandler};
    use crate::message::Message;
    use crate::metrics::Metrics;

    struct Noop;

    impl EventHandler for Noop {
        type Error = std::convert::Infallible;

        async fn on_message(
            &self,
            _context: Context,
            _message: Message,
        ) -> Result<(), Self::Error> {
            Ok(())
        }
    }

    /// Every busy key's runner is allocated (and moved) once per idle→busy
    /// key, so its size is a per-message cost for light handlers. Rare paths
    /// are boxed; before they were, it was 5.6 KB in a release build (debug
    /// builds lay futures out larger: about 2.4 KB now).
    #[tokio::test]
    async fn a_key_runner_future_stays_small() {
        let config = Config::builder()
            .mock(true)
            .group_id("g")
            .subscribed_topics(["t"])
            .build_with_env(Vec::new())
            .expect("config");
        let shared = Shared::new(
            Arc::new(config),
            Arc::new(Noop),
            None,
            Arc::new(Metrics::new()),
            tokio::runtime::Handle::current(),
            "127.0.0.1:9",
        );
        let manager = PartitionManager::new(shared, Arc::from("t"), 0, OffsetTracker::default());
        let runner =
            Arc::clone(&manager).run_key(Arc::from("k"), Work::Timer(0), manager.runners.token());
        let size = std::mem::size_of_val(&runner);
        assert!(size <= 3072, "a key runner's future takes {size} bytes");
        manager.cancel();
    }
}
