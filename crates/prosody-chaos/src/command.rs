//! The mock broker's control language: one command per line on its stdin.
//!
//! ```text
//! down <broker>                                   stop a broker: connections closed, new ones refused
//! up <broker>                                     start it again on the same port
//! rtt <broker> <ms>                               add round-trip time to every response (0 removes it)
//! errors <api> <count> <code>                     the next <count> requests of <api>, on any broker, fail
//! broker-errors <broker> <api> <count> <code> [<rtt_ms>]
//!                                                 the same, on one broker, each response delayed
//! leader <topic> <partition> <broker>             move a partition's leadership
//! coordinator <group|transaction> <key> <broker>  move a group's (or transaction's) coordinator
//! topic <name> <partitions> [<replication>]       create a topic
//! ```
//!
//! `<api>` is a Kafka request name (`Fetch`, `OffsetCommit`, ...) or number; `<code>`
//! is an error name as librdkafka spells it without its prefix
//! (`NOT_LEADER_FOR_PARTITION`, `REQUEST_TIMED_OUT`, `_TRANSPORT` to drop the
//! connection) or its number. The broker answers each command with `ok` or
//! `error: <reason>` on one line.

use std::fmt;
use std::str::FromStr;

use rdkafka::types::RDKafkaRespErr;

use crate::error::{Error, Result};

/// Kafka request types that faults can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApiKey {
    /// Producing records.
    Produce,
    /// Fetching records.
    Fetch,
    /// Looking up offsets by time.
    ListOffsets,
    /// Cluster and topic metadata.
    Metadata,
    /// Committing consumer offsets.
    OffsetCommit,
    /// Reading committed offsets.
    OffsetFetch,
    /// Finding the group coordinator.
    FindCoordinator,
    /// Joining a consumer group.
    JoinGroup,
    /// Group member liveness.
    Heartbeat,
    /// Leaving a consumer group.
    LeaveGroup,
    /// Distributing a group's assignment.
    SyncGroup,
    /// Getting an idempotent producer id.
    InitProducerId,
}

impl ApiKey {
    /// Every request type this language names.
    pub const ALL: [ApiKey; 12] = [
        ApiKey::Produce,
        ApiKey::Fetch,
        ApiKey::ListOffsets,
        ApiKey::Metadata,
        ApiKey::OffsetCommit,
        ApiKey::OffsetFetch,
        ApiKey::FindCoordinator,
        ApiKey::JoinGroup,
        ApiKey::Heartbeat,
        ApiKey::LeaveGroup,
        ApiKey::SyncGroup,
        ApiKey::InitProducerId,
    ];

    /// The request's number in the Kafka protocol.
    pub fn code(self) -> i16 {
        match self {
            ApiKey::Produce => 0,
            ApiKey::Fetch => 1,
            ApiKey::ListOffsets => 2,
            ApiKey::Metadata => 3,
            ApiKey::OffsetCommit => 8,
            ApiKey::OffsetFetch => 9,
            ApiKey::FindCoordinator => 10,
            ApiKey::JoinGroup => 11,
            ApiKey::Heartbeat => 12,
            ApiKey::LeaveGroup => 13,
            ApiKey::SyncGroup => 14,
            ApiKey::InitProducerId => 22,
        }
    }

    /// The request's name in the Kafka protocol.
    pub fn name(self) -> &'static str {
        match self {
            ApiKey::Produce => "Produce",
            ApiKey::Fetch => "Fetch",
            ApiKey::ListOffsets => "ListOffsets",
            ApiKey::Metadata => "Metadata",
            ApiKey::OffsetCommit => "OffsetCommit",
            ApiKey::OffsetFetch => "OffsetFetch",
            ApiKey::FindCoordinator => "FindCoordinator",
            ApiKey::JoinGroup => "JoinGroup",
            ApiKey::Heartbeat => "Heartbeat",
            ApiKey::LeaveGroup => "LeaveGroup",
            ApiKey::SyncGroup => "SyncGroup",
            ApiKey::InitProducerId => "InitProducerId",
        }
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ApiKey {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let by_number = text.parse::<i16>().ok();
        ApiKey::ALL
            .into_iter()
            .find(|api| api.name().eq_ignore_ascii_case(text) || Some(api.code()) == by_number)
            .ok_or_else(|| {
                let names: Vec<_> = ApiKey::ALL.iter().map(|api| api.name()).collect();
                format!(
                    "unknown request type `{text}` (one of {})",
                    names.join(", ")
                )
            })
    }
}

