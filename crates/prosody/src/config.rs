//! Client configuration: typed options, `PROSODY_*` environment fallbacks and validation.
//!
//! Every option can be set three ways, strongest first: a builder call, a raw
//! [`OptionValue`] through [`ConfigBuilder::set`] (what the Ruby bridge uses), or
//! the environment variable `PROSODY_<UPPER_NAME>`. Validation errors name the option.
//!
//! Each option is described once, as a row of the table in `options!`: its name,
//! field type, the kind of value it takes (which picks its parser, and which the
//! Ruby `Configuration` checks against [`OPTION_KINDS`]), its default, the getter's
//! type and any extra checks. Rules that relate two options live in
//! `Config::check_combinations`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::duration::{parse_duration, seconds_to_duration};
use crate::error::{Error, Result};

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

/// How a consumer's span relates to the span it continues (the sender's, for
/// a message; the one that scheduled it, for a timer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanRelation {
    /// The span is a child of that span: one trace from send to handling.
    Child,
    /// The span starts a trace of its own, linked to that span.
    FollowsFrom,
}

/// An option that takes one of a few names (kind `choice`).
trait Choice: Sized + Copy + 'static {
    /// Every accepted spelling after [`normalize_choice`], with the value it means;
    /// the first entry for a value is its canonical name.
    const NAMES: &'static [(&'static str, Self)];
}

impl Choice for Mode {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("pipeline", Self::Pipeline),
        ("low_latency", Self::LowLatency),
        ("best_effort", Self::BestEffort),
    ];
}

impl Choice for StateStore {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("auto", Self::Auto),
        ("postgres", Self::Postgres),
        ("postgresql", Self::Postgres),
        ("memory", Self::Memory),
    ];
}

impl Choice for SpanRelation {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("child", Self::Child),
        ("follows_from", Self::FollowsFrom),
        ("link", Self::FollowsFrom),
    ];
}

/// `":low-latency"` → `"low_latency"`: how Ruby symbols and environment text are written.
fn normalize_choice(text: &str) -> String {
    text.trim()
        .trim_start_matches(':')
        .to_ascii_lowercase()
        .replace('-', "_")
}

fn pick<C: Choice + PartialEq>(text: &str) -> std::result::Result<(&'static str, C), String> {
    let wanted = normalize_choice(text);
    let (spelling, value) = C::NAMES
        .iter()
        .find(|(name, _)| *name == wanted)
        .ok_or_else(|| {
            let names: Vec<&str> = canonical_names::<C>().collect();
            format!("expected one of {}, got `{text}`", names.join(", "))
        })?;
    let canonical = C::NAMES
        .iter()
        .find(|(_, other)| other == value)
        .map_or(*spelling, |(name, _)| name);
    Ok((canonical, *value))
}

/// The first spelling of each value: the one Ruby and the docs use.
fn canonical_names<C: Choice + PartialEq>() -> impl Iterator<Item = &'static str> {
    C::NAMES
        .iter()
        .enumerate()
        .filter(|(index, (_, value))| !C::NAMES[..*index].iter().any(|(_, seen)| seen == value))
        .map(|(_, (name, _))| *name)
}

/// The canonical name of a `choice` option's value (`"low-latency"` → `"low_latency"`),
/// so the Ruby configuration checks choices without repeating the rules.
pub fn choice(option: &str, text: &str) -> Result<&'static str> {
    let picked = match option {
        "mode" => pick::<Mode>(text).map(|(name, _)| name),
        "state_store" => pick::<StateStore>(text).map(|(name, _)| name),
        "message_spans" | "timer_spans" => pick::<SpanRelation>(text).map(|(name, _)| name),
        _ => Err("not an option that takes one of a few names".to_owned()),
    };
    picked.map_err(|reason| Error::config(option, reason))
}

/// The canonical names a `choice` option accepts, or `None` for other options.
pub fn choices(option: &str) -> Option<Vec<&'static str>> {
    match option {
        "mode" => Some(canonical_names::<Mode>().collect()),
        "state_store" => Some(canonical_names::<StateStore>().collect()),
        "message_spans" | "timer_spans" => Some(canonical_names::<SpanRelation>().collect()),
        _ => None,
    }
}

