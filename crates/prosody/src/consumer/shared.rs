//! State shared by the poll thread, the rebalance hooks and the key runners.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::TopicPartitionList;
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::dispatch::DynHandler;
use super::hooks::Hooks;
use super::partition::PartitionManager;
use crate::config::Config;

pub(crate) type TopicPartition = (Arc<str>, i32);
pub(crate) type KafkaConsumer = BaseConsumer<Hooks>;

pub(crate) struct Shared {
    pub(crate) config: Arc<Config>,
    pub(crate) handler: Arc<dyn DynHandler>,
    /// Bounds running handlers across all partitions to `max_concurrency`.
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) runtime: Handle,
    /// Parent of every partition's cancellation token.
    pub(crate) cancellation: CancellationToken,
    partitions: Mutex<HashMap<TopicPartition, Arc<PartitionManager>>>,
    consumer: OnceLock<Weak<KafkaConsumer>>,
    /// Set when a commit failed, so the next tick commits every partition again.
    pub(crate) recommit: AtomicBool,
}

impl Shared {
    pub(crate) fn new(config: Arc<Config>, handler: Arc<dyn DynHandler>, runtime: Handle) -> Arc<Self> {
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(config.max_concurrency)),
            config,
            handler,
            runtime,
            cancellation: CancellationToken::new(),
            partitions: Mutex::new(HashMap::new()),
            consumer: OnceLock::new(),
            recommit: AtomicBool::new(false),
        })
    }

    pub(crate) fn attach(&self, consumer: &Arc<KafkaConsumer>) {
        let _ = self.consumer.set(Arc::downgrade(consumer));
    }

    pub(crate) fn partitions(&self) -> MutexGuard<'_, HashMap<TopicPartition, Arc<PartitionManager>>> {
        self.partitions.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every assigned partition's manager, outside the map's lock.
    pub(crate) fn managers(&self) -> Vec<Arc<PartitionManager>> {
        self.partitions().values().cloned().collect()
    }

    /// Resumes fetching a partition; called by key runners as its buffer drains.
    pub(crate) fn resume(&self, topic: &str, partition: i32) {
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            return;
        };
        let mut list = TopicPartitionList::new();
        list.add_partition(topic, partition);
        if let Err(error) = consumer.resume(&list) {
            warn!(topic, partition, "cannot resume partition: {error}");
        }
    }

    pub(crate) fn take_recommit(&self) -> bool {
        self.recommit.swap(false, Ordering::AcqRel)
    }
}
