//! State shared by the poll thread, the rebalance hooks and the key runners.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use crossbeam_channel::{Receiver, Sender};
use rdkafka::consumer::BaseConsumer;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use super::defer::reload::Reloader;
use super::defer::{DeferSettings, DeferStore};
use super::dispatch::DynHandler;
use super::filter::SkipCounters;
use super::hooks::Hooks;
use super::partition::PartitionManager;
use super::scheduler::{QosSettings, Scheduler};
use crate::config::Config;
use crate::dedup::Deduplicator;
use crate::metrics::{Format, Metrics};
use crate::probe::Health;
use crate::producer::Producer;
use crate::timers::TimerStore;

pub(crate) type TopicPartition = (Arc<str>, i32);
pub(crate) type KafkaConsumer = BaseConsumer<Hooks>;

pub(crate) struct Shared {
    pub(crate) config: Arc<Config>,
    pub(crate) handler: Arc<dyn DynHandler>,
    /// Messages skipped by the filters, by reason.
    pub(crate) skips: SkipCounters,
    /// Writes failed messages to `failure_topic`, when one is configured.
    pub(crate) dead_letters: Option<Arc<Producer>>,
    /// Where timers live, when a store is configured.
    pub(crate) store: Option<Arc<dyn TimerStore>>,
    /// Message-id deduplication, unless `idempotence_cache_size` is 0.
    pub(crate) dedup: Option<Deduplicator>,
    /// Where deferred messages live, when deferral is on (`consumer/defer/`).
    pub(crate) deferred: Option<Arc<dyn DeferStore>>,
    pub(crate) defer_settings: DeferSettings,
    /// Reads deferred messages back by offset.
    pub(crate) reloader: Reloader,
    /// The client's metrics.
    pub(crate) metrics: Arc<Metrics>,
    /// Bounds running handlers across all partitions to `max_concurrency`
    /// (plus the calls the handler queues ahead), deciding who runs next when
    /// they are all busy.
    pub(crate) scheduler: Arc<Scheduler>,
    /// The handler queues calls before it runs them
    /// ([`EventHandler::queue_ahead`](crate::EventHandler::queue_ahead)):
    /// a call's timeout counts from its [`Context::start`](crate::Context::start).
    pub(crate) queues_ahead: bool,
    pub(crate) runtime: Handle,
    /// Parent of every partition's cancellation token.
    pub(crate) cancellation: CancellationToken,
    partitions: Mutex<HashMap<TopicPartition, Arc<PartitionManager>>>,
    consumer: OnceLock<Weak<KafkaConsumer>>,
    /// Set once the consumer starts leaving the group: partitions assigned from
    /// then on are taken (librdkafka requires it) but not started.
    stopping: AtomicBool,
    /// Wakes the poll thread: a queue became non-empty, a full buffer drained, or stop.
    waker: Sender<()>,
    pub(crate) wakeups: Receiver<()>,
}

impl Shared {
    pub(crate) fn new(
        config: Arc<Config>,
        handler: Arc<dyn DynHandler>,
        dead_letters: Option<Arc<Producer>>,
        metrics: Arc<Metrics>,
        runtime: Handle,
        bootstrap_servers: &str,
    ) -> Arc<Self> {
        // One pending wake-up is enough: the poll thread looks at everything when it wakes.
        let (waker, wakeups) = crossbeam_channel::bounded(1);
        let stores = crate::state::stores(&config);
        let dedup = Deduplicator::new(&config, stores.dedup)
            .map(|dedup| dedup.with_metrics(Arc::clone(&metrics)));
        let store = stores.timers;
        let defer_settings = DeferSettings::from_config(&config);
        let deferred = stores.deferred.filter(|_| defer_settings.enabled);
        let reloader = Reloader::new(&config, bootstrap_servers);
        let queue_ahead = handler.queue_ahead(config.max_concurrency);
        Arc::new(Self {
            deferred,
            defer_settings,
            reloader,
            waker,
            wakeups,
            scheduler: Arc::new(Scheduler::new(QosSettings::new(&config, queue_ahead))),
            queues_ahead: queue_ahead > 0,
            config,
            handler,
            dead_letters,
            metrics,
            store,
            dedup,
            skips: SkipCounters::default(),
            runtime,
            cancellation: CancellationToken::new(),
            partitions: Mutex::new(HashMap::new()),
            consumer: OnceLock::new(),
            stopping: AtomicBool::new(false),
        })
    }

    pub(crate) fn begin_stopping(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    pub(crate) fn attach(&self, consumer: &Arc<KafkaConsumer>) {
        let _ = self.consumer.set(Arc::downgrade(consumer));
    }

    /// The consumer, while the poll thread still owns it.
    pub(crate) fn consumer(&self) -> Option<Arc<KafkaConsumer>> {
        self.consumer.get().and_then(Weak::upgrade)
    }

    /// Wakes the poll thread; cheap and callable from any thread, including librdkafka's.
    pub(crate) fn wake(&self) {
        let _ = self.waker.try_send(());
    }

    pub(crate) fn partitions(
        &self,
    ) -> MutexGuard<'_, HashMap<TopicPartition, Arc<PartitionManager>>> {
        self.partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every assigned partition's manager, outside the map's lock.
    pub(crate) fn managers(&self) -> Vec<Arc<PartitionManager>> {
        self.partitions().values().cloned().collect()
    }

    /// True when the handler can no longer run anything, or some partition has
    /// work and made no progress for `stall_threshold`.
    pub(crate) fn is_stalled(&self) -> bool {
        if !self.handler.is_alive() {
            return true;
        }
        let threshold = self.config.stall_threshold;
        self.managers()
            .iter()
            .any(|manager| manager.is_stalled(threshold))
    }
}

impl Shared {
    /// Sets the gauges that mirror partition state (buffered messages, assignment).
    pub(crate) fn refresh_metrics(&self) {
        let managers = self.managers();
        self.metrics.set_assigned(managers.len());
        self.metrics
            .set_scheduler_waiting(self.scheduler.stats().waiting);
        for manager in managers {
            self.metrics
                .set_buffered(manager.labels(), manager.stats().buffered);
        }
    }
}

impl Health for Shared {
    fn ready(&self) -> bool {
        !self.partitions().is_empty()
    }

    fn live(&self) -> bool {
        !self.is_stalled()
    }

    fn metrics(&self, format: Format) -> String {
        self.refresh_metrics();
        self.metrics.render(format)
    }
}
