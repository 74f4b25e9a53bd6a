//! Client configuration: typed options, `PROSODY_*` environment fallbacks and validation.
//!
//! Every option can be set three ways, strongest first: a builder call, a raw
//! [`OptionValue`] through [`ConfigBuilder::set`] (what the Ruby bridge uses), or
//! the environment variable `PROSODY_<UPPER_NAME>`. Validation errors name the option.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::duration::{parse_duration, seconds_to_duration};
use crate::error::{Error, Result};

/// Names of every option [`ConfigBuilder::set`] accepts, in options-table order.
pub const OPTION_NAMES: &[&str] = &[
    "bootstrap_servers",
    "group_id",
    "subscribed_topics",
    "allowed_events",
    "source_system",
    "mock",
    "max_concurrency",
    "max_uncommitted",
    "commit_interval",
    "poll_interval",
    "send_timeout",
    "shutdown_timeout",
    "mode",
    "max_retries",
    "retry_base",
    "max_retry_delay",
    "failure_topic",
    "timeout",
    "stall_threshold",
    "probe_port",
    "idempotence_cache_size",
    "idempotence_version",
    "idempotence_ttl",
    "database_url",
    "state_store",
    "kafka",
];

/// Where timers and deduplication records live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateStore {
    /// PostgreSQL when `database_url` is set, memory in mock mode, else none.
    Auto,
    /// PostgreSQL at `database_url` (required).
    Postgres,
    /// Process memory: not durable across restarts.
    Memory,
}

/// What happens to a message whose handler keeps failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Retry transient failures forever; send permanent failures to `failure_topic`
    /// when set, else log and skip them.
    Pipeline,
    /// Retry `max_retries` times, then send the message to `failure_topic` (required).
    LowLatency,
    /// Retry `max_retries` times, then log and skip.
    BestEffort,
}

impl Mode {
    fn parse(text: &str) -> Option<Self> {
        match text
            .trim()
            .trim_start_matches(':')
            .to_ascii_lowercase()
            .replace('-', "_")
            .as_str()
        {
            "pipeline" => Some(Self::Pipeline),
            "low_latency" => Some(Self::LowLatency),
            "best_effort" => Some(Self::BestEffort),
            _ => None,
        }
    }
}

const ENV_PREFIX: &str = "PROSODY_";
const KAFKA_ENV_PREFIX: &str = "PROSODY_KAFKA_";

/// An option value before validation, as it arrives from Ruby, the environment or a builder.
#[derive(Debug, Clone, PartialEq)]
pub enum OptionValue {
    /// Text; lists may be comma separated, durations may carry a unit.
    Str(String),
    /// A list of strings.
    List(Vec<String>),
    /// An integer; for durations, whole seconds.
    Int(i64),
    /// A float; for durations, seconds.
    Float(f64),
    /// A flag.
    Bool(bool),
    /// Key/value pairs (the `kafka` passthrough).
    Map(BTreeMap<String, String>),
}

impl From<&str> for OptionValue {
    fn from(value: &str) -> Self {
        Self::Str(value.to_owned())
    }
}

impl From<String> for OptionValue {
    fn from(value: String) -> Self {
        Self::Str(value)
    }
}

impl From<Duration> for OptionValue {
    fn from(value: Duration) -> Self {
        Self::Float(value.as_secs_f64())
    }
}

