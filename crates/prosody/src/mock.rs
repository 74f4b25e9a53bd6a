//! The in-process mock Kafka cluster used by `mock: true` and by tests.
//!
//! librdkafka's mock cluster is a real Kafka protocol server on loopback TCP,
//! run by a thread inside this process. Prosody starts at most one per process,
//! on first use, and keeps it for the life of the process so that every client,
//! and external tools such as kcat, see the same topics.

use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::sync::{Mutex, OnceLock};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka_sys as rdsys;

use crate::error::{Error, Result};

/// Partitions given to topics the mock cluster creates on demand.
pub const DEFAULT_PARTITIONS: i32 = 4;

struct MockCluster {
    cluster: *mut rdsys::rd_kafka_mock_cluster_t,
    bootstrap_servers: String,
    topics: Mutex<HashSet<String>>,
    /// The process that started it, and the only one with its threads.
    pid: u32,
    // The mock cluster lives inside this client handle and must not outlive it.
    _owner: BaseProducer,
}

// SAFETY: the raw pointer is only used with librdkafka's rd_kafka_mock_* functions,
// which hand each request to the mock cluster's own thread and are safe to call from
// any thread; the pointer is never dereferenced on the Rust side.
unsafe impl Send for MockCluster {}
// SAFETY: as above; shared references only ever pass the pointer to those functions.
unsafe impl Sync for MockCluster {}

static CLUSTER: OnceLock<std::result::Result<MockCluster, String>> = OnceLock::new();

fn cluster() -> Result<&'static MockCluster> {
    let cluster = CLUSTER
        .get_or_init(start)
        .as_ref()
        .map_err(|reason| Error::Mock(reason.clone()))?;
    // Its threads stayed in the parent: a call into it from a child would wait forever.
    if cluster.pid != std::process::id() {
        return Err(Error::Mock(format!(
            "the mock cluster was started by process {} before this process forked, and only \
             that process can manage it; start it after forking, or connect to it with \
             bootstrap_servers: {:?} instead of mock: true",
            cluster.pid, cluster.bootstrap_servers
        )));
    }
    Ok(cluster)
}

fn start() -> std::result::Result<MockCluster, String> {
    let owner: BaseProducer = ClientConfig::new()
        .set("log_level", "3")
        .create()
        .map_err(|error| format!("cannot create the mock cluster's client: {error}"))?;
    // SAFETY: `owner` is a live client handle; the mock cluster it creates is kept
    // together with `owner` in the returned struct, which lives in a static.
    let cluster = unsafe { rdsys::rd_kafka_mock_cluster_new(owner.client().native_ptr(), 1) };
    if cluster.is_null() {
        return Err("librdkafka refused to start a mock cluster".to_owned());
    }
    // SAFETY: `cluster` is non-null and alive; the returned string is owned by the
    // cluster and copied out immediately.
    let bootstrap_servers =
        unsafe { CStr::from_ptr(rdsys::rd_kafka_mock_cluster_bootstraps(cluster)) }
            .to_string_lossy()
            .into_owned();
    // SAFETY: `cluster` is non-null and alive. The default 3 s join delay only
    // slows tests and demos; there is no real cluster to wait for.
    unsafe { rdsys::rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, 0) };
    Ok(MockCluster {
        cluster,
        bootstrap_servers,
        topics: Mutex::new(HashSet::new()),
        pid: std::process::id(),
        _owner: owner,
    })
}

/// The mock cluster's `host:port` list, starting the cluster if needed.
pub fn bootstrap_servers() -> Result<String> {
    Ok(cluster()?.bootstrap_servers.clone())
}

/// Creates `topic` with `partitions` partitions unless it exists already.
///
/// Returns whether this call created it; an existing topic keeps its partition count.
pub fn create_topic(topic: &str, partitions: i32) -> Result<bool> {
    if partitions < 1 {
        return Err(Error::Mock(format!(
            "a topic needs at least one partition, got {partitions}"
        )));
    }
    let cluster = cluster()?;
    let mut topics = cluster
        .topics
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if topics.contains(topic) {
        return Ok(false);
    }
    let name = CString::new(topic)
        .map_err(|_| Error::Mock(format!("topic name `{topic}` contains a NUL byte")))?;
    // SAFETY: the cluster is alive for the whole process and `name` outlives the call.
    let code =
        unsafe { rdsys::rd_kafka_mock_topic_create(cluster.cluster, name.as_ptr(), partitions, 1) };
    let code = RDKafkaErrorCode::from(code);
    if code != RDKafkaErrorCode::NoError && code != RDKafkaErrorCode::TopicAlreadyExists {
        return Err(Error::Mock(format!(
            "cannot create topic `{topic}`: {code}"
        )));
    }
    topics.insert(topic.to_owned());
    Ok(code == RDKafkaErrorCode::NoError)
}

/// Creates `topic` with [`DEFAULT_PARTITIONS`] unless it exists already.
pub(crate) fn ensure_topic(topic: &str) -> Result<()> {
    create_topic(topic, DEFAULT_PARTITIONS).map(|_| ())
}
