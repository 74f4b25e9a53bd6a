//! What a run does and when, drawn up front from the seed: the messages and
//! when they are produced, the process kills and the broker faults.
//!
//! A quarter of the messages is produced before the workers start; the rest
//! arrives in bursts of random size during the first 80% of the chaos window.
//! The workers outpace production, so most kills land just after a burst, while
//! work is in flight; the others fall anywhere in the window.
//!
//! Faults never overlap: the chaos window is cut into one slot per fault and each
//! fault starts and is undone inside its slot, so the cluster is healthy again
//! before the next one and every fault is recoverable. Kills are independent of
//! faults.

use std::fmt;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;

use crate::command::{ApiKey, BrokerCommand, ErrorCode};

/// The size and shape of a run.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// A name for reports (`short`, `long`).
    pub name: &'static str,
    /// Messages to produce.
    pub messages: usize,
    /// Distinct keys they are spread over.
    pub keys: usize,
    /// Topic partitions.
    pub partitions: i32,
    /// Mock brokers (the topic is replicated to all of them).
    pub brokers: i32,
    /// Worker processes in the consumer group.
    pub workers: usize,
    /// Worker kills.
    pub kills: usize,
    /// Broker faults.
    pub faults: usize,
    /// How long kills and faults go on.
    pub window: Duration,
    /// Bursts the messages after the first quarter arrive in.
    pub bursts: usize,
    /// After the window, how long the consumers get to handle everything.
    pub drain: Duration,
}

impl Scenario {
    /// The test command's run: about a minute.
    pub fn short() -> Scenario {
        Scenario {
            name: "short",
            messages: 20_000,
            keys: 200,
            partitions: 4,
            brokers: 3,
            workers: 3,
            kills: 5,
            faults: 4,
            window: Duration::from_secs(40),
            bursts: 15,
            drain: Duration::from_secs(120),
        }
    }

    /// The on-demand run (`script/chaos --long`): several minutes.
    pub fn long() -> Scenario {
        Scenario {
            name: "long",
            messages: 200_000,
            keys: 200,
            partitions: 16,
            brokers: 3,
            workers: 5,
            kills: 50,
            faults: 20,
            window: Duration::from_secs(300),
            bursts: 100,
            drain: Duration::from_secs(600),
        }
    }
}

/// A message to produce: its key and its sequence number within the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedMessage {
    /// The key.
    pub key: String,
    /// 0, 1, 2, ... per key, in send order.
    pub seq: u64,
}

/// How a worker is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillKind {
    /// SIGKILL: no chance to commit or leave the group.
    Hard,
    /// SIGTERM: a graceful stop, which must exit 0.
    Graceful,
    /// SIGTERM, then SIGKILL this long after if it is still stopping.
    Interrupted(Duration),
}

impl fmt::Display for KillKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KillKind::Hard => f.write_str("SIGKILL"),
            KillKind::Graceful => f.write_str("SIGTERM"),
            KillKind::Interrupted(after) => write!(f, "SIGTERM+SIGKILL@{}ms", after.as_millis()),
        }
    }
}

/// A planned kill.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kill {
    /// Which worker slot to start looking from (the orchestrator prefers one that
    /// is busy, so the kill interrupts work).
    pub slot: usize,
    /// How.
    pub kind: KillKind,
    /// How long after it exits a replacement starts.
    pub restart_after: Duration,
}

/// Something the orchestrator does at a point in the window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Stop a worker (and later restart it).
    Kill(Kill),
    /// Send a command to the mock broker.
    Broker(BrokerCommand),
}

/// An [`Action`] at a time since the workers started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// When.
    pub at: Duration,
    /// What.
    pub action: Action,
}

/// The whole schedule of a run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The messages, in send order.
    pub messages: Vec<PlannedMessage>,
    /// How many of them are produced before the workers start.
    pub upfront: usize,
    /// The rest, as `(time since the window opened, how many)`, in order.
    pub bursts: Vec<(Duration, usize)>,
    /// Commands that set the cluster up before anything runs (leaders, coordinator).
    pub setup: Vec<BrokerCommand>,
    /// Kills and fault commands, sorted by time.
    pub steps: Vec<Step>,
    /// One line per fault, for the summary.
    pub faults: Vec<String>,
}

/// The topic a run uses.
pub const TOPIC: &str = "chaos-events";
/// The consumer group a run uses.
pub const GROUP: &str = "chaos";