/// Validated client configuration. Build one with [`Config::builder`].
#[derive(Clone)]
pub struct Config {
    pub(crate) bootstrap_servers: Vec<String>,
    pub(crate) group_id: Option<String>,
    pub(crate) subscribed_topics: Vec<String>,
    pub(crate) allowed_events: Option<Vec<String>>,
    pub(crate) source_system: String,
    pub(crate) mock: bool,
    pub(crate) max_concurrency: usize,
    pub(crate) max_uncommitted: usize,
    pub(crate) commit_interval: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) send_timeout: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) mode: Mode,
    pub(crate) max_retries: u32,
    pub(crate) retry_base: Duration,
    pub(crate) max_retry_delay: Duration,
    pub(crate) failure_topic: Option<String>,
    pub(crate) timeout: Duration,
    pub(crate) stall_threshold: Duration,
    pub(crate) probe_port: Option<u16>,
    pub(crate) idempotence_cache_size: usize,
    pub(crate) idempotence_version: String,
    pub(crate) idempotence_ttl: Duration,
    pub(crate) database_url: Option<String>,
    pub(crate) state_store: StateStore,
    pub(crate) kafka: BTreeMap<String, String>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The kafka passthrough may hold credentials; show only its keys.
        f.debug_struct("Config")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("group_id", &self.group_id)
            .field("subscribed_topics", &self.subscribed_topics)
            .field("allowed_events", &self.allowed_events)
            .field("source_system", &self.source_system)
            .field("mock", &self.mock)
            .field("max_concurrency", &self.max_concurrency)
            .field("max_uncommitted", &self.max_uncommitted)
            .field("commit_interval", &self.commit_interval)
            .field("poll_interval", &self.poll_interval)
            .field("send_timeout", &self.send_timeout)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("mode", &self.mode)
            .field("max_retries", &self.max_retries)
            .field("retry_base", &self.retry_base)
            .field("max_retry_delay", &self.max_retry_delay)
            .field("failure_topic", &self.failure_topic)
            .field("timeout", &self.timeout)
            .field("stall_threshold", &self.stall_threshold)
            .field("probe_port", &self.probe_port)
            .field("idempotence_cache_size", &self.idempotence_cache_size)
            .field("idempotence_version", &self.idempotence_version)
            .field("idempotence_ttl", &self.idempotence_ttl)
            // The URL may carry a password.
            .field("database_url", &self.database_url.as_ref().map(|_| "<set>"))
            .field("state_store", &self.state_store)
            .field("kafka", &self.kafka.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Config {
    /// Starts a builder with nothing set; unset options fall back to the environment, then defaults.
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder::default()
    }

    /// Kafka brokers (the mock cluster's address in mock mode is filled in by the client).
    pub fn bootstrap_servers(&self) -> &[String] {
        &self.bootstrap_servers
    }

    /// The consumer group, if this client consumes.
    pub fn group_id(&self) -> Option<&str> {
        self.group_id.as_deref()
    }

    /// Topics the consumer subscribes to.
    pub fn subscribed_topics(&self) -> &[String] {
        &self.subscribed_topics
    }

    /// Prefixes of the payload `type` field this consumer processes; `None` means all.
    pub fn allowed_events(&self) -> Option<&[String]> {
        self.allowed_events.as_deref()
    }

    /// Written as the `source-system` header on every sent message.
    pub fn source_system(&self) -> &str {
        &self.source_system
    }

    /// Whether the client runs against the in-process mock cluster.
    pub fn mock(&self) -> bool {
        self.mock
    }

    /// Handlers running at once across all partitions.
    pub fn max_concurrency(&self) -> usize {
        self.max_concurrency
    }

    /// Buffered, unfinished messages per partition before it stops being read (until a quarter drains).
    pub fn max_uncommitted(&self) -> usize {
        self.max_uncommitted
    }

    /// How often progress is committed.
    pub fn commit_interval(&self) -> Duration {
        self.commit_interval
    }

    /// How long one poll waits for a message.
    pub fn poll_interval(&self) -> Duration {
        self.poll_interval
    }

    /// How long `send` waits for the broker's acknowledgement.
    pub fn send_timeout(&self) -> Duration {
        self.send_timeout
    }

    /// Budget for `unsubscribe` and for a revoked partition's handlers to stop.
    pub fn shutdown_timeout(&self) -> Duration {
        self.shutdown_timeout
    }

    /// What happens to messages whose handler keeps failing.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Retries before giving up (`low_latency`, `best_effort`).
    pub fn max_retries(&self) -> u32 {
        self.max_retries
    }

    /// First retry delay; doubles per attempt, with jitter.
    pub fn retry_base(&self) -> Duration {
        self.retry_base
    }

    /// Longest delay between retries.
    pub fn max_retry_delay(&self) -> Duration {
        self.max_retry_delay
    }

    /// Dead-letter topic.
    pub fn failure_topic(&self) -> Option<&str> {
        self.failure_topic.as_deref()
    }

    /// Handler deadline; a handler past it is cancelled and the attempt counts as transient.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A partition with work and no progress for this long is stalled.
    pub fn stall_threshold(&self) -> Duration {
        self.stall_threshold
    }

    /// Port of the `/readyz` and `/livez` probe server, if enabled.
    pub fn probe_port(&self) -> Option<u16> {
        self.probe_port
    }

    /// PostgreSQL connection URL for timers and deduplication records.
    pub fn database_url(&self) -> Option<&str> {
        self.database_url.as_deref()
    }

    /// How many recently handled message ids each consumer remembers in memory;
    /// 0 turns message-id deduplication off.
    pub fn idempotence_cache_size(&self) -> usize {
        self.idempotence_cache_size
    }

    /// Part of every deduplication record: changing it forgets earlier records.
    pub fn idempotence_version(&self) -> &str {
        &self.idempotence_version
    }

    /// How long a handled message id is remembered.
    pub fn idempotence_ttl(&self) -> Duration {
        self.idempotence_ttl
    }

    /// Where timers and deduplication records live.
    pub fn state_store(&self) -> StateStore {
        self.state_store
    }

    /// Extra librdkafka settings passed through unchanged.
    pub fn kafka(&self) -> &BTreeMap<String, String> {
        &self.kafka
    }

    /// A librdkafka client configuration carrying the passthrough settings that
    /// apply to `role`: one `kafka` map serves the consumer and the producer, and
    /// librdkafka warns (CONFWARN) about each property meant for the other one.
    ///
    /// librdkafka's own logs flow through tracing at info level, or at debug level
    /// when the passthrough asks for `debug` contexts (e.g. `debug: "fetch"`).
    pub(crate) fn client_config(&self, role: Role) -> rdkafka::ClientConfig {
        let mut client = rdkafka::ClientConfig::new();
        let level = if self.kafka.contains_key("debug") {
            rdkafka::config::RDKafkaLogLevel::Debug
        } else {
            rdkafka::config::RDKafkaLogLevel::Info
        };
        client.set_log_level(level);
        let other_role = match role {
            Role::Consumer => PRODUCER_ONLY,
            Role::Producer => CONSUMER_ONLY,
        };
        for (key, value) in &self.kafka {
            if !other_role.contains(&key.as_str()) {
                client.set(key, value);
            }
        }
        client
    }
}

