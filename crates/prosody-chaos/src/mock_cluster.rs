//! A librdkafka mock cluster owned by this process, with its fault-injection knobs.
//!
//! The mock cluster is a real Kafka protocol server on loopback TCP, run by a
//! thread inside librdkafka. It lives inside a client handle and is destroyed
//! before that handle, when [`MockCluster`] is dropped.

use std::ffi::{c_int, CStr, CString};
use std::ptr::NonNull;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer as _};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka_sys as rdsys;

use crate::command::BrokerCommand;
use crate::error::{Error, Result};

/// A running mock cluster of one or more brokers.
pub struct MockCluster {
    cluster: NonNull<rdsys::rd_kafka_mock_cluster_t>,
    bootstrap_servers: String,
    brokers: i32,
    // The cluster lives inside this client handle; `Drop` destroys the cluster
    // first, then this field is dropped.
    _owner: BaseProducer,
}

impl MockCluster {
    /// Starts a cluster of `brokers` brokers (ids 1..=brokers) on loopback, with
    /// the group join delay set to 0 (there is no real cluster to wait for).
    pub fn start(brokers: i32) -> Result<MockCluster> {
        if brokers < 1 {
            return Err(Error::Mock(format!(
                "a cluster needs at least one broker, got {brokers}"
            )));
        }
        let owner: BaseProducer = ClientConfig::new()
            .set("log_level", "3")
            .create()
            .map_err(Error::kafka("creating the mock cluster's client handle"))?;
        // SAFETY: `owner` is a live client handle. The cluster it returns is
        // destroyed in `Drop` before `owner` is dropped, so it never outlives it.
        let raw = unsafe { rdsys::rd_kafka_mock_cluster_new(owner.client().native_ptr(), brokers) };
        let cluster = NonNull::new(raw)
            .ok_or_else(|| Error::Mock("librdkafka refused to start a mock cluster".to_owned()))?;
        // SAFETY: `cluster` is alive; the string belongs to the cluster and is
        // copied before anything else touches it.
        let bootstrap_servers =
            unsafe { CStr::from_ptr(rdsys::rd_kafka_mock_cluster_bootstraps(cluster.as_ptr())) }
                .to_string_lossy()
                .into_owned();
        // SAFETY: `cluster` is alive; this only sets a field under the cluster's lock.
        unsafe { rdsys::rd_kafka_mock_group_initial_rebalance_delay_ms(cluster.as_ptr(), 0) };
        Ok(MockCluster {
            cluster,
            bootstrap_servers,
            brokers,
            _owner: owner,
        })
    }

    /// The brokers' `host:port` list, comma separated.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// How many brokers the cluster has.
    pub fn brokers(&self) -> i32 {
        self.brokers
    }

