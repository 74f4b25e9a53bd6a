//! librdkafka callbacks: rebalances, commit results and client logs.
//!
//! Rebalance callbacks run on the poll thread, inside `poll`, so they never race
//! with message dispatch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use super::offsets::OffsetTracker;
use super::partition::PartitionManager;
use super::shared::Shared;

pub(crate) struct Hooks {
    shared: OnceLock<Arc<Shared>>,
    /// Events served through these callbacks (logs, rebalances, commit results).
    /// `BaseConsumer::poll(0)` returns `None` both for an empty queue and after
    /// serving one such event; this count tells the two apart.
    served: AtomicU64,
}

impl Hooks {
    pub(crate) fn new() -> Self {
        Self {
            shared: OnceLock::new(),
            served: AtomicU64::new(0),
        }
    }

    /// How many events the callbacks have served so far.
    pub(crate) fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    fn serve(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_shared(&self, shared: Arc<Shared>) {
        let _ = self.shared.set(shared);
    }
}

impl ClientContext for Hooks {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        self.serve();
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                error!(target: "librdkafka", facility, "{message}");
            }
            RDKafkaLogLevel::Warning => warn!(target: "librdkafka", facility, "{message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                info!(target: "librdkafka", facility, "{message}")
            }
            RDKafkaLogLevel::Debug => debug!(target: "librdkafka", facility, "{message}"),
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.serve();
        warn!(target: "librdkafka", "{error}: {reason}");
    }
}

impl ConsumerContext for Hooks {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.serve();
        let (Some(shared), Rebalance::Revoke(list)) = (self.shared.get(), rebalance) else {
            return;
        };
        let revoked: Vec<Arc<PartitionManager>> = {
            let mut partitions = shared.partitions();
            list.elements()
                .iter()
                .filter_map(|element| {
                    partitions.remove(&(Arc::from(element.topic()), element.partition()))
                })
                .collect()
        };
        if revoked.is_empty() {
            return;
        }
        info!(
            partitions = revoked.len(),
            "partitions revoked; cancelling their handlers"
        );
        for manager in &revoked {
            manager.cancel();
        }
        let budget = shared.config.shutdown_timeout;
        shared.runtime.block_on(async {
            for manager in &revoked {
                manager.wait_idle(budget).await;
            }
        });
        commit(consumer, &revoked, true, CommitMode::Sync);
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let (Some(shared), Rebalance::Assign(list)) = (self.shared.get(), rebalance) else {
            if let Rebalance::Error(error) = rebalance {
                warn!("rebalance failed: {error}");
            }
            return;
        };
        let committed = match consumer.committed_offsets((*list).clone(), Duration::from_secs(10)) {
            Ok(committed) => committed,
            Err(error) => {
                warn!("cannot read committed offsets; finished-out-of-order offsets may run again: {error}");
                (*list).clone()
            }
        };
        let owner = shared.consumer();
        let mut partitions = shared.partitions();
        for element in committed.elements() {
            let offset = match element.offset() {
                Offset::Offset(offset) => Some(offset),
                _ => None,
            };
            let tracker = OffsetTracker::resume_from(offset, element.metadata());
            let topic: Arc<str> = Arc::from(element.topic());
            let manager = PartitionManager::new(
                Arc::clone(shared),
                Arc::clone(&topic),
                element.partition(),
                tracker,
            );
            // Messages already on the main queue still arrive there; the poll loop handles both.
            if let Some(mut queue) = owner
                .as_ref()
                .and_then(|owner| owner.split_partition_queue(&topic, element.partition()))
            {
                let waker = Arc::clone(shared);
                queue.set_nonempty_callback(move || waker.wake());
                manager.attach_queue(queue);
            }
            partitions.insert((topic, element.partition()), manager);
        }
        info!(assigned = partitions.len(), "partitions assigned");
        drop(partitions);
        shared.wake();
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        self.serve();
        if let Err(error) = result {
            warn!("commit failed; retrying on the next tick: {error}");
            if let Some(shared) = self.shared.get() {
                shared.recommit.store(true, Ordering::Release);
            }
        }
    }
}

/// Commits the given partitions' commit points; `release` marks them handed back.
pub(crate) fn commit(
    consumer: &BaseConsumer<Hooks>,
    managers: &[Arc<PartitionManager>],
    release: bool,
    mode: CommitMode,
) {
    let mut list = TopicPartitionList::new();
    for manager in managers {
        let point = if release {
            manager.release()
        } else {
            manager.commit_point()
        };
        let Some((offset, metadata)) = point else {
            continue;
        };
        match list.add_partition_offset(
            manager.topic(),
            manager.partition(),
            Offset::Offset(offset),
        ) {
            Ok(()) => {
                if let Some(mut element) = list.find_partition(manager.topic(), manager.partition())
                {
                    element.set_metadata(metadata);
                }
            }
            Err(error) => warn!("cannot commit offset {offset}: {error}"),
        }
    }
    if list.count() == 0 {
        return;
    }
    if let Err(error) = consumer.commit(&list, mode) {
        warn!("commit failed: {error}");
    }
}