/// A Kafka (or librdkafka-local) error code to inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorCode(RDKafkaRespErr);

impl ErrorCode {
    /// Connection closed by the broker as the request arrives (librdkafka's `_TRANSPORT`).
    pub const TRANSPORT: ErrorCode = ErrorCode(RDKafkaRespErr::RD_KAFKA_RESP_ERR__TRANSPORT);
    /// The broker is not the partition's leader (`NOT_LEADER_FOR_PARTITION`, 6).
    pub const NOT_LEADER: ErrorCode =
        ErrorCode(RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION);
    /// The leader is being elected (`LEADER_NOT_AVAILABLE`, 5).
    pub const LEADER_NOT_AVAILABLE: ErrorCode =
        ErrorCode(RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE);
    /// The broker gave up waiting (`REQUEST_TIMED_OUT`, 7).
    pub const REQUEST_TIMED_OUT: ErrorCode =
        ErrorCode(RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT);
    /// A replica's disk failed (`KAFKA_STORAGE_ERROR`, 56).
    pub const STORAGE_ERROR: ErrorCode =
        ErrorCode(RDKafkaRespErr::RD_KAFKA_RESP_ERR_KAFKA_STORAGE_ERROR);
    /// Too few in-sync replicas to accept a write (`NOT_ENOUGH_REPLICAS`, 19).
    pub const NOT_ENOUGH_REPLICAS: ErrorCode =
        ErrorCode(RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS);
    /// The coordinator is loading its state (`COORDINATOR_LOAD_IN_PROGRESS`, 14).
    pub const COORDINATOR_LOADING: ErrorCode =
        ErrorCode(RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS);
    /// No coordinator right now (`COORDINATOR_NOT_AVAILABLE`, 15).
    pub const COORDINATOR_NOT_AVAILABLE: ErrorCode =
        ErrorCode(RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE);
    /// This broker is no longer the coordinator (`NOT_COORDINATOR`, 16).
    pub const NOT_COORDINATOR: ErrorCode =
        ErrorCode(RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_COORDINATOR);
    /// The group moved to a new generation (`ILLEGAL_GENERATION`, 22).
    pub const ILLEGAL_GENERATION: ErrorCode =
        ErrorCode(RDKafkaRespErr::RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION);
    /// The member was expelled from the group (`UNKNOWN_MEMBER_ID`, 25).
    pub const UNKNOWN_MEMBER_ID: ErrorCode =
        ErrorCode(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_MEMBER_ID);
    /// The group is rebalancing (`REBALANCE_IN_PROGRESS`, 27).
    pub const REBALANCE_IN_PROGRESS: ErrorCode =
        ErrorCode(RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS);

    /// The code as librdkafka's enum.
    pub fn raw(self) -> RDKafkaRespErr {
        self.0
    }

    /// The code's name as librdkafka spells it, without the `RD_KAFKA_RESP_ERR_` prefix.
    pub fn name(self) -> String {
        let full = format!("{:?}", self.0);
        full.strip_prefix("RD_KAFKA_RESP_ERR_")
            .unwrap_or(&full)
            .to_owned()
    }

