//! Key runners: one task per key with queued work, draining the key's queue in
//! offset order and ending when it is empty.
//!
//! Order per key falls out of the structure: nothing else can pick up a key's
//! next message while its runner lives, and idle keys cost nothing.

use std::collections::hash_map::Entry;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use super::{PartitionManager, State, Work};

impl PartitionManager {
    /// Appends work to its key's queue, starting a runner if the key was idle.
    pub(super) fn enqueue(self: &Arc<Self>, state: &mut State, key: Arc<str>, work: Work) {
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
                    (self.settle_message(&key, fetched).await, Some(offset))
                }
                Work::Timer(at) => (self.settle_timer(&key, at).await, None),
                Work::Deferred => (self.settle_deferred(&key).await, None),
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
                state.last_progress = Instant::now();
                let drained = self.drained(&mut state);
                let queued = if self.draining.is_cancelled() {
                    None
                } else {
                    state.queues.get_mut(&key).and_then(VecDeque::pop_front)
                };
                if queued.is_none() {
                    state.queues.remove(&key);
                }
                (queued, drained)
            };
            // Outside the state lock: refilling takes it per message.
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
