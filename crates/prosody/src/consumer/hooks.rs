//! librdkafka callbacks: rebalances, commit results and client logs.
//!
//! Rebalance callbacks run on the poll thread, inside `poll`, so they never race
//! with message dispatch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use super::commit::{commit_by, commit_reserve, is_retriable, CommitError};
use super::offsets::OffsetTracker;
use super::partition::PartitionManager;
use super::prefetch_queue::PrefetchQueue;
use super::shared::Shared;
use crate::config::Config;
use crate::events::{Event, EventKind};

pub(crate) struct Hooks {
    shared: OnceLock<Arc<Shared>>,
    /// Events served through these callbacks (logs, rebalances, commit results).
    /// `BaseConsumer::poll(0)` returns `None` both for an empty queue and after
    /// serving one such event; this count tells the two apart.
    served: AtomicU64,
    /// When the subscription must be stopped by, once `unsubscribe` began.
    stop_deadline: Arc<OnceLock<Instant>>,
}

impl Hooks {
    pub(crate) fn new(stop_deadline: Arc<OnceLock<Instant>>) -> Self {
        Self {
            shared: OnceLock::new(),
            served: AtomicU64::new(0),
            stop_deadline,
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
    /// librdkafka's statistics (every `statistics.interval.ms`): each owned
    /// partition's lag becomes a gauge.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(shared) = self.shared.get() else {
            return;
        };
        let owned = shared.partitions();
        for (topic, stats) in &statistics.topics {
            for (partition, stats) in &stats.partitions {
                // librdkafka reports -1 until it knows both ends.
                if stats.consumer_lag < 0 {
                    continue;
                }
                if let Some(manager) = owned.get(&(Arc::from(topic.as_str()), *partition)) {
                    shared.metrics.set_lag(manager.labels(), stats.consumer_lag);
                }
            }
        }
    }

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

impl Hooks {
    /// Cancels the revoked partitions' handlers, waits for them, and commits what
    /// they finished, all within one `shutdown_timeout` from the start of the
    /// revocation (and never past the stop deadline of an `unsubscribe` under way).
    fn revoke(&self, consumer: &BaseConsumer<Self>, list: &TopicPartitionList) {
        let Some(shared) = self.shared.get() else {
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
        let budget = shared.config.shutdown_timeout;
        let mut deadline = Instant::now() + budget;
        if let Some(stop) = self.stop_deadline.get() {
            deadline = deadline.min(*stop);
        }
        info!(
            partitions = revoked.len(),
            "partitions revoked; cancelling their handlers"
        );
        for manager in &revoked {
            manager.cancel();
        }
        let handlers_until = deadline
            .checked_sub(commit_reserve(budget))
            .unwrap_or(deadline);
        // All were cancelled at once and their runners stop concurrently; waiting
        // on each in turn against the same absolute deadline bounds the whole wait
        // by that one deadline (it used to be a fresh budget per partition).
        // Runners still going then are abandoned (and logged) by `release` below.
        shared.runtime.block_on(async {
            for manager in &revoked {
                manager.wait_idle(handlers_until).await;
            }
        });
        let committed = commit_by(consumer, &revoked, true, deadline);
        shared.metrics.committed(committed.is_ok());
        for manager in &revoked {
            shared.metrics.partition_released(manager.labels());
            shared.metrics.emit(EventKind::PartitionRevoked, || {
                let event = Event::new(EventKind::PartitionRevoked, Arc::clone(manager.topic()));
                event.at(manager.partition(), None, None)
            });
        }
        match committed {
            Ok(()) => {}
            Err(CommitError::Unconfirmed) => warn!("commit of the revoked partitions not confirmed within shutdown_timeout; their new owner may repeat what finished since the last commit"),
            Err(error) => warn!("commit of the revoked partitions failed; their new owner repeats what finished since the last commit: {error}"),
        }
    }
}

impl ConsumerContext for Hooks {
    /// Runs on the poll thread for every assignment change.
    ///
    /// On assignment, Prosody reads the committed offsets itself (retrying
    /// coordinator errors) and assigns explicit positions. Left to librdkafka,
    /// an offset fetch that fails a few times leaves the partition assigned but
    /// never fetched, with nothing but a consume error to show for it.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        list: &mut TopicPartitionList,
    ) {
        self.serve();
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if let Some(shared) = self.shared.get() {
                    shared.metrics.rebalanced("assign");
                }
                let Some(shared) = self.shared.get().filter(|shared| !shared.is_stopping()) else {
                    assign(consumer, list, cooperative);
                    return;
                };
                if let Some(committed) =
                    read_committed(consumer, list, &shared.config, &self.stop_deadline)
                {
                    let positions = starting_positions(&committed, &shared.config);
                    assign(consumer, &positions, cooperative);
                    start_partitions(shared, &committed);
                } else {
                    // No positions given: librdkafka fetches the committed offsets itself.
                    assign(consumer, list, cooperative);
                    start_partitions(shared, list);
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if let Some(shared) = self.shared.get() {
                    shared.metrics.rebalanced("revoke");
                }
                self.revoke(consumer, list);
                unassign(consumer, list, cooperative);
            }
            other => {
                warn!("rebalance failed: {}", RDKafkaErrorCode::from(other));
                unassign(consumer, list, cooperative);
            }
        }
    }