/// Which librdkafka client a configuration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Consumer,
    Producer,
}

/// librdkafka properties only consumers read (marked `C` in its CONFIGURATION.md).
const CONSUMER_ONLY: &[&str] = &[
    "group.id",
    "group.instance.id",
    "group.protocol",
    "group.protocol.type",
    "group.remote.assignor",
    "partition.assignment.strategy",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "coordinator.query.interval.ms",
    "max.poll.interval.ms",
    "enable.auto.commit",
    "auto.commit.interval.ms",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "fetch.wait.max.ms",
    "fetch.queue.backoff.ms",
    "fetch.message.max.bytes",
    "max.partition.fetch.bytes",
    "fetch.max.bytes",
    "fetch.min.bytes",
    "fetch.error.backoff.ms",
    "isolation.level",
    "enable.partition.eof",
    "check.crcs",
];

/// librdkafka properties only producers read (marked `P` in its CONFIGURATION.md).
const PRODUCER_ONLY: &[&str] = &[
    "transactional.id",
    "transaction.timeout.ms",
    "enable.idempotence",
    "enable.gapless.guarantee",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "queue.buffering.max.ms",
    "linger.ms",
    "message.send.max.retries",
    "retries",
    "queue.buffering.backpressure.threshold",
    "compression.codec",
    "compression.type",
    "compression.level",
    "batch.num.messages",
    "batch.size",
    "delivery.report.only.error",
    "sticky.partitioning.linger.ms",
    "acks",
    "request.required.acks",
    "request.timeout.ms",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "partitioner",
];

/// Collects options; [`ConfigBuilder::build`] applies environment fallbacks and validates.
#[derive(Debug, Default, Clone)]
pub struct ConfigBuilder {
    values: BTreeMap<String, OptionValue>,
}

macro_rules! setter {
    ($(#[$doc:meta])* $name:ident: $ty:ty) => {
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.values.insert(stringify!($name).to_owned(), value.into());
            self
        }
    };
}

impl ConfigBuilder {
    /// Sets an option by name. Unknown names are rejected with a [`Error::Configuration`].
    pub fn set(mut self, option: &str, value: OptionValue) -> Result<Self> {
        if !OPTION_NAMES.contains(&option) {
            return Err(Error::config(option, "unknown option"));
        }
        self.values.insert(option.to_owned(), value);
        Ok(self)
    }

    /// Kafka brokers, e.g. `"localhost:9092"` or a comma-separated list.
    pub fn bootstrap_servers(
        mut self,
        servers: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        let servers = servers.into_iter().map(Into::into).collect();
        self.values
            .insert("bootstrap_servers".to_owned(), OptionValue::List(servers));
        self
    }

    /// Topics to consume.
    pub fn subscribed_topics(
        mut self,
        topics: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        let topics = topics.into_iter().map(Into::into).collect();
        self.values
            .insert("subscribed_topics".to_owned(), OptionValue::List(topics));
        self
    }

    setter!(
        /// The consumer group.
        group_id: &str
    );
    setter!(
        /// The `source-system` header value; defaults to the group id.
        source_system: &str
    );
    setter!(
        /// How long a send waits for the broker's acknowledgement.
        send_timeout: Duration
    );
    setter!(
        /// How often progress is committed.
        commit_interval: Duration
    );
    setter!(
        /// How long one poll waits.
        poll_interval: Duration
    );
    setter!(
        /// Budget for unsubscribe and revocation.
        shutdown_timeout: Duration
    );

    /// Runs against the in-process mock cluster when true.
    pub fn mock(mut self, mock: bool) -> Self {
        self.values
            .insert("mock".to_owned(), OptionValue::Bool(mock));
        self
    }

    /// Handlers running at once across all partitions.
    pub fn max_concurrency(mut self, value: usize) -> Self {
        self.values.insert(
            "max_concurrency".to_owned(),
            OptionValue::Int(clamp_i64(value)),
        );
        self
    }

    /// Buffered, unfinished messages per partition before it stops being read (until a quarter drains).
    pub fn max_uncommitted(mut self, value: usize) -> Self {
        self.values.insert(
            "max_uncommitted".to_owned(),
            OptionValue::Int(clamp_i64(value)),
        );
        self
    }

