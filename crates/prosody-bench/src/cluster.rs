//! Where the benchmarks run: the in-process mock cluster, or a real broker named
//! by `PROSODY_BENCH_BOOTSTRAP` (or `--bootstrap`).
//!
//! Against a real broker every client is built with `mock: false` and the
//! broker's address, and topics are created with the admin API. A broker that
//! refuses to create topics (librdkafka's mock cluster has no CreateTopics, nor
//! does a broker whose ACLs forbid it) gets them auto-created with its default
//! partition count instead, with a warning; scenarios use whatever count the
//! topic ends up with.
//!
//! `prosody-bench loopback [COMMAND…]` exercises the real-broker path without a
//! broker: it starts the mock cluster in its own process and runs COMMAND (by
//! default this program) with `PROSODY_BENCH_BOOTSTRAP` set to its address (and
//! `PROSODY_BENCH_LOOPBACK=1`, so scenarios still allow for the mock's quirks:
//! topics are auto-created, with 4 partitions, without asking the admin API,
//! which the mock lacks and which would only answer after a timeout).

use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use prosody::{Config, ConfigBuilder, OptionValue};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer as _};
use rdkafka::types::RDKafkaErrorCode;

use crate::BenchResult;

/// Environment variable naming a real broker to run against.
pub(crate) const BOOTSTRAP_ENV: &str = "PROSODY_BENCH_BOOTSTRAP";
/// Set by `loopback` for its command: the "real broker" is a mock cluster.
const LOOPBACK_ENV: &str = "PROSODY_BENCH_LOOPBACK";
/// Longest wait for a new topic to show up with leaders for all its partitions.
const TOPIC_DEADLINE: Duration = Duration::from_secs(60);
/// Longest wait for the admin API. The mock cluster names no controller, so
/// against it a CreateTopics request waits for one until this runs out.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Set once the broker has failed to create topics through the admin API.
static ADMIN_REFUSED: AtomicBool = AtomicBool::new(false);

/// The Kafka cluster every scenario of one run talks to.
#[derive(Debug, Clone)]
pub(crate) enum Cluster {
    /// librdkafka's mock cluster, inside this process.
    Mock,
    /// A broker at this `host:port` list.
    External(String),
}

impl Cluster {
    /// `--bootstrap` when given, else `PROSODY_BENCH_BOOTSTRAP`, else the mock.
    pub(crate) fn new(bootstrap: Option<String>) -> Self {
        bootstrap
            .or_else(|| std::env::var(BOOTSTRAP_ENV).ok())
            .filter(|servers| !servers.trim().is_empty())
            .map_or(Self::Mock, Self::External)
    }

    pub(crate) fn is_mock(&self) -> bool {
        matches!(self, Self::Mock)
    }

    /// Whether the broker is librdkafka's mock cluster, in this process or (under
    /// `loopback`) in the parent: its quirks then apply.
    pub(crate) fn is_mock_broker(&self) -> bool {
        self.is_mock() || std::env::var_os(LOOPBACK_ENV).is_some()
    }

    /// Where the brokers are, starting the mock cluster if needed.
    pub(crate) fn bootstrap_servers(&self) -> BenchResult<String> {
        match self {
            Self::Mock => prosody::mock::bootstrap_servers().map_err(|error| error.to_string()),
            Self::External(servers) => Ok(servers.clone()),
        }
    }

    /// For table headings.
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Mock => "in-process mock cluster".to_owned(),
            Self::External(servers) => format!("broker at {servers}"),
        }
    }

    /// A Prosody configuration for this cluster, with the probe server off (two
    /// clients at once would fight over its port).
    pub(crate) fn config(&self) -> BenchResult<ConfigBuilder> {
        let builder = match self {
            Self::Mock => Config::builder().mock(true),
            Self::External(servers) => Config::builder()
                .mock(false)
                .bootstrap_servers(servers.split(',').map(str::trim)),
        };
        builder
            .set("probe_port", OptionValue::Bool(false))
            .map_err(|error| error.to_string())
    }

    /// An rdkafka client configuration for this cluster.
    pub(crate) fn client_config(&self) -> BenchResult<ClientConfig> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", self.bootstrap_servers()?);
        Ok(config)
    }

    /// Creates `topic` with `partitions` partitions; returns how many it has.
    pub(crate) async fn create_topic(&self, topic: &str, partitions: usize) -> BenchResult<usize> {
        let counts = self
            .create_topics(&[(topic.to_owned(), partitions)])
            .await?;
        Ok(counts.first().copied().unwrap_or(partitions))
    }

    /// Creates each `(topic, partitions)`; returns the partition counts they have.
    pub(crate) async fn create_topics(
        &self,
        topics: &[(String, usize)],
    ) -> BenchResult<Vec<usize>> {
        let mut counts = Vec::with_capacity(topics.len());
        if self.is_mock() {
            for (topic, partitions) in topics {
                let count =
                    i32::try_from(*partitions).map_err(|_| "too many partitions".to_owned())?;
                prosody::mock::create_topic(topic, count).map_err(|error| error.to_string())?;
                counts.push(*partitions);
            }
            return Ok(counts);
        }
        // A broker that refused once is not asked again: each refusal costs a
        // timeout. The mock behind `loopback` has no CreateTopics at all.
        if !ADMIN_REFUSED.load(Ordering::Relaxed) && !self.is_mock_broker() {
            if let Err(error) = self.admin_create(topics).await {
                ADMIN_REFUSED.store(true, Ordering::Relaxed);
                eprintln!(
                    "warning: the broker did not create topics ({error}); relying on its \
                     auto-creation, with its default partition count, from now on"
                );
            }
        }
        for (topic, _) in topics {
            let config = self.client_config()?;
            let topic = topic.clone();
            let count = tokio::task::spawn_blocking(move || wait_for_topic(&config, &topic))
                .await
                .map_err(|error| error.to_string())??;
            counts.push(count);
        }
        Ok(counts)
    }

    async fn admin_create(&self, topics: &[(String, usize)]) -> BenchResult<()> {
        let admin: AdminClient<DefaultClientContext> = self
            .client_config()?
            .create()
            .map_err(|error| format!("admin client: {error}"))?;
        let new_topics = topics
            .iter()
            .map(|(topic, partitions)| {
                let partitions =
                    i32::try_from(*partitions).map_err(|_| "too many partitions".to_owned())?;
                // -1: the broker's default replication factor.
                Ok(NewTopic::new(
                    topic,
                    partitions,
                    TopicReplication::Fixed(-1),
                ))
            })
            .collect::<BenchResult<Vec<_>>>()?;
        let options = AdminOptions::new()
            .request_timeout(Some(ADMIN_TIMEOUT))
            .operation_timeout(Some(ADMIN_TIMEOUT));
        let results = admin
            .create_topics(&new_topics, &options)
            .await
            .map_err(|error| error.to_string())?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(format!("{topic}: {code}")),
            }
        }
        Ok(())
    }
}