    /// librdkafka reports the results of async manual commits only to an
    /// `offset_commit_cb`, which rust-rdkafka does not install, so this sees
    /// little; the poll loop re-sends every commit point periodically instead.
    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        self.serve();
        if let Err(error) = result {
            if let Some(shared) = self.shared.get() {
                shared.metrics.committed(false);
            }
            warn!("commit failed; the next full commit sends it again: {error}");
        }
    }
}

/// Longest the poll thread keeps asking for committed offsets at assignment
/// before it lets librdkafka try on its own.
const OFFSET_FETCH_BUDGET: Duration = Duration::from_secs(30);

/// The group's committed offsets (and metadata) for `list`, retrying while the
/// coordinator is unavailable; `None` if that never works, or when the stop
/// deadline of an `unsubscribe` comes first.
fn read_committed(
    consumer: &BaseConsumer<Hooks>,
    list: &TopicPartitionList,
    config: &Config,
    stop_deadline: &OnceLock<Instant>,
) -> Option<TopicPartitionList> {
    let started = Instant::now();
    let give_up = || {
        let budget_ends = started + OFFSET_FETCH_BUDGET;
        stop_deadline
            .get()
            .map_or(budget_ends, |stop| budget_ends.min(*stop))
    };
    let mut pause = Duration::from_millis(50);
    loop {
        let attempt = give_up()
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(10))
            .max(Duration::from_millis(100));
        match consumer.committed_offsets(list.clone(), attempt) {
            Ok(committed) => return Some(committed),
            Err(error) if is_retriable(&error) && Instant::now() + pause < give_up() => {
                debug!("cannot read committed offsets yet, retrying: {error}");
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            Err(error) => {
                warn!(
                    group_id = config.group_id.as_deref().unwrap_or_default(),
                    "cannot read committed offsets after {:?}; librdkafka will try again, and offsets that finished out of order may run again: {error}",
                    started.elapsed()
                );
                return None;
            }
        }
    }
}

/// Where each assigned partition starts: its committed offset, or the
/// `auto.offset.reset` position when the group never committed one.
fn starting_positions(committed: &TopicPartitionList, config: &Config) -> TopicPartitionList {
    let reset = match config.kafka.get("auto.offset.reset").map(String::as_str) {
        None | Some("earliest" | "smallest" | "beginning") => Offset::Beginning,
        Some("latest" | "largest" | "end") => Offset::End,
        // `error` and anything new: let librdkafka apply its own rule.
        Some(_) => Offset::Invalid,
    };
    let mut positions = TopicPartitionList::new();
    for element in committed.elements() {
        let offset = match element.offset() {
            Offset::Offset(offset) => Offset::Offset(offset),
            _ => reset,
        };
        if let Err(error) =
            positions.add_partition_offset(element.topic(), element.partition(), offset)
        {
            warn!(
                topic = element.topic(),
                partition = element.partition(),
                "cannot set a starting position: {error}"
            );
            positions.add_partition(element.topic(), element.partition());
        }
    }
    positions
}

fn assign(consumer: &BaseConsumer<Hooks>, list: &TopicPartitionList, cooperative: bool) {
    let result = if cooperative {
        consumer.incremental_assign(list)
    } else {
        consumer.assign(list)
    };
    if let Err(error) = result {
        error!("cannot take the assigned partitions: {error}");
    }
}

fn unassign(consumer: &BaseConsumer<Hooks>, list: &TopicPartitionList, cooperative: bool) {
    let result = if cooperative {
        consumer.incremental_unassign(list)
    } else {
        consumer.unassign()
    };
    if let Err(error) = result {
        error!("cannot hand back the revoked partitions: {error}");
    }
}

/// Creates a manager, with its own message queue, for each newly assigned partition.
fn start_partitions(shared: &Arc<Shared>, committed: &TopicPartitionList) {
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
        if let Some(queue) = owner.as_ref().and_then(|owner| {
            let waker = Arc::clone(shared);
            PrefetchQueue::split(owner, &topic, element.partition(), move || waker.wake())
        }) {
            manager.attach_queue(queue);
        }
        let partition = element.partition();
        shared.metrics.emit(EventKind::PartitionAssigned, || {
            let event = Event::new(EventKind::PartitionAssigned, Arc::clone(&topic));
            event.at(partition, offset, None)
        });
        partitions.insert((topic, partition), manager);
    }
    info!(assigned = partitions.len(), "partitions assigned");
    drop(partitions);
    shared.wake();
}