/// Other names some options answer to, `(alias, option)`: the names the
/// product specification gives them. Setting an option under both names is an error.
pub const OPTION_ALIASES: &[(&str, &str)] = &[
    ("defer_enabled", "defer"),
    ("scheduler_failure_weight", "scheduler_failure_share"),
];

/// The option `name` sets: itself, or the option it is an alias of; `None` for
/// a name that is neither.
pub fn option_named(name: &str) -> Option<&'static str> {
    OPTION_NAMES
        .iter()
        .find(|option| **option == name)
        .or_else(|| {
            OPTION_ALIASES
                .iter()
                .find(|(alias, _)| *alias == name)
                .map(|(_, option)| option)
        })
        .copied()
}

/// The error for an option set under both its names.
fn set_twice(option: &str, names: [&str; 2]) -> Error {
    Error::config(
        option,
        format!(
            "set twice, as `{}` and as `{}` (two names for one option); set one of them",
            names[0], names[1]
        ),
    )
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

/// Generates, from one row per option: [`OPTION_NAMES`], [`OPTION_KINDS`], the
/// [`Config`] struct, its getters and `Debug`, and the parse of each option.
///
/// A row reads `name: FieldType = kind(default) -> GetterType, check f, shown g;`:
/// `kind` names the `Options` method that parses the raw value (`None` when unset,
/// then `default` applies; a default may use options of earlier rows and may
/// `return Err(..)`); each `check` runs on the parsed value; `shown` replaces the
/// value in `Debug` output (secrets).
macro_rules! options {
    ($(
        $(#[doc = $doc:literal])*
        $name:ident: $ty:ty = $kind:ident($default:expr) -> $view:ty
            $(, check $check:path)* $(, shown $shown:path)?;
    )*) => {
        /// Names of every option [`ConfigBuilder::set`] accepts, in table order.
        pub const OPTION_NAMES: &[&str] = &[$(stringify!($name)),*];

        /// Every option with the kind of value it takes (`name`, `list`, `flag`, `count`,
        /// `whole`, `duration`, `fraction`, `choice`, `port`, `settings`, `version`).
        pub const OPTION_KINDS: &[(&str, &str)] = &[$((stringify!($name), stringify!($kind))),*];

        /// Validated client configuration. Build one with [`Config::builder`].
        #[derive(Clone)]
        pub struct Config {
            $(pub(crate) $name: $ty,)*
        }

        impl Config {
            $(
                $(#[doc = $doc])*
                pub fn $name(&self) -> $view {
                    View::view(&self.$name)
                }
            )*
        }

        impl std::fmt::Debug for Config {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct("Config")
                    $(.field(stringify!($name), &options!(@shown self.$name $(, $shown)?)))*
                    .finish()
            }
        }

        impl Options {
            /// Parses every row in table order, then checks the rules between options.
            fn parse(mut self) -> Result<Config> {
                $(
                    let $name: $ty = match self.$kind(stringify!($name))? {
                        Some(value) => Parsed::into_field(value)
                            .map_err(|reason| Error::config(stringify!($name), reason))?,
                        None => $default,
                    };
                    $(
                        $check(&$name).map_err(|reason| Error::config(stringify!($name), reason))?;
                    )*
                )*
                let config = Config { $($name),* };
                config.check_combinations()?;
                Ok(config)
            }
        }
    };
    (@shown $value:expr) => { &$value };
    (@shown $value:expr, $shown:path) => { &$shown(&$value) };
}

options! {
    /// Kafka brokers (the mock cluster's address in mock mode is filled in by the client).
    bootstrap_servers: Vec<String> = list(Vec::new()) -> &[String];
    /// The consumer group, if this client consumes.
    group_id: Option<String> = name(None) -> Option<&str>;
    /// Topics the consumer subscribes to.
    subscribed_topics: Vec<String> = list(Vec::new()) -> &[String];
    /// Prefixes of the payload `type` field this consumer processes; `None` means all.
    allowed_events: Option<Vec<String>> = list(None) -> Option<&[String]>;
    /// Written as the `source-system` header on every sent message.
    source_system: String = name(match &group_id {
        Some(group) => group.clone(),
        None => {
            return Err(Error::config(
                "source_system",
                "required when group_id is not set (it names this client in the source-system header)",
            ))
        }
    }) -> &str;
    /// Whether the client runs against the in-process mock cluster.
    mock: bool = flag(false) -> bool;
    /// Handlers running at once across all partitions.
    max_concurrency: usize = count(32) -> usize;
    /// Buffered, unfinished messages per partition before it stops being read (until a quarter drains).
    max_uncommitted: usize = count(64) -> usize;
    /// How often progress is committed.
    commit_interval: Duration = duration(Duration::from_secs(1)) -> Duration, check above_zero;
    /// How long one poll waits for a message.
    poll_interval: Duration = duration(Duration::from_millis(100)) -> Duration, check above_zero;
    /// How long `send` waits for the broker's acknowledgement.
    send_timeout: Duration = duration(Duration::from_secs(1)) -> Duration,
        check above_zero, check within_message_timeout;
    /// Budget for `unsubscribe` and for a revoked partition's handlers to stop.
    shutdown_timeout: Duration = duration(Duration::from_secs(30)) -> Duration;
    /// What happens to messages whose handler keeps failing.
    mode: Mode = choice(Mode::Pipeline) -> Mode;
    /// `:pipeline`: a message failing transiently is deferred (stored and retried
    /// later) so its partition moves on; its key's later messages wait behind it.
    defer: bool = flag(true) -> bool;
    /// First delay before a deferred message is retried; doubles per attempt, with jitter.
    defer_base: Duration = duration(Duration::from_secs(1)) -> Duration, check above_zero;
    /// Longest delay before a deferred message is retried.
    defer_max_delay: Duration = duration(Duration::from_secs(86_400)) -> Duration,
        check above_zero;
    /// `:pipeline`: while more than this share of a partition's messages in the
    /// last `defer_failure_window` failed, nothing new is deferred (failing
    /// messages are retried in place).
    defer_failure_threshold: f64 = fraction(0.9) -> f64;
    /// The sliding window `defer_failure_threshold` looks at.
    defer_failure_window: Duration = duration(Duration::from_secs(300)) -> Duration,
        check above_zero;
    /// Retries before giving up (`low_latency`, `best_effort`).
    max_retries: u32 = whole(3) -> u32;
    /// First retry delay; doubles per attempt, with jitter.
    retry_base: Duration = duration(Duration::from_millis(20)) -> Duration, check above_zero;
    /// Longest delay between retries.
    max_retry_delay: Duration = duration(Duration::from_secs(300)) -> Duration, check above_zero;
    /// Dead-letter topic.
    failure_topic: Option<String> = name(None) -> Option<&str>;
    /// Half-life of a key's virtual time (its decaying handler run time), by
    /// which the scheduler picks the next key when every slot is busy.
    scheduler_decay: Duration = duration(Duration::from_secs(120)) -> Duration, check above_zero;
    /// The most of the handler time retries get while fresh messages wait for a slot.
    scheduler_failure_share: f64 = fraction(0.3) -> f64;
    /// How long a call waits for a slot at most before it ranks ahead of every later arrival.
    scheduler_max_wait: Duration = duration(Duration::from_secs(120)) -> Duration, check above_zero;
    /// How much waiting lowers a call's rank before `scheduler_max_wait`: a call
    /// that has waited the share `f` of it ranks as if its key had
    /// `(1 − f) / (1 + weight · f²)` of its virtual time (0: linear).
    scheduler_wait_weight: u32 = whole(200) -> u32;
    /// `:pipeline`: whether a key that takes more than `monopolization_threshold`
    /// of the handler time is refused for a while.
    monopolization_enabled: bool = flag(true) -> bool;
    /// The rolling window over which a key's handler time is measured (`pipeline`).
    monopolization_window: Duration = duration(Duration::from_secs(300)) -> Duration,
        check above_zero;
    /// The share of the window (one handler slot's capacity) a key's handlers may
    /// run before its calls are refused as transient failures (`pipeline`).
    monopolization_threshold: f64 = fraction(0.9) -> f64;
    /// A partition with work and no progress for this long is stalled.
    stall_threshold: Duration = duration(Duration::from_secs(300)) -> Duration, check above_zero;
    /// Handler deadline; a handler past it is cancelled and the attempt counts as transient.
    timeout: Duration = duration(stall_threshold.mul_f64(0.8)) -> Duration, check above_zero;
    /// Port of the `/readyz` and `/livez` probe server, if enabled.
    probe_port: Option<u16> = port(Some(8000)) -> Option<u16>;
    /// How many recently handled message ids each consumer remembers in memory;
    /// 0 turns message-id deduplication off.
    idempotence_cache_size: usize = whole(8192) -> usize;
    /// Part of every deduplication record: changing it forgets earlier records.
    idempotence_version: String = version("1".to_owned()) -> &str;
    /// How long a handled message id is remembered.
    idempotence_ttl: Duration = duration(Duration::from_secs(7 * 86_400)) -> Duration,
        check above_zero;
    /// How a message's span relates to the sender's span (OpenTelemetry).
    message_spans: SpanRelation = choice(SpanRelation::Child) -> SpanRelation;
    /// How a timer's span relates to the span of the handler call that scheduled it.
    timer_spans: SpanRelation = choice(SpanRelation::FollowsFrom) -> SpanRelation;
    /// Whether a consumer sends its lifecycle events (partitions assigned and
    /// revoked, stalls, messages dead-lettered or given up on) to `telemetry_topic`.
    telemetry_enabled: bool = flag(true) -> bool;
    /// The topic lifecycle events go to.
    telemetry_topic: String = name("prosody.telemetry-events".to_owned()) -> &str;
    /// PostgreSQL connection URL for timers and deduplication records.
    database_url: Option<String> = name(None) -> Option<&str>,
        check check_database_url, shown hide_url;
    /// Where timers and deduplication records live.
    state_store: StateStore = choice(StateStore::Auto) -> StateStore;
    /// Extra librdkafka settings passed through unchanged.
    kafka: BTreeMap<String, String> = settings(BTreeMap::new()) -> &BTreeMap<String, String>,
        check check_kafka_settings, shown setting_names;
}

impl Config {
    /// Starts a builder with nothing set; unset options fall back to the environment, then defaults.
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder::default()
    }

    /// The rules that relate two options (each option's own rules are in its row).
    fn check_combinations(&self) -> Result<()> {
        if self.bootstrap_servers.is_empty() && !self.mock {
            return Err(Error::config(
                "bootstrap_servers",
                "required unless mock is true (or set PROSODY_BOOTSTRAP_SERVERS)",
            ));
        }
        if self.mode == Mode::LowLatency && self.failure_topic.is_none() {
            return Err(Error::config(
                "failure_topic",
                "required in low_latency mode (failed messages go there)",
            ));
        }
        if self.max_retry_delay < self.retry_base {
            return Err(Error::config(
                "max_retry_delay",
                "must not be shorter than retry_base",
            ));
        }
        if self.state_store == StateStore::Postgres && self.database_url.is_none() {
            return Err(Error::config(
                "database_url",
                "required when state_store is postgres",
            ));
        }
        Ok(())
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

/// How a getter shows its field: copies of small values, borrows of the rest.
trait View<'a, Out> {
    fn view(&'a self) -> Out;
}

impl<T: Copy> View<'_, T> for T {
    fn view(&self) -> T {
        *self
    }
}

impl<'a> View<'a, &'a str> for String {
    fn view(&'a self) -> &'a str {
        self
    }
}

impl<'a> View<'a, Option<&'a str>> for Option<String> {
    fn view(&'a self) -> Option<&'a str> {
        self.as_deref()
    }
}

impl<'a> View<'a, &'a [String]> for Vec<String> {
    fn view(&'a self) -> &'a [String] {
        self
    }
}

impl<'a> View<'a, Option<&'a [String]>> for Option<Vec<String>> {
    fn view(&'a self) -> Option<&'a [String]> {
        self.as_deref()
    }
}

impl<'a> View<'a, &'a BTreeMap<String, String>> for BTreeMap<String, String> {
    fn view(&'a self) -> &'a BTreeMap<String, String> {
        self
    }
}

/// Turns what a kind's parser returns into the field's type: the same type, the
/// value of an optional field, a narrower number, or a `choice` name's meaning.
trait Parsed<Field> {
    fn into_field(self) -> std::result::Result<Field, String>;
}

impl<T> Parsed<T> for T {
    fn into_field(self) -> std::result::Result<T, String> {
        Ok(self)
    }
}

impl<T> Parsed<Option<T>> for T {
    fn into_field(self) -> std::result::Result<Option<T>, String> {
        Ok(Some(self))
    }
}

impl Parsed<u32> for u64 {
    fn into_field(self) -> std::result::Result<u32, String> {
        u32::try_from(self).map_err(|_| format!("must be at most {}, got {self}", u32::MAX))
    }
}

impl Parsed<usize> for u64 {
    fn into_field(self) -> std::result::Result<usize, String> {
        usize::try_from(self).map_err(|_| format!("too large, got {self}"))
    }
}

impl Parsed<Mode> for String {
    fn into_field(self) -> std::result::Result<Mode, String> {
        pick::<Mode>(&self).map(|(_, mode)| mode)
    }
}

impl Parsed<StateStore> for String {
    fn into_field(self) -> std::result::Result<StateStore, String> {
        pick::<StateStore>(&self).map(|(_, store)| store)
    }
}

impl Parsed<SpanRelation> for String {
    fn into_field(self) -> std::result::Result<SpanRelation, String> {
        pick::<SpanRelation>(&self).map(|(_, relation)| relation)
    }
}

fn above_zero(duration: &Duration) -> std::result::Result<(), String> {
    if duration.is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    Ok(())
}

/// `send_timeout` becomes librdkafka's `message.timeout.ms`, a 32-bit number of milliseconds.
fn within_message_timeout(timeout: &Duration) -> std::result::Result<(), String> {
    if timeout.as_millis() > MAX_SEND_TIMEOUT_MS {
        return Err(format!(
            "must be at most {MAX_SEND_TIMEOUT_MS} ms (about 24.8 days; librdkafka's message.timeout.ms limit), got {timeout:?}"
        ));
    }
    Ok(())
}

/// The URL may carry a password.
fn hide_url(url: &Option<String>) -> Option<&'static str> {
    url.as_ref().map(|_| "<set>")
}

/// The kafka passthrough may hold credentials; show only its keys.
fn setting_names(kafka: &BTreeMap<String, String>) -> Vec<&String> {
    kafka.keys().collect()
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
    /// The name each option was last [`set`](Self::set) under: its own or an
    /// alias ([`OPTION_ALIASES`]).
    set_as: BTreeMap<&'static str, String>,
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
    /// An alias ([`OPTION_ALIASES`]) sets its option; setting one option under
    /// both its names is a [`Error::Configuration`].
    pub fn set(mut self, name: &str, value: OptionValue) -> Result<Self> {
        let Some(option) = option_named(name) else {
            return Err(Error::config(name, "unknown option"));
        };
        // Set by a builder method, an option is set under its own name.
        let earlier = self.set_as.get(option).map_or(option, String::as_str);
        if self.values.contains_key(option) && earlier != name {
            return Err(set_twice(option, [earlier, name]));
        }
        self.set_as.insert(option, name.to_owned());
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
    ///
    /// Other variables are not read, so one that is not UTF-8 (any process may
    /// have one) does no harm; a `PROSODY_*` variable that would set an option
    /// but is not UTF-8 is a [`Error::Configuration`] for that option.
    pub fn build(self) -> Result<Config> {
        let mut env = Vec::new();
        for (name, value) in std::env::vars_os() {
            // Every name that sets something is ASCII.
            let Some(name) = name.to_str() else { continue };
            let Some(setting) = env_setting(name) else {
                continue;
            };
            match value.into_string() {
                Ok(value) => env.push((name.to_owned(), value)),
                // Not the value: it may be a secret (a SASL password).
                Err(_) => {
                    return Err(Error::config(
                        setting.option(),
                        format!("the environment variable {name} is not valid UTF-8"),
                    ))
                }
            }
        }
        self.build_with_env(env)
    }

    /// Like [`build`](Self::build) with an explicit environment, for tests and embedding.
    pub fn build_with_env(self, env: impl IntoIterator<Item = (String, String)>) -> Result<Config> {
        let mut kafka_from_env = BTreeMap::new();
        let mut options_from_env = BTreeMap::new();
        // The variable each option came from: two for one option (its name
        // and an alias) are refused, as they would be in code.
        let mut variables: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in env {
            match env_setting(&name) {
                Some(EnvSetting::Kafka(setting)) => {
                    kafka_from_env.insert(setting, value);
                }
                Some(EnvSetting::Option(option)) => {
                    if let Some(earlier) = variables.insert(option.clone(), name.clone()) {
                        let mut names = [earlier, name];
                        names.sort();
                        return Err(set_twice(&option, [&names[0], &names[1]]));
                    }
                    options_from_env.insert(option, OptionValue::Str(value));
                }
                None => {}
            }
        }
        let from_env = options_from_env
            .keys()
            .filter(|name| !self.values.contains_key(name.as_str()))
            .cloned()
            .collect();
        let mut values = options_from_env;
        values.extend(self.values);
        check_no_nul(&values, &kafka_from_env)?;
        Options {
            values,
            from_env,
            kafka_from_env,
        }
        .parse()
    }
}

/// librdkafka and PostgreSQL take C strings, which cannot hold a NUL byte:
/// such text would fail later as "FFI nul error", naming no option. Kafka
/// settings are named, never their values (they may be credentials).
fn check_no_nul(
    values: &BTreeMap<String, OptionValue>,
    kafka_from_env: &BTreeMap<String, String>,
) -> Result<()> {
    let kafka = match values.get("kafka") {
        Some(OptionValue::Map(map)) => Some(map),
        _ => None,
    };
    let bad_setting = kafka
        .into_iter()
        .flatten()
        .chain(kafka_from_env)
        .find(|(key, value)| key.contains('\0') || value.contains('\0'));
    if let Some((key, _)) = bad_setting {
        return Err(Error::config(
            "kafka",
            format!(
                "librdkafka setting `{}` must not contain a NUL byte (in its name or value)",
                key.escape_debug()
            ),
        ));
    }
    for (name, value) in values {
        let nul = match value {
            OptionValue::Str(text) => text.contains('\0'),
            OptionValue::List(items) => items.iter().any(|item| item.contains('\0')),
            OptionValue::Map(_)
            | OptionValue::Int(_)
            | OptionValue::Float(_)
            | OptionValue::Bool(_) => false,
        };
        if nul {
            return Err(Error::config(name, "must not contain a NUL byte"));
        }
    }
    Ok(())
}

/// What a `PROSODY_*` environment variable sets.
enum EnvSetting {
    /// A librdkafka setting (`PROSODY_KAFKA_SECURITY_PROTOCOL` → `security.protocol`).
    Kafka(String),
    /// An option (`PROSODY_MAX_CONCURRENCY` → `max_concurrency`).
    Option(String),
}

impl EnvSetting {
    /// The option an error about this variable names.
    fn option(&self) -> &str {
        match self {
            Self::Kafka(_) => "kafka",
            Self::Option(option) => option,
        }
    }
}

/// What the environment variable `name` sets, if anything: other variables,
/// and `PROSODY_*` names that are no option, are ignored.
fn env_setting(name: &str) -> Option<EnvSetting> {
    if let Some(setting) = name.strip_prefix(KAFKA_ENV_PREFIX) {
        return Some(EnvSetting::Kafka(
            setting.to_ascii_lowercase().replace('_', "."),
        ));
    }
    let option = option_named(&name.strip_prefix(ENV_PREFIX)?.to_ascii_lowercase())?;
    (option != "kafka").then(|| EnvSetting::Option(option.to_owned()))
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
fn check_kafka_settings(kafka: &BTreeMap<String, String>) -> std::result::Result<(), String> {
    for (key, value) in kafka {
        let mut probe = rdkafka::ClientConfig::new();
        probe.set(key, value);
        if let Err(error) = probe.create_native_config() {
            return Err(match error {
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
            });
        }
    }
    Ok(())
}

/// Parses `database_url` the way the store will (no connection is made), so a
/// malformed URL fails at `Client.new` rather than at every store call. The
/// message never repeats the URL, which may carry a password.
fn check_database_url(url: &Option<String>) -> std::result::Result<(), String> {
    let Some(url) = url else { return Ok(()) };
    let looks_like_url = url.contains("://");
    let looks_like_pairs = url.contains('=');
    if !looks_like_url && !looks_like_pairs {
        return Err(
            "expected a postgres:// URL or key=value pairs (e.g. \"host=db dbname=app\")"
                .to_owned(),
        );
    }
    url.parse::<tokio_postgres::Config>()
        .map(drop)
        .map_err(|error| {
            let cause = std::error::Error::source(&error)
                .map(|cause| format!(": {cause}"))
                .unwrap_or_default();
            format!("{error}{cause}")
        })
}

fn clamp_i64(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Options merged from every source, read out one by one by the parser of their kind.
struct Options {
    values: BTreeMap<String, OptionValue>,
    /// Options whose value came from a `PROSODY_*` variable: text that may hold a number.
    from_env: BTreeSet<String>,
    /// `PROSODY_KAFKA_*` settings, under the `kafka` option's own.
    kafka_from_env: BTreeMap<String, String>,
}

/// One parser per kind of option (the kinds in [`OPTION_KINDS`]): `None` when the
/// option was not set, an error naming it when its value does not fit.
impl Options {
    fn take(&mut self, name: &str) -> Option<OptionValue> {
        self.values.remove(name)
    }

    /// Non-empty text, trimmed.
    fn name(&mut self, name: &str) -> Result<Option<String>> {
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

    /// A label: text, or an integer taken as its digits.
    fn version(&mut self, name: &str) -> Result<Option<String>> {
        match self.take(name) {
            Some(OptionValue::Int(number)) => Ok(Some(number.to_string())),
            Some(other) => {
                self.values.insert(name.to_owned(), other);
                self.name(name)
            }
            None => Ok(None),
        }
    }

    /// A list of non-empty strings, or one comma-separated string.
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

    /// A whole number of at least 1.
    fn count(&mut self, name: &str) -> Result<Option<usize>> {
        let Some(number) = self.integer(name)? else {
            return Ok(None);
        };
        match usize::try_from(number) {
            Ok(value) if value > 0 => Ok(Some(value)),
            _ => Err(Error::config(
                name,
                format!("must be at least 1, got {number}"),
            )),
        }
    }

    /// A whole number that may be zero.
    fn whole(&mut self, name: &str) -> Result<Option<u64>> {
        let Some(number) = self.integer(name)? else {
            return Ok(None);
        };
        u64::try_from(number)
            .map(Some)
            .map_err(|_| Error::config(name, format!("must not be negative, got {number}")))
    }

    /// A number greater than 0 and at most 1 (a share); text only from the environment.
    fn fraction(&mut self, name: &str) -> Result<Option<f64>> {
        let number = match self.take(name) {
            None => return Ok(None),
            Some(OptionValue::Float(number)) => number,
            #[allow(clippy::cast_precision_loss)] // only 0 and 1 are valid integers
            Some(OptionValue::Int(number)) => number as f64,
            Some(OptionValue::Str(text)) if self.from_env.contains(name) => {
                text.trim().parse::<f64>().map_err(|_| {
                    Error::config(name, format!("expected a number from 0 to 1, got `{text}`"))
                })?
            }
            Some(other) => {
                return Err(Error::config(
                    name,
                    format!("expected a number from 0 to 1, got {}", describe(&other)),
                ))
            }
        };
        if number.is_finite() && number > 0.0 && number <= 1.0 {
            Ok(Some(number))
        } else {
            Err(Error::config(
                name,
                format!("must be greater than 0 and at most 1, got {number}"),
            ))
        }
    }

    /// An integer; text is accepted from the environment (where every value is text)
    /// but not from code, where a String for an Integer option is a mistake
    /// (e.g. `max_concurrency: "10"`).
    fn integer(&mut self, name: &str) -> Result<Option<i64>> {
        match self.take(name) {
            None => Ok(None),
            Some(OptionValue::Int(number)) => Ok(Some(number)),
            Some(OptionValue::Str(text)) if !self.from_env.contains(name) => Err(Error::config(
                name,
                format!("expected a whole number (Integer), got the string `{text}`"),
            )),
            Some(OptionValue::Str(text)) => {
                text.trim().parse::<i64>().map(Some).map_err(|_| {
                    Error::config(name, format!("expected a whole number, got `{text}`"))
                })
            }
            Some(other) => Err(Error::config(
                name,
                format!("expected a whole number, got {}", describe(&other)),
            )),
        }
    }

    /// Seconds (a number) or text with a unit, at most [`MAX_DURATION`].
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

    /// One of a few names, as text; the field's type decides which names (see [`Choice`]).
    fn choice(&mut self, name: &str) -> Result<Option<String>> {
        match self.take(name) {
            None => Ok(None),
            Some(OptionValue::Str(text)) => Ok(Some(text)),
            Some(other) => Err(Error::config(
                name,
                format!("expected a name, got {}", describe(&other)),
            )),
        }
    }

    /// A TCP port; `false`, `"false"`, `"off"` or `"none"` disable it (`Some(None)`).
    fn port(&mut self, name: &str) -> Result<Option<Option<u16>>> {
        let number = match self.take(name) {
            None => return Ok(None),
            Some(OptionValue::Bool(false)) => return Ok(Some(None)),
            Some(OptionValue::Str(text))
                if matches!(
                    text.trim().to_ascii_lowercase().as_str(),
                    "none" | "false" | "off"
                ) =>
            {
                return Ok(Some(None))
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
            .map(|port| Some(Some(port)))
            .map_err(|_| Error::config(name, format!("{number} is not a port number (0-65535)")))
    }

    /// Key/value settings laid over the `PROSODY_KAFKA_*` ones.
    fn settings(&mut self, name: &str) -> Result<Option<BTreeMap<String, String>>> {
        let mut settings = std::mem::take(&mut self.kafka_from_env);
        match self.take(name) {
            None => {}
            Some(OptionValue::Map(map)) => settings.extend(map),
            Some(other) => {
                return Err(Error::config(
                    name,
                    format!("expected a map of settings, got {}", describe(&other)),
                ))
            }
        }
        Ok((!settings.is_empty()).then_some(settings))
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
    fn choices_accept_ruby_and_environment_spellings() {
        assert_eq!(choice("mode", ":Low-Latency").unwrap(), "low_latency");
        assert_eq!(choice("state_store", "postgresql").unwrap(), "postgres");
        assert_eq!(
            choices("state_store").unwrap(),
            vec!["auto", "postgres", "memory"]
        );
        assert_eq!(choices("group_id"), None);
        let wrong = choice("mode", "fast").unwrap_err().to_string();
        assert_eq!(
            wrong,
            "invalid option `mode`: expected one of pipeline, low_latency, best_effort, got `fast`"
        );
        let config = Config::builder()
            .mock(true)
            .group_id("g")
            .build_with_env(vec![(
                "PROSODY_STATE_STORE".to_owned(),
                "Memory".to_owned(),
            )])
            .unwrap();
        assert_eq!(config.state_store(), StateStore::Memory);
    }

    #[test]
    fn every_option_has_a_kind_a_getter_and_a_readme_row() {
        let kinds = [
            "name", "list", "flag", "count", "whole", "duration", "fraction", "choice", "port",
            "settings", "version",
        ];
        assert_eq!(OPTION_KINDS.len(), OPTION_NAMES.len());
        for (name, kind) in OPTION_KINDS {
            assert!(kinds.contains(kind), "{name} has the unknown kind {kind}");
            assert_eq!(choices(name).is_some(), *kind == "choice", "{name}");
        }
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
                .expect("README.md next to the workspace");
        for name in OPTION_NAMES {
            assert!(
                readme.contains(&format!("\n| `{name}` |")),
                "README's options table has no row for `{name}`"
            );
        }
        for (alias, option) in OPTION_ALIASES {
            assert!(OPTION_NAMES.contains(option), "{alias} names no option");
            assert!(!OPTION_NAMES.contains(alias), "{alias} is an option itself");
            assert!(
                readme.contains(&format!("`{alias}` sets `{option}`")),
                "README does not say that `{alias}` sets `{option}`"
            );
        }
    }

    #[test]
    fn shutdown_timeout_may_be_zero_but_other_durations_not() {
        let base = || Config::builder().mock(true).group_id("g");
        let config = base()
            .set("shutdown_timeout", OptionValue::Int(0))
            .and_then(|b| b.build_with_env(no_env()))
            .unwrap();
        assert_eq!(config.shutdown_timeout(), Duration::ZERO);
        for option in ["commit_interval", "poll_interval", "retry_base", "timeout"] {
            let result = base()
                .set(option, OptionValue::Int(0))
                .and_then(|b| b.build_with_env(no_env()));
            assert_eq!(error_option(result), option);
        }
        let version = base()
            .set("idempotence_version", OptionValue::Int(7))
            .and_then(|b| b.build_with_env(no_env()))
            .unwrap();
        assert_eq!(version.idempotence_version(), "7");
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
