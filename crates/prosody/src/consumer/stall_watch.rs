//! Notices a partition entering a stall (work pending, nothing finished for
//! `stall_threshold`) and says so once per stall: a warning in the log and a
//! `consumer.stalled` event. `/livez` and `Client::is_stalled` answer the same
//! question when asked; this is what tells an operator without a probe.

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tracing::{info, warn};

use super::shared::Shared;
use crate::events::{Event, EventKind};

/// Watches `shared`'s partitions until the subscription is gone.
pub(crate) fn start(shared: &Arc<Shared>) {
    let threshold = shared.config.stall_threshold;
    // A stall is reported within a quarter of the threshold (at most 1 s) of
    // its start; checking is a lock per partition, cheap at this rate.
    let every = (threshold / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let watched = Arc::downgrade(shared);
    shared.runtime.spawn(async move {
        let mut stalled = HashSet::new();
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if !check(&watched, threshold, &mut stalled) {
                return;
            }
        }
    });
}

/// One look at every partition; false once the subscription is gone.
fn check(
    watched: &Weak<Shared>,
    threshold: Duration,
    stalled: &mut HashSet<(Arc<str>, i32)>,
) -> bool {
    let Some(shared) = watched.upgrade() else {
        return false;
    };
    let mut now_stalled = HashSet::new();
    for manager in shared.managers() {
        if !manager.is_stalled(threshold) {
            continue;
        }
        let at = (Arc::clone(manager.topic()), manager.partition());
        if !stalled.contains(&at) {
            warn!(
                topic = %at.0, partition = at.1, ?threshold,
                "partition stalled: messages are waiting and none finished within stall_threshold (a handler is stuck or every attempt fails); /livez reports 503"
            );
            shared.metrics.emit(EventKind::ConsumerStalled, || {
                let mut event =
                    Event::new(EventKind::ConsumerStalled, Arc::clone(&at.0)).at(at.1, None, None);
                event.duration = Some(threshold);
                event
            });
        }
        now_stalled.insert(at);
    }
    for (topic, partition) in stalled.difference(&now_stalled) {
        info!(%topic, partition, "partition no longer stalled");
    }
    *stalled = now_stalled;
    true
}