    /// Carries out one control command.
    pub fn apply(&self, command: &BrokerCommand) -> Result<()> {
        let cluster = self.cluster.as_ptr();
        match command {
            BrokerCommand::Down { broker } => {
                self.check_broker(*broker)?;
                // SAFETY: `cluster` is alive for as long as `self`.
                checked(unsafe { rdsys::rd_kafka_mock_broker_set_down(cluster, *broker) })
            }
            BrokerCommand::Up { broker } => {
                self.check_broker(*broker)?;
                // SAFETY: `cluster` is alive for as long as `self`.
                checked(unsafe { rdsys::rd_kafka_mock_broker_set_up(cluster, *broker) })
            }
            BrokerCommand::Rtt { broker, ms } => {
                self.check_broker(*broker)?;
                if *ms < 0 {
                    return Err(Error::Mock(format!("rtt must not be negative, got {ms}")));
                }
                // SAFETY: `cluster` is alive for as long as `self`.
                checked(unsafe { rdsys::rd_kafka_mock_broker_set_rtt(cluster, *broker, *ms) })
            }
            BrokerCommand::Errors { api, count, code } => {
                let errors = vec![code.raw(); *count];
                // SAFETY: `cluster` is alive; `errors` holds exactly `count`
                // codes and is only read during the call.
                unsafe {
                    rdsys::rd_kafka_mock_push_request_errors_array(
                        cluster,
                        api.code(),
                        errors.len(),
                        errors.as_ptr(),
                    );
                }
                Ok(())
            }
            BrokerCommand::BrokerErrors {
                broker,
                api,
                count,
                code,
                rtt_ms,
            } => {
                self.check_broker(*broker)?;
                for _ in 0..*count {
                    // SAFETY: `cluster` is alive. The variadic part is one
                    // (rd_kafka_resp_err_t, int) pair, matching `cnt` = 1; the enum
                    // is passed as the C int it is.
                    let result = unsafe {
                        rdsys::rd_kafka_mock_broker_push_request_error_rtts(
                            cluster,
                            *broker,
                            api.code(),
                            1,
                            code.raw() as c_int,
                            *rtt_ms as c_int,
                        )
                    };
                    checked(result)?;
                }
                Ok(())
            }
            BrokerCommand::Leader {
                topic,
                partition,
                broker,
            } => {
                self.check_broker(*broker)?;
                let topic = c_string(topic)?;
                // SAFETY: `cluster` is alive; `topic` outlives the call.
                checked(unsafe {
                    rdsys::rd_kafka_mock_partition_set_leader(
                        cluster,
                        topic.as_ptr(),
                        *partition,
                        *broker,
                    )
                })
            }
            BrokerCommand::Coordinator { kind, key, broker } => {
                self.check_broker(*broker)?;
                let kind = c_string(kind)?;
                let key = c_string(key)?;
                // SAFETY: `cluster` is alive; both strings outlive the call.
                checked(unsafe {
                    rdsys::rd_kafka_mock_coordinator_set(
                        cluster,
                        kind.as_ptr(),
                        key.as_ptr(),
                        *broker,
                    )
                })
            }
            BrokerCommand::Topic {
                name,
                partitions,
                replication,
            } => self.create_topic(name, *partitions, *replication),
        }
    }

    /// Creates a topic; replication is at most the broker count.
    pub fn create_topic(&self, name: &str, partitions: i32, replication: i32) -> Result<()> {
        if partitions < 1 || replication < 1 || replication > self.brokers {
            return Err(Error::Mock(format!(
                "topic `{name}`: need 1+ partitions and 1..={} replicas, got {partitions} and {replication}",
                self.brokers
            )));
        }
        let topic = c_string(name)?;
        // SAFETY: `cluster` is alive for as long as `self`; `topic` outlives the call.
        let code = unsafe {
            rdsys::rd_kafka_mock_topic_create(
                self.cluster.as_ptr(),
                topic.as_ptr(),
                partitions,
                replication,
            )
        };
        checked(code).map_err(|error| Error::Mock(format!("creating topic `{name}`: {error}")))
    }

    fn check_broker(&self, broker: i32) -> Result<()> {
        if (1..=self.brokers).contains(&broker) {
            Ok(())
        } else {
            Err(Error::Mock(format!(
                "no broker {broker}: this cluster has brokers 1..={}",
                self.brokers
            )))
        }
    }
}

impl Drop for MockCluster {
    fn drop(&mut self) {
        // SAFETY: the cluster is alive and is never used after this; the owning
        // client handle is still alive (fields are dropped after this body).
        unsafe { rdsys::rd_kafka_mock_cluster_destroy(self.cluster.as_ptr()) };
    }
}

fn checked(code: RDKafkaRespErr) -> Result<()> {
    match RDKafkaErrorCode::from(code) {
        RDKafkaErrorCode::NoError => Ok(()),
        error => Err(Error::Mock(error.to_string())),
    }
}

fn c_string(text: &str) -> Result<CString> {
    CString::new(text).map_err(|_| Error::Mock(format!("`{text}` contains a NUL byte")))
}
