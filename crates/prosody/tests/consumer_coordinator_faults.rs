//! Group coordinator failures: an offset fetch that fails when partitions are
//! assigned, periodic commits the coordinator rejects, and a final commit that
//! meets a rebalance.
//!
//! Each test starts its own mock cluster, because injected request errors apply
//! to the whole cluster and must not leak into other tests.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use prosody::{Client, OptionValue};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};

use support::{unique, wait_until, Seen, DEADLINE};

const PARTITIONS: i32 = 2;
const PER_PARTITION: i64 = 50;

/// A private one-broker cluster with a two-partition topic holding
/// `PER_PARTITION` messages in each partition.
struct Cluster {
    mock: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    topic: String,
}

impl Cluster {
    fn start() -> Self {
        let mock = MockCluster::new(1).expect("mock cluster");
        let topic = unique("coordinator-faults");
        mock.create_topic(&topic, PARTITIONS, 1)
            .expect("create topic");
        let cluster = Self { mock, topic };
        cluster.produce(0..PER_PARTITION);
        cluster
    }

    /// Produces messages numbered `numbers` to every partition.
    fn produce(&self, numbers: std::ops::Range<i64>) {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", self.mock.bootstrap_servers())
            .set("linger.ms", "1")
            .create()
            .expect("raw producer");
        for partition in 0..PARTITIONS {
            for n in numbers.clone() {
                let key = format!("key-{}", n % 5);
                let payload = format!("{{\"n\":{n}}}");
                producer
                    .send(
                        BaseRecord::to(&self.topic)
                            .partition(partition)
                            .key(&key)
                            .payload(&payload),
                    )
                    .expect("queue a message");
            }
        }
        producer.flush(DEADLINE).expect("all messages acknowledged");
    }

    fn client(&self, group: &str, commit_interval: Duration) -> Arc<Client> {
        let config = support::config(group, &self.topic)
            .mock(false)
            .bootstrap_servers([self.mock.bootstrap_servers()])
            .commit_interval(commit_interval)
            .set("state_store", OptionValue::Str("memory".into()))
            .expect("state_store is an option")
            .build()
            .expect("valid config");
        Arc::new(Client::new(config).expect("client"))
    }

    /// The group's committed offsets, one per partition (-1 when none).
    fn committed(&self, group: &str) -> Vec<i64> {
        let reader: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.mock.bootstrap_servers())
            .set("group.id", group)
            .create()
            .expect("offset reader");
        let mut list = TopicPartitionList::new();
        for partition in 0..PARTITIONS {
            list.add_partition(&self.topic, partition);
        }
        let Ok(committed) = reader.committed_offsets(list, Duration::from_secs(5)) else {
            return vec![-1; PARTITIONS as usize];
        };
        committed
            .elements()
            .iter()
            .map(|element| match element.offset() {
                Offset::Offset(offset) => offset,
                _ => -1,
            })
            .collect()
    }

    async fn wait_for_commits(&self, group: &str) {
        let expected = vec![PER_PARTITION; PARTITIONS as usize];
        let started = Instant::now();
        loop {
            let committed = self.committed(group);
            if committed == expected {
                return;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "committed offsets stayed at {committed:?}, expected {expected:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn all_handled(seen: &Seen) -> bool {
    seen.positions().len() == (PARTITIONS as usize) * (PER_PARTITION as usize)
}

/// Subscribes a recording client and waits until it handled every message
/// `Cluster::start` produced.
async fn handle_all(client: &Client, what: &str) -> Seen {
    let seen = Seen::default();
    client.subscribe(seen.recorder()).expect("subscribe");
    wait_until(what, || all_handled(&seen)).await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_start_when_the_offset_fetch_at_assignment_fails() {
    let cluster = Cluster::start();
    // librdkafka gives up on a partition whose committed offset it cannot
    // fetch; Prosody must fetch it again and start the partition itself.
    cluster.mock.request_errors(
        RDKafkaApiKey::OffsetFetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_COORDINATOR; 5],
    );
    let group = unique("fetch-fails");
    let client = cluster.client(&group, Duration::from_millis(100));
    handle_all(
        &client,
        "every message handled despite failed offset fetches",
    )
    .await;
    client.unsubscribe().await.expect("unsubscribe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_periodic_commits_are_sent_again() {
    let cluster = Cluster::start();
    let group = unique("commits-rejected");
    let client = cluster.client(&group, Duration::from_millis(100));
    // Every commit for the next while fails; progress must still be committed
    // once the coordinator accepts commits again, without new messages.
    cluster.mock.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS; 30],
    );
    handle_all(&client, "every message handled").await;
    cluster.wait_for_commits(&group).await;
    client.unsubscribe().await.expect("unsubscribe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_final_commit_is_retried_when_the_coordinator_rejects_it() {
    let cluster = Cluster::start();
    let group = unique("final-commit");
    // No periodic commit runs during the test: only the final one can commit.
    let client = cluster.client(&group, Duration::from_secs(600));
    handle_all(&client, "every message handled").await;
    cluster.mock.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS; 3],
    );
    client.unsubscribe().await.expect("unsubscribe");
    assert_eq!(
        cluster.committed(&group),
        vec![PER_PARTITION; PARTITIONS as usize],
        "the final commit stored every partition's progress"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_offset_read_leaves_the_committed_offset_to_librdkafka() {
    let cluster = Cluster::start();
    let group = unique("read-fails");
    let first = cluster.client(&group, Duration::from_millis(100));
    handle_all(&first, "the first client handled everything").await;
    first.unsubscribe().await.expect("unsubscribe");
    assert_eq!(
        cluster.committed(&group),
        vec![PER_PARTITION; PARTITIONS as usize]
    );

    const MORE: i64 = 10;
    cluster.produce(PER_PARTITION..PER_PARTITION + MORE);
    // A permanent error: Prosody's own read gives up at once, and librdkafka's
    // read, which follows, succeeds. The partitions must resume at the committed
    // offset, not at `auto.offset.reset`.
    cluster.mock.request_errors(
        RDKafkaApiKey::OffsetFetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED],
    );
    let second = cluster.client(&group, Duration::from_millis(100));
    let resumed = Seen::default();
    second.subscribe(resumed.recorder()).expect("subscribe");
    wait_until("the new messages handled", || {
        resumed
            .positions()
            .iter()
            .filter(|(_, offset)| *offset >= PER_PARTITION)
            .count()
            == (PARTITIONS * MORE as i32) as usize
    })
    .await;
    second.unsubscribe().await.expect("unsubscribe");
    let replayed: Vec<_> = resumed
        .positions()
        .into_iter()
        .filter(|(_, offset)| *offset < PER_PARTITION)
        .collect();
    assert!(
        replayed.is_empty(),
        "committed messages ran again: {replayed:?}"
    );
}