    fn all() -> impl Iterator<Item = ErrorCode> {
        let first = RDKafkaRespErr::RD_KAFKA_RESP_ERR__BEGIN as i32;
        let last = RDKafkaRespErr::RD_KAFKA_RESP_ERR_END_ALL as i32;
        (first..=last).filter_map(|code| RDKafkaRespErr::try_from(code).ok().map(ErrorCode))
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl FromStr for ErrorCode {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        if let Ok(number) = text.parse::<i32>() {
            return RDKafkaRespErr::try_from(number)
                .map(ErrorCode)
                .map_err(|_| format!("unknown error code {number}"));
        }
        ErrorCode::all()
            .find(|code| code.name().eq_ignore_ascii_case(text))
            .ok_or_else(|| {
                format!("unknown error name `{text}` (e.g. NOT_LEADER_FOR_PARTITION, or a number)")
            })
    }
}

/// One control command for the mock broker (see the module docs for the syntax).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerCommand {
    /// Take a broker down.
    Down {
        /// Broker id (1-based).
        broker: i32,
    },
    /// Bring a broker back up.
    Up {
        /// Broker id (1-based).
        broker: i32,
    },
    /// Set a broker's added round-trip time.
    Rtt {
        /// Broker id (1-based).
        broker: i32,
        /// Milliseconds; 0 removes the delay.
        ms: i32,
    },
    /// Fail the next `count` requests of `api`, on whichever broker they reach.
    Errors {
        /// Request type.
        api: ApiKey,
        /// How many requests fail.
        count: usize,
        /// The error they fail with.
        code: ErrorCode,
    },
    /// Fail the next `count` requests of `api` on one broker, each answered after `rtt_ms`.
    BrokerErrors {
        /// Broker id (1-based).
        broker: i32,
        /// Request type.
        api: ApiKey,
        /// How many requests fail.
        count: usize,
        /// The error they fail with.
        code: ErrorCode,
        /// Delay before each failing response, in milliseconds.
        rtt_ms: i32,
    },
    /// Move a partition's leadership to another broker.
    Leader {
        /// Topic name.
        topic: String,
        /// Partition number.
        partition: i32,
        /// The new leader.
        broker: i32,
    },
    /// Move a coordinator to another broker.
    Coordinator {
        /// `group` or `transaction`.
        kind: String,
        /// The group id (or transactional id).
        key: String,
        /// The new coordinator.
        broker: i32,
    },
    /// Create a topic.
    Topic {
        /// Topic name.
        name: String,
        /// Partition count.
        partitions: i32,
        /// Replicas per partition (at most the broker count).
        replication: i32,
    },
}

impl fmt::Display for BrokerCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BrokerCommand::Down { broker } => write!(f, "down {broker}"),
            BrokerCommand::Up { broker } => write!(f, "up {broker}"),
            BrokerCommand::Rtt { broker, ms } => write!(f, "rtt {broker} {ms}"),
            BrokerCommand::Errors { api, count, code } => write!(f, "errors {api} {count} {code}"),
            BrokerCommand::BrokerErrors {
                broker,
                api,
                count,
                code,
                rtt_ms,
            } => write!(f, "broker-errors {broker} {api} {count} {code} {rtt_ms}"),
            BrokerCommand::Leader {
                topic,
                partition,
                broker,
            } => write!(f, "leader {topic} {partition} {broker}"),
            BrokerCommand::Coordinator { kind, key, broker } => {
                write!(f, "coordinator {kind} {key} {broker}")
            }
            BrokerCommand::Topic {
                name,
                partitions,
                replication,
            } => write!(f, "topic {name} {partitions} {replication}"),
        }
    }
}

impl FromStr for BrokerCommand {
    type Err = Error;

    fn from_str(line: &str) -> Result<Self> {
        parse_words(&line.split_whitespace().collect::<Vec<_>>()).map_err(|reason| Error::Command {
            line: line.trim().to_owned(),
            reason,
        })
    }
}