/// Request types and the errors a real cluster answers them with now and then.
const REQUEST_ERRORS: &[(ApiKey, &[ErrorCode])] = &[
    (
        ApiKey::Fetch,
        &[
            ErrorCode::NOT_LEADER,
            ErrorCode::LEADER_NOT_AVAILABLE,
            ErrorCode::STORAGE_ERROR,
            ErrorCode::TRANSPORT,
        ],
    ),
    (
        ApiKey::OffsetCommit,
        &[
            ErrorCode::COORDINATOR_NOT_AVAILABLE,
            ErrorCode::NOT_COORDINATOR,
            ErrorCode::COORDINATOR_LOADING,
            ErrorCode::REQUEST_TIMED_OUT,
            ErrorCode::REBALANCE_IN_PROGRESS,
            ErrorCode::TRANSPORT,
        ],
    ),
    (
        ApiKey::OffsetFetch,
        &[ErrorCode::COORDINATOR_LOADING, ErrorCode::NOT_COORDINATOR],
    ),
    (
        ApiKey::Heartbeat,
        &[
            ErrorCode::REBALANCE_IN_PROGRESS,
            ErrorCode::NOT_COORDINATOR,
            ErrorCode::UNKNOWN_MEMBER_ID,
            ErrorCode::ILLEGAL_GENERATION,
        ],
    ),
    (
        ApiKey::JoinGroup,
        &[
            ErrorCode::COORDINATOR_LOADING,
            ErrorCode::COORDINATOR_NOT_AVAILABLE,
            ErrorCode::NOT_COORDINATOR,
        ],
    ),
    (
        ApiKey::SyncGroup,
        &[
            ErrorCode::REBALANCE_IN_PROGRESS,
            ErrorCode::NOT_COORDINATOR,
            ErrorCode::COORDINATOR_NOT_AVAILABLE,
        ],
    ),
    (
        ApiKey::Produce,
        &[
            ErrorCode::NOT_LEADER,
            ErrorCode::NOT_ENOUGH_REPLICAS,
            ErrorCode::TRANSPORT,
        ],
    ),
];

/// Draws the plan for `scenario` from `rng`.
pub fn draw(scenario: &Scenario, rng: &mut StdRng) -> Plan {
    let messages = draw_messages(scenario, rng);
    let upfront = messages.len() / 4;
    let bursts = draw_bursts(scenario, messages.len() - upfront, rng);
    let cluster = ClusterMap::new(scenario);
    let setup = cluster.setup_commands();
    let mut steps = Vec::new();
    let mut faults = Vec::new();

    let window = scenario.window.as_secs_f64();
    // The workers outpace production, so a kill at a random moment usually finds
    // them idle; most kills land just after a burst arrives, while work is in flight.
    let loaded: Vec<f64> = bursts
        .iter()
        .map(|(at, _)| at.as_secs_f64())
        .filter(|&at| at >= window * 0.15)
        .collect();
    for _ in 0..scenario.kills {
        let at = if !loaded.is_empty() && rng.random_bool(0.7) {
            loaded[rng.random_range(0..loaded.len())] + rng.random_range(0.05..0.6)
        } else {
            window * rng.random_range(0.15..0.95)
        };
        let at = Duration::from_secs_f64(at);
        let kind = match rng.random_range(0..100) {
            0..70 => KillKind::Hard,
            70..85 => KillKind::Graceful,
            _ => KillKind::Interrupted(Duration::from_millis(rng.random_range(20..400))),
        };
        let kill = Kill {
            slot: rng.random_range(0..scenario.workers.max(1)),
            kind,
            restart_after: Duration::from_millis(rng.random_range(0..3000)),
        };
        steps.push(Step {
            at,
            action: Action::Kill(kill),
        });
    }

    if scenario.faults > 0 {
        let slot = window / scenario.faults as f64;
        for index in 0..scenario.faults {
            let start = slot * index as f64 + slot * rng.random_range(0.0..0.3);
            let longest = slot * 0.6;
            let (description, commands) = draw_fault(&cluster, rng, longest);
            faults.push(format!("{:>6.1}s {description}", start));
            for (after, command) in commands {
                steps.push(Step {
                    at: Duration::from_secs_f64(start + after),
                    action: Action::Broker(command),
                });
            }
        }
    }
    steps.sort_by_key(|step| step.at);
    Plan {
        messages,
        upfront,
        bursts,
        setup,
        steps,
        faults,
    }
}

