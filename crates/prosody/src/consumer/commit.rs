//! Commits: every way the consumer tells the group how far it got.
//!
//! | commit | when | answer |
//! | --- | --- | --- |
//! | periodic ([`PeriodicCommit`]) | every `commit_interval`, on the poll thread: partitions whose commit point moved, and every [`FULL_COMMIT_EVERY`] ticks all of them | not awaited |
//! | revocation (`hooks.rs`) | when partitions are revoked, before they are handed back | awaited until the revocation's deadline ([`commit_by`]) |
//! | final ([`commit_finally`]) | on `unsubscribe`, before leaving the group | awaited, and retried while retriable, until the stop deadline |
//!
//! A partition's commit point is its [`OffsetTracker`](super::offsets::OffsetTracker)'s
//! watermark with the offsets finished above it in the metadata.

use std::ffi::c_int;
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use rdkafka_sys as rdsys;
use tracing::{debug, error, warn};

use super::hooks::Hooks;
use super::partition::PartitionManager;
use super::shared::{KafkaConsumer, Shared};

/// Every this many commit ticks, all commit points are sent, moved or not.
pub(crate) const FULL_COMMIT_EVERY: u64 = 5;

/// Which commit points a commit sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Points {
    /// Those that moved since the periodic commit last sent them.
    Moved,
    /// All of them (counting as sent for [`Points::Moved`]).
    All,
    /// All of them as they are now, without touching the partitions.
    Current,
    /// All of them, marking the partitions handed back (see [`PartitionManager::release`]).
    Release,
}

/// The periodic commit of the poll thread.
///
/// Sends the partitions whose commit point moved since their last commit, and
/// every [`FULL_COMMIT_EVERY`] ticks all of them: librdkafka reports the result
/// of an async manual commit only to an `offset_commit_cb`, which rust-rdkafka
/// does not install, so re-sending is how a rejected commit gets repaired (the
/// Java client's auto-commit likewise re-sends unchanged positions).
pub(crate) struct PeriodicCommit {
    interval: Duration,
    last: Instant,
    /// Ticks so far.
    ticks: u64,
}

impl PeriodicCommit {
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: Instant::now(),
            ticks: 0,
        }
    }

    /// How long until the next commit is due.
    pub(crate) fn until_due(&self) -> Duration {
        self.interval.saturating_sub(self.last.elapsed())
    }

    /// Commits if `commit_interval` has passed since the last tick.
    pub(crate) fn tick(&mut self, consumer: &KafkaConsumer, shared: &Shared) {
        if self.last.elapsed() < self.interval {
            return;
        }
        self.last = Instant::now();
        self.ticks += 1;
        let points = if self.ticks % FULL_COMMIT_EVERY == 0 {
            Points::All
        } else {
            Points::Moved
        };
        let list = commit_points(&shared.managers(), points);
        if list.count() == 0 {
            return;
        }
        let sent = consumer.commit(&list, CommitMode::Async);
        shared.metrics.committed(sent.is_ok());
        if let Err(error) = sent {
            warn!("commit failed; the next full commit sends it again: {error}");
        }
    }
}

/// The given partitions' commit points, as `points` selects them.
fn commit_points(managers: &[Arc<PartitionManager>], points: Points) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    for manager in managers {
        let point = match points {
            Points::Moved => manager.periodic_commit_point(true),
            Points::All => manager.periodic_commit_point(false),
            Points::Current => manager.commit_point(),
            Points::Release => manager.release(),
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
    list
}

/// The last commit before leaving the group, sent again until `deadline` while
/// the coordinator answers with a retriable error (a group-wide stop meets
/// `REBALANCE_IN_PROGRESS`). Polls between attempts so the consumer can rejoin;
/// a partition revoked meanwhile was committed by the revocation and drops out.
pub(crate) fn commit_finally(
    consumer: &KafkaConsumer,
    shared: &Shared,
    managers: &[Arc<PartitionManager>],
    deadline: Instant,
) {
    let mut pause = Duration::from_millis(50);
    let mut result = commit_by(consumer, managers, true, deadline);
    loop {
        shared.metrics.committed(result.is_ok());
        match result {
            Ok(()) => {
                debug!("final commit done");
                return;
            }
            Err(CommitError::Kafka(error))
                if is_retriable(&error) && Instant::now() + pause < deadline =>
            {
                debug!("final commit failed, retrying: {error}");
                let _ = consumer.poll(Duration::ZERO);
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(500));
                result = commit_by(consumer, &shared.managers(), false, deadline);
            }
            Err(CommitError::Unconfirmed) => {
                warn!("final commit not confirmed within shutdown_timeout; messages handled since the last confirmed commit may be handled again");
                return;
            }
            Err(error) => {
                error!("final commit failed; messages handled since the last commit will be handled again: {error}");
                return;
            }
        }
    }
}