fn parse_words(words: &[&str]) -> std::result::Result<BrokerCommand, String> {
    let command = match words {
        ["down", broker] => BrokerCommand::Down {
            broker: number(broker, "broker")?,
        },
        ["up", broker] => BrokerCommand::Up {
            broker: number(broker, "broker")?,
        },
        ["rtt", broker, ms] => BrokerCommand::Rtt {
            broker: number(broker, "broker")?,
            ms: number(ms, "milliseconds")?,
        },
        ["errors", api, count, code] => BrokerCommand::Errors {
            api: api.parse()?,
            count: number(count, "count")?,
            code: code.parse()?,
        },
        ["broker-errors", broker, api, count, code, rest @ ..] if rest.len() <= 1 => {
            BrokerCommand::BrokerErrors {
                broker: number(broker, "broker")?,
                api: api.parse()?,
                count: number(count, "count")?,
                code: code.parse()?,
                rtt_ms: rest
                    .first()
                    .map_or(Ok(0), |ms| number(ms, "milliseconds"))?,
            }
        }
        ["leader", topic, partition, broker] => BrokerCommand::Leader {
            topic: (*topic).to_owned(),
            partition: number(partition, "partition")?,
            broker: number(broker, "broker")?,
        },
        ["coordinator", kind @ ("group" | "transaction"), key, broker] => {
            BrokerCommand::Coordinator {
                kind: (*kind).to_owned(),
                key: (*key).to_owned(),
                broker: number(broker, "broker")?,
            }
        }
        ["topic", name, partitions, rest @ ..] if rest.len() <= 1 => BrokerCommand::Topic {
            name: (*name).to_owned(),
            partitions: number(partitions, "partitions")?,
            replication: rest.first().map_or(Ok(1), |r| number(r, "replication"))?,
        },
        [] => return Err("empty command".to_owned()),
        [word, ..] => {
            return Err(format!(
                "unknown command or wrong arguments for `{word}` (down, up, rtt, errors, \
                 broker-errors, leader, coordinator, topic)"
            ))
        }
    };
    Ok(command)
}

fn number<T: FromStr>(text: &str, what: &str) -> std::result::Result<T, String> {
    text.parse()
        .map_err(|_| format!("{what} must be a number, got `{text}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_through_their_text() {
        let commands = [
            BrokerCommand::Down { broker: 2 },
            BrokerCommand::Up { broker: 2 },
            BrokerCommand::Rtt { broker: 1, ms: 250 },
            BrokerCommand::Errors {
                api: ApiKey::OffsetCommit,
                count: 3,
                code: ErrorCode::NOT_COORDINATOR,
            },
            BrokerCommand::BrokerErrors {
                broker: 3,
                api: ApiKey::Fetch,
                count: 2,
                code: ErrorCode::TRANSPORT,
                rtt_ms: 100,
            },
            BrokerCommand::Leader {
                topic: "events".to_owned(),
                partition: 4,
                broker: 1,
            },
            BrokerCommand::Coordinator {
                kind: "group".to_owned(),
                key: "chaos".to_owned(),
                broker: 2,
            },
            BrokerCommand::Topic {
                name: "events".to_owned(),
                partitions: 8,
                replication: 3,
            },
        ];
        for command in commands {
            let text = command.to_string();
            assert_eq!(text.parse::<BrokerCommand>().unwrap(), command, "{text}");
        }
    }

    #[test]
    fn names_and_numbers_are_both_accepted() {
        let by_name: BrokerCommand = "errors heartbeat 1 REBALANCE_IN_PROGRESS".parse().unwrap();
        let by_number: BrokerCommand = "errors 12 1 27".parse().unwrap();
        assert_eq!(by_name, by_number);
        assert_eq!(ErrorCode::TRANSPORT.name(), "_TRANSPORT");
        assert_eq!(
            "_transport".parse::<ErrorCode>().unwrap(),
            ErrorCode::TRANSPORT
        );
    }

    #[test]
    fn mistakes_are_explained() {
        let error = "errors Fletch 1 6".parse::<BrokerCommand>().unwrap_err();
        assert!(
            error.to_string().contains("unknown request type `Fletch`"),
            "{error}"
        );
        let error = "down one".parse::<BrokerCommand>().unwrap_err();
        assert!(
            error.to_string().contains("broker must be a number"),
            "{error}"
        );
        let error = "errors Fetch 1 NOT_AN_ERROR"
            .parse::<BrokerCommand>()
            .unwrap_err();
        assert!(error.to_string().contains("unknown error name"), "{error}");
        assert!("explode 1".parse::<BrokerCommand>().is_err());
        assert!("".parse::<BrokerCommand>().is_err());
    }
}
