//! Backpressure: a partition holds at most `max_uncommitted` accepted,
//! unfinished messages.
//!
//! Nothing is paused in Kafka. librdkafka keeps prefetching into the
//! partition's own queue (bounded by `queued.min.messages` and
//! `queued.max.messages.kbytes`), and Prosody stops reading that queue while
//! the buffer is full, so a drained buffer refills at memory speed instead of
//! waiting for a new fetch round trip. The poll thread fills every partition
//! on each turn; once a full buffer has drained by a quarter, the runner that
//! drained it refills it at once (see [`PartitionManager::refill`]).

use std::sync::Arc;

use tracing::warn;

use super::{Accepted, Fetched, Kick, PartitionManager, State};
use crate::consumer::prefetch_queue::PrefetchQueue;

/// The most messages moved per state-lock hold: bounds the kept batch buffer.
const FILL_CHUNK: usize = 1024;

/// librdkafka's prefetch queue for one partition, and the batch buffer that
/// [`PartitionManager::fill`] moves messages through (kept between fills: a
/// fresh one per fill grew by reallocation every time).
#[derive(Default)]
pub(super) struct Prefetch {
    pub(super) queue: Option<PrefetchQueue>,
    batch: Vec<Fetched>,
}

/// The buffer's fill state and its counters (see [`super::PartitionStats`]).
#[derive(Debug, Default)]
pub(super) struct Backpressure {
    /// Full: reading stops until it drains by a quarter.
    pub(super) full: bool,
    pub(super) fills: u64,
    pub(super) drains: u64,
    pub(super) max_buffered: usize,
}

impl Backpressure {
    /// Notes a message taken into a buffer now holding `buffered` of `max`.
    pub(super) fn accepted(&mut self, buffered: usize, max: usize) {
        self.max_buffered = self.max_buffered.max(buffered);
        if buffered >= max && !self.full {
            self.full = true;
            self.fills += 1;
        }
    }
}

impl PartitionManager {
    /// Gives the manager its own prefetch queue (see [`fill`](Self::fill)).
    pub(crate) fn attach_queue(&self, queue: PrefetchQueue) {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .queue = Some(queue);
    }

    /// Moves messages from librdkafka's prefetch queue into key queues while the
    /// buffer has room. Returns how many were taken.
    pub(crate) fn fill(self: &Arc<Self>) -> usize {
        let mut prefetch = self
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.fill_from(&mut prefetch)
    }

    /// Refills from a runner once a full buffer has drained a quarter, so in
    /// steady state the poll thread need not be woken (a context switch per
    /// refill). If the poll thread is filling right now, or nothing is
    /// prefetched, it is woken to take over instead.
    pub(super) fn refill(self: &Arc<Self>) {
        let taken = match self.queue.try_lock() {
            Ok(mut prefetch) => self.fill_from(&mut prefetch),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => {
                self.fill_from(&mut poisoned.into_inner())
            }
            Err(std::sync::TryLockError::WouldBlock) => 0,
        };
        if taken == 0 {
            self.shared.wake();
        }
    }

    /// Copies up to the buffer's room (at most [`FILL_CHUNK`]) out of
    /// librdkafka's queue, then takes them under one state lock and kicks the
    /// driver once, so the driver starts with the batch rather than per
    /// message. Loops while there is room and the queue has messages.
    fn fill_from(self: &Arc<Self>, prefetch: &mut Prefetch) -> usize {
        let Prefetch { queue, batch } = prefetch;
        let Some(queue) = queue.as_ref() else {
            return 0;
        };
        let max = self.shared.config.max_uncommitted;
        let mut taken = 0;
        let mut headers = Arc::clone(crate::consumer::no_headers());
        loop {
            let room = {
                let state = self.state();
                if self.is_open(&state) {
                    max.saturating_sub(state.offsets.pending())
                } else {
                    0
                }
            };
            if room == 0 {
                return taken;
            }
            let wanted = room.min(FILL_CHUNK).saturating_sub(batch.len());
            let exhausted = queue.read(wanted, &mut headers, batch, |error| {
                warn!(topic = %self.topic, partition = self.partition, "fetch error: {error}");
            }) < wanted;
            let mut kick = Kick::None;
            {
                let mut state = self.state();
                let open = self.is_open(&state);
                for fetched in batch.drain(..) {
                    // The batch fits the room seen before polling (a message
                    // accepted meanwhile may take it a little past `max`), so a
                    // message is only refused once the partition stops: no
                    // need to fetch it again then.
                    let (accepted, more) =
                        self.accept_locked(&mut state, open, usize::MAX, fetched);
                    kick = kick.and(more);
                    if accepted == Accepted::Taken {
                        taken += 1;
                    }
                }
            }
            self.kick(kick);
            if exhausted {
                return taken;
            }
        }
    }

    /// Reads on once a full buffer has a quarter free again, so refills come in
    /// batches rather than one message at a time. True when it did: the caller
    /// then refills (see [`refill`](Self::refill)).
    pub(super) fn drained(&self, state: &mut State) -> bool {
        let max = self.shared.config.max_uncommitted;
        let buffer = &mut state.buffer;
        if buffer.full && !state.released && state.offsets.pending() <= max - max.div_ceil(4) {
            buffer.full = false;
            buffer.drains += 1;
            return true;
        }
        false
    }
}