    /// Adds one librdkafka setting, e.g. `("security.protocol", "SSL")`.
    pub fn kafka(mut self, key: &str, value: &str) -> Self {
        let entry = self
            .values
            .entry("kafka".to_owned())
            .or_insert_with(|| OptionValue::Map(BTreeMap::new()));
        if let OptionValue::Map(map) = entry {
            map.insert(key.to_owned(), value.to_owned());
        }
        self
    }

    /// Validates, falling back to `PROSODY_*` environment variables for unset options.
    pub fn build(self) -> Result<Config> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        self.build_with_env(env)
    }

    /// Like [`build`](Self::build) with an explicit environment, for tests and embedding.
    pub fn build_with_env(self, env: impl IntoIterator<Item = (String, String)>) -> Result<Config> {
        let mut kafka_from_env = BTreeMap::new();
        let mut options_from_env = BTreeMap::new();
        for (name, value) in env {
            if let Some(setting) = name.strip_prefix(KAFKA_ENV_PREFIX) {
                kafka_from_env.insert(setting.to_ascii_lowercase().replace('_', "."), value);
            } else if let Some(option) = name.strip_prefix(ENV_PREFIX) {
                let option = option.to_ascii_lowercase();
                if OPTION_NAMES.contains(&option.as_str()) && option != "kafka" {
                    options_from_env.insert(option, OptionValue::Str(value));
                }
            }
        }
        let from_env = options_from_env
            .keys()
            .filter(|name| !self.values.contains_key(name.as_str()))
            .cloned()
            .collect();
        let mut values = options_from_env;
        values.extend(self.values);
        Options { values, from_env }.validate(kafka_from_env)
    }
}

/// The longest duration any option takes: far beyond any sensible setting, and
/// far below the point where adding it to a clock reading overflows.
const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// librdkafka's upper bound for `message.timeout.ms`, which `send_timeout` sets.
const MAX_SEND_TIMEOUT_MS: u128 = 2_147_483_647;

/// Checks every `kafka` passthrough setting against librdkafka's property table
/// (`rd_kafka_conf_set`) without creating a client, so a misspelt key or an
/// impossible value is reported as a configuration error naming the key.
/// The value is never part of the message: it may be a credential.
fn check_kafka_settings(kafka: &BTreeMap<String, String>) -> Result<()> {
    for (key, value) in kafka {
        let mut probe = rdkafka::ClientConfig::new();
        probe.set(key, value);
        if let Err(error) = probe.create_native_config() {
            let reason = match error {
                rdkafka::error::KafkaError::ClientConfig(
                    rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN,
                    ..,
                ) => format!(
                    "unknown librdkafka setting `{key}` (see librdkafka's CONFIGURATION.md)"
                ),
                rdkafka::error::KafkaError::ClientConfig(_, description, ..) => {
                    let description = if value.is_empty() {
                        description
                    } else {
                        description.replace(value.as_str(), "…")
                    };
                    format!("invalid value for librdkafka setting `{key}`: {description}")
                }
                other => format!("librdkafka setting `{key}`: {other}"),
            };
            return Err(Error::config("kafka", reason));
        }
    }
    Ok(())
}

/// Parses `database_url` the way the store will (no connection is made), so a
/// malformed URL fails at `Client.new` rather than at every store call. The
/// message never repeats the URL, which may carry a password.
fn check_database_url(url: &str) -> Result<()> {
    let looks_like_url = url.contains("://");
    let looks_like_pairs = url.contains('=');
    if !looks_like_url && !looks_like_pairs {
        return Err(Error::config(
            "database_url",
            "expected a postgres:// URL or key=value pairs (e.g. \"host=db dbname=app\")",
        ));
    }
    url.parse::<tokio_postgres::Config>()
        .map(drop)
        .map_err(|error| {
            let cause = std::error::Error::source(&error)
                .map(|cause| format!(": {cause}"))
                .unwrap_or_default();
            Error::config("database_url", format!("{error}{cause}"))
        })
}