/// Asks for `topic`'s metadata (which auto-creates it where the broker allows)
/// until every partition has a leader; returns the partition count.
fn wait_for_topic(config: &ClientConfig, topic: &str) -> BenchResult<usize> {
    let producer: BaseProducer = config
        .create()
        .map_err(|error| format!("metadata client: {error}"))?;
    let started = Instant::now();
    let mut last_problem = String::from("no metadata yet");
    while started.elapsed() < TOPIC_DEADLINE {
        match producer
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(5))
        {
            Ok(metadata) => {
                let found = metadata.topics().iter().find(|entry| entry.name() == topic);
                match found {
                    Some(entry) if entry.error().is_none() && !entry.partitions().is_empty() => {
                        let led = entry.partitions().iter().all(|partition| {
                            partition.error().is_none() && partition.leader() >= 0
                        });
                        if led {
                            return Ok(entry.partitions().len());
                        }
                        last_problem = "partitions without a leader".to_owned();
                    }
                    Some(entry) => last_problem = format!("topic error {:?}", entry.error()),
                    None => last_problem = "topic missing from metadata".to_owned(),
                }
            }
            Err(error) => last_problem = error.to_string(),
        }
        // Metadata propagates asynchronously on a real cluster; ask again shortly.
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!(
        "topic {topic} not ready within {TOPIC_DEADLINE:?}: {last_problem}"
    ))
}

/// `prosody-bench loopback [COMMAND…]`: runs COMMAND (this program when it is
/// missing or starts with an option) against the mock cluster of this process
/// as if it were a real broker.
pub(crate) fn loopback(args: Vec<String>) -> ExitCode {
    let servers = match prosody::mock::bootstrap_servers() {
        Ok(servers) => servers,
        Err(error) => {
            eprintln!("prosody-bench loopback: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut command = match args.first() {
        Some(program) if !program.starts_with('-') => {
            let mut command = Command::new(program);
            command.args(&args[1..]);
            command
        }
        _ => match std::env::current_exe() {
            Ok(me) => {
                let mut command = Command::new(me);
                command.args(&args);
                command
            }
            Err(error) => {
                eprintln!("prosody-bench loopback: cannot find this program: {error}");
                return ExitCode::FAILURE;
            }
        },
    };
    eprintln!("loopback: {BOOTSTRAP_ENV}={servers} (this process's mock cluster)");
    match command
        .env(BOOTSTRAP_ENV, &servers)
        .env(LOOPBACK_ENV, "1")
        .status()
    {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("prosody-bench loopback: command failed: {status}");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("prosody-bench loopback: cannot run the command: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `prosody-bench create-topics TOPIC:PARTITIONS…`: for `bench/ruby_bench.rb`,
/// which has no admin client; prints `TOPIC PARTITIONS` for each, with the
/// partition count the topic ends up with.
pub(crate) fn create_topics_command(args: &[String]) -> ExitCode {
    let result = (|| {
        if args.is_empty() {
            return Err("usage: prosody-bench create-topics TOPIC:PARTITIONS…".to_owned());
        }
        let topics = args
            .iter()
            .map(|arg| {
                let (topic, partitions) = arg
                    .rsplit_once(':')
                    .ok_or_else(|| format!("`{arg}` is not TOPIC:PARTITIONS"))?;
                let partitions: usize = partitions
                    .parse()
                    .map_err(|_| format!("`{partitions}` is not a partition count"))?;
                Ok((topic.to_owned(), partitions))
            })
            .collect::<BenchResult<Vec<_>>>()?;
        let cluster = Cluster::new(None);
        if cluster.is_mock() {
            return Err(format!(
                "{BOOTSTRAP_ENV} is not set: the mock cluster lives in the caller's process"
            ));
        }
        let counts = crate::runtime()?.block_on(cluster.create_topics(&topics))?;
        Ok(topics
            .into_iter()
            .zip(counts)
            .map(|((topic, _), count)| format!("{topic} {count}"))
            .collect::<Vec<_>>())
    })();
    match result {
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("prosody-bench create-topics: {error}");
            ExitCode::FAILURE
        }
    }
}
