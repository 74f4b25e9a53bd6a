//! Reads the consumer group's committed offsets, to know when the group has
//! durably finished: every partition committed up to the end of its log.
//!
//! Waiting for this (not only for every message to be handled once) is what
//! makes a run exercise redelivery: a worker killed before committing leaves its
//! partitions behind, and they only catch up after a new owner has handled the
//! uncommitted messages again. A graceful stop must never move a commit back.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};

use crate::error::{Error, Result};
use crate::manifest::Produced;

/// How long one OffsetFetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// A partition whose committed offset is short of its log end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lag {
    /// The partition.
    pub partition: i32,
    /// Its committed offset (`None`: nothing committed).
    pub committed: Option<i64>,
    /// The end of its log.
    pub end: i64,
}

/// Looks up a group's committed offsets without joining the group.
pub struct CommitWatcher {
    consumer: BaseConsumer,
    topic: String,
}

impl CommitWatcher {
    /// A client for `group`'s offsets on `topic`; it never subscribes, so it never joins.
    pub fn new(bootstrap_servers: &str, group: &str, topic: &str) -> Result<CommitWatcher> {
        let consumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap_servers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("log_level", "3")
            .create()
            .map_err(Error::kafka("creating the commit watcher"))?;
        Ok(CommitWatcher {
            consumer,
            topic: topic.to_owned(),
        })
    }

    /// The group's committed offset of each partition in `ends` (`None`: nothing committed).
    pub fn committed(&self, ends: &BTreeMap<i32, i64>) -> Result<BTreeMap<i32, Option<i64>>> {
        let mut wanted = TopicPartitionList::new();
        for &partition in ends.keys() {
            wanted.add_partition(&self.topic, partition);
        }
        let committed = self
            .consumer
            .committed_offsets(wanted, FETCH_TIMEOUT)
            .map_err(Error::kafka("fetching the group's committed offsets"))?;
        Ok(ends
            .keys()
            .map(|&partition| {
                let offset = committed
                    .find_partition(&self.topic, partition)
                    .and_then(|element| match element.offset() {
                        Offset::Offset(offset) => Some(offset),
                        _ => None,
                    });
                (partition, offset)
            })
            .collect())
    }
}

/// The partitions whose committed offset is short of their end.
pub fn lagging(committed: &BTreeMap<i32, Option<i64>>, ends: &BTreeMap<i32, i64>) -> Vec<Lag> {
    ends.iter()
        .filter_map(|(&partition, &end)| {
            let committed = committed.get(&partition).copied().flatten();
            committed.is_none_or(|offset| offset < end).then_some(Lag {
                partition,
                committed,
                end,
            })
        })
        .collect()
}

/// The partitions whose committed offset is lower in `after` than in `before`.
pub fn moved_back(
    before: &BTreeMap<i32, Option<i64>>,
    after: &BTreeMap<i32, Option<i64>>,
) -> Vec<(i32, i64, Option<i64>)> {
    before
        .iter()
        .filter_map(|(&partition, &was)| {
            let was = was?;
            let now = after.get(&partition).copied().flatten();
            now.is_none_or(|now| now < was)
                .then_some((partition, was, now))
        })
        .collect()
}

/// Each partition's log end (last offset + 1), from what was produced.
pub fn log_ends(produced: &[Produced]) -> BTreeMap<i32, i64> {
    let mut ends = BTreeMap::new();
    for message in produced {
        let end = ends.entry(message.partition).or_insert(0);
        *end = (*end).max(message.offset + 1);
    }
    ends
}

/// "p0 at 120 of 130, p3 at none of 40".
pub(crate) fn describe(lags: &[Lag]) -> String {
    lags.iter()
        .map(|lag| {
            let committed = lag
                .committed
                .map_or_else(|| "nothing".to_owned(), |offset| offset.to_string());
            format!("p{} at {committed} of {}", lag.partition, lag.end)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lags_and_backward_moves_are_found() {
        let ends = BTreeMap::from([(0, 10), (1, 20), (2, 5)]);
        let before = BTreeMap::from([(0, Some(10)), (1, Some(15)), (2, None)]);
        let lags = lagging(&before, &ends);
        assert_eq!(
            lags.iter().map(|lag| lag.partition).collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(describe(&lags), "p1 at 15 of 20, p2 at nothing of 5");

        let after = BTreeMap::from([(0, Some(9)), (1, Some(20)), (2, Some(5))]);
        assert_eq!(moved_back(&before, &after), [(0, 10, Some(9))]);
        assert!(lagging(&after, &ends).iter().all(|lag| lag.partition == 0));
    }
}