fn draw_messages(scenario: &Scenario, rng: &mut StdRng) -> Vec<PlannedMessage> {
    let keys: Vec<String> = (0..scenario.keys.max(1))
        .map(|index| format!("key-{index:03}"))
        .collect();
    let mut next_seq = vec![0_u64; keys.len()];
    (0..scenario.messages)
        .map(|_| {
            let key = rng.random_range(0..keys.len());
            let seq = next_seq[key];
            next_seq[key] += 1;
            PlannedMessage {
                key: keys[key].clone(),
                seq,
            }
        })
        .collect()
}

/// Splits `count` messages into bursts at random times in the first 80% of the window.
fn draw_bursts(scenario: &Scenario, count: usize, rng: &mut StdRng) -> Vec<(Duration, usize)> {
    let bursts = scenario.bursts.clamp(1, count.max(1));
    let mut times: Vec<f64> = (0..bursts)
        .map(|_| rng.random_range(0.0..0.8) * scenario.window.as_secs_f64())
        .collect();
    times.sort_by(f64::total_cmp);
    // Cut points drawn uniformly make sizes vary from a handful to several times the mean.
    let mut cuts: Vec<usize> = (1..bursts).map(|_| rng.random_range(0..=count)).collect();
    cuts.push(count);
    cuts.sort_unstable();
    let mut previous = 0;
    times
        .into_iter()
        .zip(cuts)
        .map(|(at, cut)| {
            let size = cut - previous;
            previous = cut;
            (Duration::from_secs_f64(at), size)
        })
        .collect()
}

/// Who leads what when the cluster is healthy (faults move it and move it back).
struct ClusterMap {
    brokers: i32,
    leaders: Vec<i32>,
    coordinator: i32,
}

impl ClusterMap {
    fn new(scenario: &Scenario) -> ClusterMap {
        let brokers = scenario.brokers.max(1);
        ClusterMap {
            brokers,
            leaders: (0..scenario.partitions).map(|p| p % brokers + 1).collect(),
            coordinator: 1,
        }
    }

    fn setup_commands(&self) -> Vec<BrokerCommand> {
        let mut commands: Vec<BrokerCommand> = self
            .leaders
            .iter()
            .enumerate()
            .map(|(partition, &broker)| BrokerCommand::Leader {
                topic: TOPIC.to_owned(),
                partition: partition as i32,
                broker,
            })
            .collect();
        commands.push(BrokerCommand::Coordinator {
            kind: "group".to_owned(),
            key: GROUP.to_owned(),
            broker: self.coordinator,
        });
        commands
    }

    /// Moves everything `broker` leads or coordinates to the next broker, as a
    /// cluster does when a broker dies. Returns those moves and the ones that
    /// move it all back (a preferred-leader election once the broker is back).
    fn fail_over(&self, broker: i32) -> (Vec<BrokerCommand>, Vec<BrokerCommand>) {
        let successor = broker % self.brokers + 1;
        let leader = |partition: usize, broker: i32| BrokerCommand::Leader {
            topic: TOPIC.to_owned(),
            partition: partition as i32,
            broker,
        };
        let coordinator = |broker: i32| BrokerCommand::Coordinator {
            kind: "group".to_owned(),
            key: GROUP.to_owned(),
            broker,
        };
        let mut away = Vec::new();
        let mut back = Vec::new();
        for (partition, &current) in self.leaders.iter().enumerate() {
            if current == broker {
                away.push(leader(partition, successor));
                back.push(leader(partition, broker));
            }
        }
        if self.coordinator == broker {
            away.push(coordinator(successor));
            back.push(coordinator(broker));
        }
        (away, back)
    }
}