/// Why a commit that waits for its answer did not succeed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommitError {
    /// The coordinator answered with an error (or the request could not be sent).
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// No answer before the deadline; librdkafka may still deliver the commit later.
    #[error("no answer from the group coordinator before the deadline")]
    Unconfirmed,
}

/// Commits the given partitions' commit points (`release` marks them handed
/// back) and waits for the coordinator's answer until `deadline`.
///
/// A synchronous `rd_kafka_commit` waits with no timeout of its own: for a
/// missing coordinator librdkafka holds the commit for `session.timeout.ms`.
/// `rd_kafka_commit_queue` instead posts the result to a queue of ours, which
/// is polled with the time left. This keeps the wait on this thread, without
/// serving the consumer queue (no rebalance callback runs inside it) and
/// without a helper thread left behind holding the consumer.
pub(crate) fn commit_by(
    consumer: &BaseConsumer<Hooks>,
    managers: &[Arc<PartitionManager>],
    release: bool,
    deadline: Instant,
) -> Result<(), CommitError> {
    let points = if release {
        Points::Release
    } else {
        Points::Current
    };
    let list = commit_points(managers, points);
    if list.count() == 0 {
        return Ok(());
    }
    let replies = ReplyQueue::new(consumer)?;
    // SAFETY: the client handle and `list` are alive for the call; librdkafka
    // copies the list, and the reply queue is valid (kept alive by librdkafka's
    // own reference until the reply is posted, even if we destroy ours first).
    // No callback is given, so the result arrives as an event on that queue.
    let err = unsafe {
        rdsys::rd_kafka_commit_queue(
            consumer.client().native_ptr(),
            list.ptr(),
            replies.0.as_ptr(),
            None,
            ptr::null_mut(),
        )
    };
    if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        return Err(KafkaError::ConsumerCommit(err.into()).into());
    }
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(CommitError::Unconfirmed);
        }
        let millis = c_int::try_from(left.as_millis())
            .unwrap_or(c_int::MAX)
            .max(1);
        // SAFETY: the queue is alive; the returned event (if any) is ours to destroy.
        let event = unsafe { rdsys::rd_kafka_queue_poll(replies.0.as_ptr(), millis) };
        if event.is_null() {
            continue;
        }
        // SAFETY: `event` is non-null and not yet destroyed; it is destroyed
        // exactly once, after its type and error are read.
        let (kind, err) = unsafe {
            let read = (
                rdsys::rd_kafka_event_type(event),
                rdsys::rd_kafka_event_error(event),
            );
            rdsys::rd_kafka_event_destroy(event);
            read
        };
        if kind != rdsys::RD_KAFKA_EVENT_OFFSET_COMMIT {
            continue;
        }
        if err == rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Ok(());
        }
        return Err(KafkaError::ConsumerCommit(err.into()).into());
    }
}

/// A librdkafka queue that receives the answer to one commit.
struct ReplyQueue(NonNull<rdsys::rd_kafka_queue_t>);

impl ReplyQueue {
    fn new(consumer: &BaseConsumer<Hooks>) -> KafkaResult<Self> {
        // SAFETY: the client handle is alive; the new queue is owned by `Self`
        // and destroyed in `Drop`.
        let queue = unsafe { rdsys::rd_kafka_queue_new(consumer.client().native_ptr()) };
        NonNull::new(queue)
            .map(Self)
            .ok_or(KafkaError::ConsumerCommit(RDKafkaErrorCode::Fail))
    }
}

impl Drop for ReplyQueue {
    fn drop(&mut self) {
        // SAFETY: the queue came from rd_kafka_queue_new and is destroyed once.
        // A reply posted after this is discarded by librdkafka.
        unsafe { rdsys::rd_kafka_queue_destroy(self.0.as_ptr()) };
    }
}

/// The end of a shutdown budget kept for the commit that follows the wait for
/// handlers: a tenth of it, at most a second.
pub(crate) fn commit_reserve(budget: Duration) -> Duration {
    (budget / 10).min(Duration::from_secs(1))
}

/// Whether a commit or offset fetch that failed with `error` may succeed if
/// sent again: the coordinator moved or is loading, or the group is between
/// generations (librdkafka rejoins on its own).
pub(crate) fn is_retriable(error: &KafkaError) -> bool {
    use RDKafkaErrorCode as Code;
    let Some(code) = error.rdkafka_error_code() else {
        return false;
    };
    matches!(
        code,
        Code::RebalanceInProgress
            | Code::IllegalGeneration
            | Code::NotCoordinator
            | Code::CoordinatorNotAvailable
            | Code::CoordinatorLoadInProgress
            | Code::RequestTimedOut
            | Code::NetworkException
            | Code::OperationTimedOut
            | Code::BrokerTransportFailure
            | Code::AllBrokersDown
            | Code::WaitingForCoordinator
    )
}