fn clamp_i64(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Options merged from every source, read out one by one with their types checked.
struct Options {
    values: BTreeMap<String, OptionValue>,
    /// Options whose value came from a `PROSODY_*` variable: text that may hold a number.
    from_env: BTreeSet<String>,
}

impl Options {
    fn validate(mut self, kafka_from_env: BTreeMap<String, String>) -> Result<Config> {
        let mock = self.flag("mock")?.unwrap_or(false);
        let bootstrap_servers = self.list("bootstrap_servers")?.unwrap_or_default();
        if bootstrap_servers.is_empty() && !mock {
            return Err(Error::config(
                "bootstrap_servers",
                "required unless mock is true (or set PROSODY_BOOTSTRAP_SERVERS)",
            ));
        }
        let group_id = self.string("group_id")?;
        let subscribed_topics = self.list("subscribed_topics")?.unwrap_or_default();
        let allowed_events = self.list("allowed_events")?;
        let source_system = match (self.string("source_system")?, &group_id) {
            (Some(source), _) => source,
            (None, Some(group)) => group.clone(),
            (None, None) => {
                return Err(Error::config(
                    "source_system",
                    "required when group_id is not set (it names this client in the source-system header)",
                ))
            }
        };
        let mut kafka = kafka_from_env;
        if let Some(map) = self.map("kafka")? {
            kafka.extend(map);
        }
        check_kafka_settings(&kafka)?;
        let mode = match self.take("mode") {
            None => Mode::Pipeline,
            Some(OptionValue::Str(text)) => Mode::parse(&text).ok_or_else(|| {
                Error::config(
                    "mode",
                    format!("expected pipeline, low_latency or best_effort, got `{text}`"),
                )
            })?,
            Some(other) => {
                return Err(Error::config(
                    "mode",
                    format!("expected a mode name, got {}", describe(&other)),
                ))
            }
        };
        let failure_topic = self.string("failure_topic")?;
        if mode == Mode::LowLatency && failure_topic.is_none() {
            return Err(Error::config(
                "failure_topic",
                "required in low_latency mode (failed messages go there)",
            ));
        }
        let stall_threshold = self
            .nonzero_duration("stall_threshold")?
            .unwrap_or(Duration::from_secs(300));
        let timeout = self
            .nonzero_duration("timeout")?
            .unwrap_or(stall_threshold.mul_f64(0.8));
        let retry_base = self
            .nonzero_duration("retry_base")?
            .unwrap_or(Duration::from_millis(20));
        let max_retry_delay = self
            .nonzero_duration("max_retry_delay")?
            .unwrap_or(Duration::from_secs(300));
        if max_retry_delay < retry_base {
            return Err(Error::config(
                "max_retry_delay",
                "must not be shorter than retry_base",
            ));
        }
        let max_retries = match self.take("max_retries") {
            None => 3,
            Some(value) => {
                let mut single = self.single("max_retries", value);
                u32::try_from(single.count("max_retries")?)
                    .map_err(|_| Error::config("max_retries", "too large"))?
            }
        };
        let probe_port = self.port("probe_port")?;
        let idempotence_cache_size = match self.take("idempotence_cache_size") {
            None => 8192,
            Some(value) => {
                let mut single = self.single("idempotence_cache_size", value);
                usize::try_from(single.count("idempotence_cache_size")?)
                    .map_err(|_| Error::config("idempotence_cache_size", "too large"))?
            }
        };
        let idempotence_version = self
            .string("idempotence_version")?
            .unwrap_or_else(|| "1".to_owned());
        let idempotence_ttl = self
            .nonzero_duration("idempotence_ttl")?
            .unwrap_or(Duration::from_secs(7 * 86_400));
        let database_url = self.string("database_url")?;
        if let Some(url) = &database_url {
            check_database_url(url)?;
        }
        let state_store = match self.take("state_store") {
            None => StateStore::Auto,
            Some(OptionValue::Str(text)) => match text
                .trim()
                .trim_start_matches(':')
                .to_ascii_lowercase()
                .as_str()
            {
                "auto" => StateStore::Auto,
                "postgres" | "postgresql" => StateStore::Postgres,
                "memory" => StateStore::Memory,
                _ => {
                    return Err(Error::config(
                        "state_store",
                        format!("expected auto, postgres or memory, got `{text}`"),
                    ))
                }
            },
            Some(other) => {
                return Err(Error::config(
                    "state_store",
                    format!("expected a store name, got {}", describe(&other)),
                ))
            }
        };
        if state_store == StateStore::Postgres && database_url.is_none() {
            return Err(Error::config(
                "database_url",
                "required when state_store is postgres",
            ));
        }
        let config = Config {
            database_url,
            state_store,
            mode,
            max_retries,
            retry_base,
            max_retry_delay,
            failure_topic,
            timeout,
            stall_threshold,
            probe_port,
            idempotence_cache_size,
            idempotence_version,
            idempotence_ttl,
            bootstrap_servers,
            group_id,
            subscribed_topics,
            allowed_events,
            source_system,
            mock,
            max_concurrency: self.positive("max_concurrency")?.unwrap_or(32),
            max_uncommitted: self.positive("max_uncommitted")?.unwrap_or(64),
            commit_interval: self
                .nonzero_duration("commit_interval")?
                .unwrap_or(Duration::from_secs(1)),
            poll_interval: self
                .nonzero_duration("poll_interval")?
                .unwrap_or(Duration::from_millis(100)),
            send_timeout: match self.nonzero_duration("send_timeout")? {
                // It becomes librdkafka's message.timeout.ms, a 32-bit number of milliseconds.
                Some(timeout) if timeout.as_millis() > MAX_SEND_TIMEOUT_MS => {
                    return Err(Error::config(
                        "send_timeout",
                        format!(
                            "must be at most {MAX_SEND_TIMEOUT_MS} ms (about 24.8 days; librdkafka's message.timeout.ms limit), got {timeout:?}"
                        ),
                    ))
                }
                timeout => timeout.unwrap_or(Duration::from_secs(1)),
            },
            shutdown_timeout: self
                .duration("shutdown_timeout")?
                .unwrap_or(Duration::from_secs(30)),
            kafka,
        };
        Ok(config)
    }

    fn take(&mut self, name: &str) -> Option<OptionValue> {
        self.values.remove(name)
    }

    /// `value` alone under `name`, keeping where it came from.
    fn single(&self, name: &str, value: OptionValue) -> Self {
        Options {
            values: BTreeMap::from([(name.to_owned(), value)]),
            from_env: self
                .from_env
                .iter()
                .filter(|n| *n == name)
                .cloned()
                .collect(),
        }
    }

    /// Parses a whole number given as text: accepted from the environment (where
    /// every value is text) but not from code, where a String for an Integer
    /// option is a mistake (e.g. `max_concurrency: "10"`).
    fn whole_text(&self, name: &str, text: &str) -> Result<i64> {
        if !self.from_env.contains(name) {
            return Err(Error::config(
                name,
                format!("expected a whole number (Integer), got the string `{text}`"),
            ));
        }
        text.trim()
            .parse::<i64>()
            .map_err(|_| Error::config(name, format!("expected a whole number, got `{text}`")))
    }

    fn string(&mut self, name: &str) -> Result<Option<String>> {
        match self.take(name) {
            None => Ok(None),
            Some(OptionValue::Str(text)) if text.trim().is_empty() => {
                Err(Error::config(name, "must not be empty"))
            }
            Some(OptionValue::Str(text)) => Ok(Some(text.trim().to_owned())),
            Some(other) => Err(Error::config(
                name,
                format!("expected a string, got {}", describe(&other)),
            )),
        }
    }

    fn list(&mut self, name: &str) -> Result<Option<Vec<String>>> {
        let items = match self.take(name) {
            None => return Ok(None),
            Some(OptionValue::Str(text)) => text.split(',').map(str::to_owned).collect::<Vec<_>>(),
            Some(OptionValue::List(items)) => items,
            Some(other) => {
                return Err(Error::config(
                    name,
                    format!(
                        "expected a string or a list of strings, got {}",
                        describe(&other)
                    ),
                ))
            }
        };
        let items: Vec<String> = items.iter().map(|item| item.trim().to_owned()).collect();
        if items.iter().any(String::is_empty) {
            return Err(Error::config(name, "contains an empty entry"));
        }
        Ok(Some(items))
    }

    fn flag(&mut self, name: &str) -> Result<Option<bool>> {
        match self.take(name) {
            None => Ok(None),
            Some(OptionValue::Bool(flag)) => Ok(Some(flag)),
            Some(OptionValue::Str(text)) => match text.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => Ok(Some(true)),
                "false" | "0" | "no" => Ok(Some(false)),
                _ => Err(Error::config(
                    name,
                    format!("expected true or false, got `{text}`"),
                )),
            },
            Some(other) => Err(Error::config(
                name,
                format!("expected true or false, got {}", describe(&other)),
            )),
        }
    }

    /// A whole number that may be zero.
    fn count(&mut self, name: &str) -> Result<u64> {
        let number = match self.take(name) {
            Some(OptionValue::Int(number)) => number,
            Some(OptionValue::Str(text)) => self.whole_text(name, &text)?,
            Some(other) => {
                return Err(Error::config(
                    name,
                    format!("expected a whole number, got {}", describe(&other)),
                ))
            }
            None => 0,
        };
        u64::try_from(number)
            .map_err(|_| Error::config(name, format!("must not be negative, got {number}")))
    }

    /// A TCP port; `false`, `"false"` or `"none"` disable it (`None`). Default 8000.
    fn port(&mut self, name: &str) -> Result<Option<u16>> {
        let number = match self.take(name) {
            None => return Ok(Some(8000)),
            Some(OptionValue::Bool(false)) => return Ok(None),
            Some(OptionValue::Str(text))
                if matches!(
                    text.trim().to_ascii_lowercase().as_str(),
                    "none" | "false" | "off"
                ) =>
            {
                return Ok(None)
            }
            Some(OptionValue::Str(text)) => text.trim().parse::<i64>().map_err(|_| {
                Error::config(
                    name,
                    format!("expected a port number or none, got `{text}`"),
                )
            })?,
            Some(OptionValue::Int(number)) => number,
            Some(other) => {
                return Err(Error::config(
                    name,
                    format!("expected a port number or false, got {}", describe(&other)),
                ))
            }
        };
        u16::try_from(number)
            .map(Some)
            .map_err(|_| Error::config(name, format!("{number} is not a port number (0-65535)")))
    }

    fn positive(&mut self, name: &str) -> Result<Option<usize>> {
        let number = match self.take(name) {
            None => return Ok(None),
            Some(OptionValue::Int(number)) => number,
            Some(OptionValue::Str(text)) => self.whole_text(name, &text)?,
            Some(other) => {
                return Err(Error::config(
                    name,
                    format!("expected a whole number, got {}", describe(&other)),
                ))
            }
        };
        match usize::try_from(number) {
            Ok(value) if value > 0 => Ok(Some(value)),
            _ => Err(Error::config(
                name,
                format!("must be at least 1, got {number}"),
            )),
        }
    }

    fn duration(&mut self, name: &str) -> Result<Option<Duration>> {
        let parsed = match self.take(name) {
            None => return Ok(None),
            Some(OptionValue::Str(text)) => parse_duration(&text),
            Some(OptionValue::Float(seconds)) => seconds_to_duration(seconds),
            #[allow(clippy::cast_precision_loss)] // durations in seconds are far below 2^52
            Some(OptionValue::Int(seconds)) => seconds_to_duration(seconds as f64),
            Some(other) => Err(format!(
                "expected seconds or a string like \"250ms\", got {}",
                describe(&other)
            )),
        };
        match parsed {
            Ok(duration) if duration > MAX_DURATION => Err(Error::config(
                name,
                format!("must be at most 365 days, got {duration:?}"),
            )),
            Ok(duration) => Ok(Some(duration)),
            Err(reason) => Err(Error::config(name, reason)),
        }
    }

    fn nonzero_duration(&mut self, name: &str) -> Result<Option<Duration>> {
        match self.duration(name)? {
            Some(duration) if duration.is_zero() => {
                Err(Error::config(name, "must be greater than zero"))
            }
            other => Ok(other),
        }
    }

    fn map(&mut self, name: &str) -> Result<Option<BTreeMap<String, String>>> {
        match self.take(name) {
            None => Ok(None),
            Some(OptionValue::Map(map)) => Ok(Some(map)),
            Some(other) => Err(Error::config(
                name,
                format!("expected a map of settings, got {}", describe(&other)),
            )),
        }
    }
}