/// One fault: its description and its commands, each at seconds after its start.
fn draw_fault(
    cluster: &ClusterMap,
    rng: &mut StdRng,
    longest: f64,
) -> (String, Vec<(f64, BrokerCommand)>) {
    let broker = rng.random_range(1..=cluster.brokers);
    let lasting = |rng: &mut StdRng, low: f64, high: f64| {
        let high = high.min(longest).max(0.2);
        rng.random_range(low.min(high * 0.9)..high)
    };
    match rng.random_range(0..5) {
        // A broker restarts; what it leads is unavailable meanwhile.
        0 => {
            let down = lasting(rng, 1.0, 4.0);
            let what = if cluster.coordinator == broker {
                " (the group coordinator)"
            } else {
                ""
            };
            (
                format!("broker {broker}{what} down for {down:.1}s, then up"),
                vec![
                    (0.0, BrokerCommand::Down { broker }),
                    (down, BrokerCommand::Up { broker }),
                ],
            )
        }
        // A broker dies and the cluster elects new leaders (and a new coordinator).
        1 if cluster.brokers > 1 => {
            let down = lasting(rng, 2.0, 9.0);
            let mut commands = vec![(0.0, BrokerCommand::Down { broker })];
            let (away, back) = cluster.fail_over(broker);
            let moved = away.len();
            commands.extend(away.into_iter().map(|command| (0.2, command)));
            commands.push((down, BrokerCommand::Up { broker }));
            commands.extend(back.into_iter().map(|command| (down + 0.5, command)));
            (
                format!(
                    "broker {broker} down for {down:.1}s with failover ({moved} leaderships/coordinator \
                     moved away, and back 0.5s after it is up)"
                ),
                commands,
            )
        }
        // Latency on one broker.
        2 => {
            let ms = rng.random_range(50..800);
            let lasting = lasting(rng, 1.0, 6.0);
            (
                format!("broker {broker} +{ms}ms round trip for {lasting:.1}s"),
                vec![
                    (0.0, BrokerCommand::Rtt { broker, ms }),
                    (lasting, BrokerCommand::Rtt { broker, ms: 0 }),
                ],
            )
        }
        // Slow failing responses from one broker.
        3 => {
            let (api, code) = draw_request_error(rng);
            let count = rng.random_range(1..=3);
            let rtt_ms = rng.random_range(100..1000);
            (
                format!("broker {broker}: next {count} {api} answered {code} after {rtt_ms}ms"),
                vec![(
                    0.0,
                    BrokerCommand::BrokerErrors {
                        broker,
                        api,
                        count,
                        code,
                        rtt_ms,
                    },
                )],
            )
        }
        // Failing requests anywhere in the cluster.
        _ => {
            let (api, code) = draw_request_error(rng);
            let count = rng.random_range(1..=5);
            (
                format!("next {count} {api} requests fail with {code}"),
                vec![(0.0, BrokerCommand::Errors { api, count, code })],
            )
        }
    }
}

fn draw_request_error(rng: &mut StdRng) -> (ApiKey, ErrorCode) {
    let (api, codes) = REQUEST_ERRORS[rng.random_range(0..REQUEST_ERRORS.len())];
    (api, codes[rng.random_range(0..codes.len())])
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn the_same_seed_draws_the_same_plan() {
        let scenario = Scenario::short();
        let a = draw(&scenario, &mut StdRng::seed_from_u64(7));
        let b = draw(&scenario, &mut StdRng::seed_from_u64(7));
        assert_eq!(a.messages, b.messages);
        assert_eq!(a.steps, b.steps);
        assert_eq!(a.faults, b.faults);
    }

    #[test]
    fn a_plan_has_what_the_scenario_asks_for() {
        let scenario = Scenario::long();
        let plan = draw(&scenario, &mut StdRng::seed_from_u64(42));
        assert_eq!(plan.messages.len(), scenario.messages);
        let in_bursts: usize = plan.bursts.iter().map(|&(_, count)| count).sum();
        assert_eq!(plan.upfront + in_bursts, scenario.messages);
        assert_eq!(plan.bursts.len(), scenario.bursts);
        assert!(plan.bursts.windows(2).all(|pair| pair[0].0 <= pair[1].0));
        let kills = plan
            .steps
            .iter()
            .filter(|step| matches!(step.action, Action::Kill(_)))
            .count();
        assert_eq!(kills, scenario.kills);
        assert_eq!(plan.faults.len(), scenario.faults);
        assert!(plan.steps.windows(2).all(|pair| pair[0].at <= pair[1].at));
        assert!(plan.steps.iter().all(|step| step.at <= scenario.window));
    }

    #[test]
    fn every_broker_taken_down_comes_back_up_and_sequences_are_dense() {
        let scenario = Scenario::long();
        let plan = draw(&scenario, &mut StdRng::seed_from_u64(3));
        let mut down = std::collections::HashSet::new();
        for step in &plan.steps {
            match step.action {
                Action::Broker(BrokerCommand::Down { broker }) => assert!(down.insert(broker)),
                Action::Broker(BrokerCommand::Up { broker }) => assert!(down.remove(&broker)),
                _ => {}
            }
        }
        assert!(down.is_empty(), "left down: {down:?}");

        let mut next = std::collections::HashMap::new();
        for message in &plan.messages {
            let expected = next.entry(message.key.clone()).or_insert(0);
            assert_eq!(message.seq, *expected);
            *expected += 1;
        }
    }
}