fn describe(value: &OptionValue) -> &'static str {
    match value {
        OptionValue::Str(_) => "a string",
        OptionValue::List(_) => "a list",
        OptionValue::Int(_) => "an integer",
        OptionValue::Float(_) => "a float",
        OptionValue::Bool(_) => "a boolean",
        OptionValue::Map(_) => "a map",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn each_client_gets_only_the_passthrough_keys_it_reads() {
        let config = Config::builder()
            .mock(true)
            .group_id("g")
            .kafka("session.timeout.ms", "9000")
            .kafka("linger.ms", "20")
            .kafka("client.rack", "az1")
            .build()
            .expect("valid config");
        let consumer = config.client_config(Role::Consumer);
        let producer = config.client_config(Role::Producer);
        assert_eq!(consumer.get("session.timeout.ms"), Some("9000"));
        assert_eq!(consumer.get("linger.ms"), None);
        assert_eq!(producer.get("linger.ms"), Some("20"));
        assert_eq!(producer.get("session.timeout.ms"), None);
        assert_eq!(consumer.get("client.rack"), Some("az1"));
        assert_eq!(producer.get("client.rack"), Some("az1"));
    }

    fn error_option(result: Result<Config>) -> String {
        match result {
            Err(Error::Configuration { option, .. }) => option,
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_apply() {
        let config = Config::builder()
            .mock(true)
            .group_id("g")
            .build_with_env(no_env())
            .unwrap();
        assert_eq!(config.max_concurrency, 32);
        assert_eq!(config.max_uncommitted, 64);
        assert_eq!(config.commit_interval, Duration::from_secs(1));
        assert_eq!(config.poll_interval, Duration::from_millis(100));
        assert_eq!(config.send_timeout, Duration::from_secs(1));
        assert_eq!(config.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(config.source_system, "g");
        assert_eq!(config.mode, Mode::Pipeline);
        assert_eq!(config.max_retries, 3);
        assert_eq!(config.retry_base, Duration::from_millis(20));
        assert_eq!(config.stall_threshold, Duration::from_secs(300));
        assert_eq!(config.timeout, Duration::from_secs(240));
        assert_eq!(config.probe_port, Some(8000));
        assert_eq!(config.idempotence_cache_size, 8192);
        assert_eq!(config.idempotence_version, "1");
        assert_eq!(config.idempotence_ttl, Duration::from_secs(7 * 86_400));
    }

    #[test]
    fn idempotence_options() {
        let config = Config::builder()
            .mock(true)
            .group_id("g")
            .set("idempotence_cache_size", OptionValue::Int(0))
            .and_then(|b| b.set("idempotence_version", "2".into()))
            .and_then(|b| b.set("idempotence_ttl", "1h".into()))
            .and_then(|b| b.build_with_env(no_env()))
            .unwrap();
        assert_eq!(config.idempotence_cache_size, 0);
        assert_eq!(config.idempotence_version, "2");
        assert_eq!(config.idempotence_ttl, Duration::from_secs(3600));
        let negative = Config::builder()
            .mock(true)
            .group_id("g")
            .set("idempotence_cache_size", OptionValue::Int(-1))
            .and_then(|b| b.build_with_env(no_env()));
        assert!(error_option(negative).contains("idempotence_cache_size"));
        let zero_ttl = Config::builder()
            .mock(true)
            .group_id("g")
            .set("idempotence_ttl", OptionValue::Int(0))
            .and_then(|b| b.build_with_env(no_env()));
        assert!(error_option(zero_ttl).contains("idempotence_ttl"));
    }

    #[test]
    fn modes_and_probes() {
        let base = || Config::builder().mock(true).group_id("g");
        let config = base()
            .set("mode", ":best_effort".into())
            .and_then(|b| b.set("probe_port", OptionValue::Bool(false)))
            .and_then(|b| b.set("stall_threshold", "10s".into()))
            .and_then(|b| b.build_with_env(no_env()))
            .unwrap();
        assert_eq!(config.mode, Mode::BestEffort);
        assert_eq!(config.probe_port, None);
        assert_eq!(config.timeout, Duration::from_secs(8));
        assert_eq!(
            error_option(
                base()
                    .set("mode", "low_latency".into())
                    .and_then(|b| b.build_with_env(no_env()))
            ),
            "failure_topic"
        );
        assert_eq!(
            error_option(
                base()
                    .set("mode", "fast".into())
                    .and_then(|b| b.build_with_env(no_env()))
            ),
            "mode"
        );
        assert_eq!(
            error_option(
                base()
                    .set("probe_port", OptionValue::Int(70_000))
                    .and_then(|b| b.build_with_env(no_env()))
            ),
            "probe_port"
        );
        assert_eq!(
            error_option(
                base()
                    .set("max_retries", OptionValue::Int(-1))
                    .and_then(|b| b.build_with_env(no_env()))
            ),
            "max_retries"
        );
    }

    #[test]
    fn environment_is_a_fallback() {
        let env = vec![
            (
                "PROSODY_BOOTSTRAP_SERVERS".to_owned(),
                "a:9092, b:9092".to_owned(),
            ),
            ("PROSODY_GROUP_ID".to_owned(), "from-env".to_owned()),
            ("PROSODY_COMMIT_INTERVAL".to_owned(), "250ms".to_owned()),
            ("PROSODY_MAX_CONCURRENCY".to_owned(), "7".to_owned()),
            (
                "PROSODY_KAFKA_SECURITY_PROTOCOL".to_owned(),
                "SSL".to_owned(),
            ),
        ];
        let config = Config::builder()
            .group_id("explicit")
            .build_with_env(env)
            .unwrap();
        assert_eq!(config.bootstrap_servers, vec!["a:9092", "b:9092"]);
        assert_eq!(config.group_id.as_deref(), Some("explicit"));
        assert_eq!(config.commit_interval, Duration::from_millis(250));
        assert_eq!(config.max_concurrency, 7);
        assert_eq!(
            config.kafka.get("security.protocol").map(String::as_str),
            Some("SSL")
        );
    }

    #[test]
    fn errors_name_the_option() {
        let base = || Config::builder().mock(true).group_id("g");
        assert_eq!(
            error_option(base().max_concurrency(0).build_with_env(no_env())),
            "max_concurrency"
        );
        assert_eq!(
            error_option(
                base()
                    .set("commit_interval", "soon".into())
                    .and_then(|b| b.build_with_env(no_env()))
            ),
            "commit_interval"
        );
        assert_eq!(
            error_option(
                base()
                    .set("colour", "red".into())
                    .and_then(|b| b.build_with_env(no_env()))
            ),
            "colour"
        );
        assert_eq!(
            error_option(Config::builder().group_id("g").build_with_env(no_env())),
            "bootstrap_servers"
        );
        assert_eq!(
            error_option(Config::builder().mock(true).build_with_env(no_env())),
            "source_system"
        );
        assert_eq!(
            error_option(
                base()
                    .set("mock", OptionValue::Str("maybe".into()))
                    .and_then(|b| b.build_with_env(no_env()))
            ),
            "mock"
        );
        assert_eq!(
            error_option(
                base()
                    .set("send_timeout", OptionValue::Float(0.0))
                    .and_then(|b| b.build_with_env(no_env()))
            ),
            "send_timeout"
        );
    }

    #[test]
    fn debug_hides_kafka_values() {
        let config = Config::builder()
            .mock(true)
            .group_id("g")
            .kafka("sasl.password", "hunter2")
            .build_with_env(no_env())
            .unwrap();
        let shown = format!("{config:?}");
        assert!(shown.contains("sasl.password"));
        assert!(!shown.contains("hunter2"));
    }
}
