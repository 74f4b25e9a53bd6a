//! The consumer's librdkafka settings, beside the passthrough (`kafka`) that
//! [`Config::client_config`] applies for [`Role::Consumer`].
//!
//! Three kinds: defaults the passthrough may override ([`DEFAULTS`]), the
//! prefetch bound derived from `max_uncommitted` and the partition count, and
//! settings Prosody owns because it manages offsets itself (always set,
//! whatever the passthrough says).

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::ClientConfig;
use tracing::debug;

use crate::config::{Config, Role};

/// Defaults the passthrough may override.
///
/// librdkafka prefetches up to `queued.min.messages` per partition (100k by
/// default, see [`prefetch`]), then re-checks every `fetch.queue.backoff.ms`
/// (1 s by default); the short re-check keeps a drained prefetch from stalling
/// the partition for a second.
///
/// A broker keeps one fetch in flight per connection, and holds it up to
/// `fetch.wait.max.ms` (500 ms by default) when the partitions it asks for
/// have nothing new. A partition whose small prefetch drains meanwhile waits
/// for that fetch to return: with idle and backlogged partitions on one
/// broker, consumption stalled for ~450 ms every ~15k messages (measured on
/// the mock cluster: 170k msg/s with 500 ms, 780k msg/s with 50 ms). The
/// price is one idle fetch per broker every 50 ms.
const DEFAULTS: &[(&str, &str)] = &[
    ("auto.offset.reset", "earliest"),
    ("partition.assignment.strategy", "cooperative-sticky"),
    ("fetch.queue.backoff.ms", "10"),
    ("fetch.wait.max.ms", "50"),
    // Partition lag for the metrics comes from librdkafka's statistics.
    ("statistics.interval.ms", "5000"),
];

/// The session timeout in mock mode, unless the passthrough sets one. The mock
/// cluster holds a group for the session timeout after its last member leaves
/// (44 s by default); a short session keeps restarts quick.
const MOCK_SESSION_TIMEOUT_MS: &str = "6000";

/// Messages librdkafka prefetches per partition, per message of `max_uncommitted`,
/// at least: 4096 with the default 64.
///
/// A partition's queue is topped up as soon as it holds fewer than this, and
/// re-checked every `fetch.queue.backoff.ms` (10 ms) otherwise, so it must
/// cover what a partition handles during a fetch round trip plus that backoff.
/// Bench (f) (20 partitions, 500k-message backlog) grew RSS by 0.95x the
/// backlog's size at 4096, against 2.06x at the former floor of 10 000
/// (librdkafka keeps ~450 bytes per queued message besides the payload).
const PREFETCH_PER_UNCOMMITTED: usize = 64;

/// Messages the whole consumer may prefetch, per message of `max_uncommitted`:
/// 65 536 with the default 64, shared by the subscribed partitions (each
/// keeps at least [`PREFETCH_PER_UNCOMMITTED`], at most
/// [`MAX_PREFETCH_PER_UNCOMMITTED`]).
///
/// With few partitions, 4096 each ran dry while a fetch was in flight: bench
/// (a) (4 partitions, no-op handler, loopback broker) stalled 10-35 ms at a time
/// and reached ~450k msg/s, against ~700k msg/s at 16 384 each (medians of 9
/// runs each; 32 768 was no faster). The budget gives few partitions that
/// room, and leaves many partitions (16 or more) where the floor keeps them.
const PREFETCH_BUDGET_PER_UNCOMMITTED: usize = 1024;

/// The most librdkafka prefetches per partition, per message of `max_uncommitted`:
/// 16 384 with the default 64, however few the partitions.
const MAX_PREFETCH_PER_UNCOMMITTED: usize = 256;

/// How long a subscription waits for the partition counts of its topics
/// before it settles for the floor. A broker answers metadata within
/// milliseconds; an unreachable one must not hold up `subscribe` for long.
const METADATA_TIMEOUT: Duration = Duration::from_millis(500);

/// The least librdkafka prefetches per partition, whatever `max_uncommitted`.
const MIN_PREFETCH: usize = 1024;

/// Settings Prosody owns: it stores and commits offsets itself.
const OWNED: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
];

/// `queued.min.messages`: a smaller prefetch than librdkafka's bounds memory
/// under a large backlog. `partitions` is how many the subscribed topics have
/// (`None` when unknown: the floor); a consumer in a group of several gets
/// only some of them, so this errs on the side of memory.
fn prefetch(config: &Config, partitions: Option<usize>) -> usize {
    let floor = (config.max_uncommitted * PREFETCH_PER_UNCOMMITTED).max(MIN_PREFETCH);
    let Some(partitions) = partitions.filter(|&count| count > 0) else {
        return floor;
    };
    let share = config.max_uncommitted * PREFETCH_BUDGET_PER_UNCOMMITTED / partitions;
    share
        .min(config.max_uncommitted * MAX_PREFETCH_PER_UNCOMMITTED)
        .max(floor)
}

/// How many partitions the subscribed topics have together, asked of the
/// broker; `None` for a topic pattern, a topic the broker does not know, or no
/// answer within [`METADATA_TIMEOUT`]. Skipped when the passthrough sets the
/// prefetch itself.
pub(crate) fn subscribed_partitions(config: &Config, bootstrap_servers: &str) -> Option<usize> {
    if config.kafka.contains_key("queued.min.messages")
        || config
            .subscribed_topics
            .iter()
            .any(|topic| topic.starts_with('^'))
    {
        return None;
    }
    let mut client = config.client_config(Role::Consumer);
    // Only metadata: no group to join.
    client.remove("group.id");
    let metadata_client: BaseConsumer = match client
        .set("bootstrap.servers", bootstrap_servers)
        .create()
    {
        Ok(consumer) => consumer,
        Err(error) => {
            debug!("cannot ask the broker for partition counts ({error}); prefetch at its floor");
            return None;
        }
    };
    let deadline = Instant::now() + METADATA_TIMEOUT;
    let mut total = 0;
    for topic in &config.subscribed_topics {
        let left = deadline.saturating_duration_since(Instant::now());
        let metadata = metadata_client.fetch_metadata(Some(topic), left);
        let count = match &metadata {
            Ok(metadata) => metadata
                .topics()
                .iter()
                .find(|found| found.name() == topic && found.error().is_none())
                .map(|found| found.partitions().len()),
            Err(_) => None,
        };
        match count {
            Some(count) if count > 0 => total += count,
            _ => {
                debug!(
                    topic,
                    "no partition count for this topic yet; prefetch at its floor"
                );
                return None;
            }
        }
    }
    Some(total)
}

/// The librdkafka configuration of a subscription's consumer; `partitions` as
/// [`subscribed_partitions`] found them.
pub(crate) fn consumer_config(
    config: &Config,
    bootstrap_servers: &str,
    partitions: Option<usize>,
) -> ClientConfig {
    let mut client = config.client_config(Role::Consumer);
    let prefetch = prefetch(config, partitions).to_string();
    let mock = config
        .mock
        .then_some(("session.timeout.ms", MOCK_SESSION_TIMEOUT_MS));
    let defaults = DEFAULTS
        .iter()
        .copied()
        .chain(mock)
        .chain([("queued.min.messages", prefetch.as_str())]);
    for (key, value) in defaults {
        if !config.kafka.contains_key(key) {
            client.set(key, value);
        }
    }
    for (key, value) in OWNED {
        client.set(*key, *value);
    }
    client
        .set("bootstrap.servers", bootstrap_servers)
        .set("group.id", config.group_id.as_deref().unwrap_or_default())
        .set("client.id", &config.source_system);
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(kafka: &[(&str, &str)]) -> Config {
        subscribing(&[], kafka)
    }

    #[test]
    fn the_prefetch_grows_with_max_uncommitted_above_its_floor() {
        let client = consumer_config(&with_max_uncommitted(256), "localhost:9092", None);
        assert_eq!(client.get("queued.min.messages"), Some("16384"));
        let client = consumer_config(&with_max_uncommitted(4), "localhost:9092", None);
        assert_eq!(client.get("queued.min.messages"), Some("1024"));
        let passthrough = config(&[("queued.min.messages", "50000")]);
        let client = consumer_config(&passthrough, "localhost:9092", None);
        assert_eq!(client.get("queued.min.messages"), Some("50000"));
    }

    fn with_max_uncommitted(max_uncommitted: usize) -> Config {
        Config::builder()
            .mock(true)
            .group_id("g")
            .max_uncommitted(max_uncommitted)
            .build_with_env(Vec::new())
            .unwrap()
    }

    #[test]
    fn few_partitions_share_the_prefetch_budget_and_many_keep_the_floor() {
        let config = with_max_uncommitted(64);
        let at = |partitions| prefetch(&config, partitions);
        assert_eq!(at(None), 4096);
        assert_eq!(at(Some(1)), 16384, "capped");
        assert_eq!(at(Some(4)), 16384);
        assert_eq!(at(Some(8)), 8192);
        assert_eq!(at(Some(16)), 4096);
        assert_eq!(at(Some(200)), 4096, "never below the floor");
        assert_eq!(prefetch(&with_max_uncommitted(4), Some(1)), 1024);
        let client = consumer_config(&config, "localhost:9092", Some(4));
        assert_eq!(client.get("queued.min.messages"), Some("16384"));
        let passthrough = self::config(&[("queued.min.messages", "50000")]);
        let client = consumer_config(&passthrough, "localhost:9092", Some(4));
        assert_eq!(client.get("queued.min.messages"), Some("50000"));
    }

    fn subscribing(topics: &[&str], kafka: &[(&str, &str)]) -> Config {
        let mut builder = Config::builder()
            .mock(true)
            .group_id("g")
            .subscribed_topics(topics.iter().copied());
        for (key, value) in kafka {
            builder = builder.kafka(key, value);
        }
        builder.build_with_env(Vec::new()).unwrap()
    }

    #[test]
    fn the_partition_count_comes_from_the_broker_and_is_none_when_unsure() {
        let bootstrap = crate::mock::bootstrap_servers().unwrap();
        crate::mock::create_topic("settings-four", 4).unwrap();
        crate::mock::create_topic("settings-two", 2).unwrap();
        let count = |topics: &[&str], kafka: &[(&str, &str)]| {
            subscribed_partitions(&subscribing(topics, kafka), &bootstrap)
        };
        assert_eq!(count(&["settings-four"], &[]), Some(4));
        assert_eq!(count(&["settings-four", "settings-two"], &[]), Some(6));
        assert_eq!(count(&["settings-four", "settings-absent"], &[]), None);
        assert_eq!(count(&["^settings-.*"], &[]), None);
        assert_eq!(
            count(&["settings-four"], &[("queued.min.messages", "500")]),
            None
        );
    }

    #[test]
    fn an_unreachable_broker_leaves_the_floor_after_a_short_wait() {
        let config = subscribing(&["t"], &[]);
        let started = Instant::now();
        // Nothing listens on port 9 (discard) on loopback.
        assert_eq!(subscribed_partitions(&config, "127.0.0.1:9"), None);
        assert!(
            started.elapsed() < METADATA_TIMEOUT + Duration::from_secs(2),
            "waited {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn the_passthrough_overrides_defaults_but_not_owned_settings() {
        let config = config(&[("fetch.wait.max.ms", "500"), ("enable.auto.commit", "true")]);
        let client = consumer_config(&config, "localhost:9092", None);
        assert_eq!(client.get("fetch.wait.max.ms"), Some("500"));
        assert_eq!(client.get("enable.auto.commit"), Some("false"));
        assert_eq!(
            client.get("partition.assignment.strategy"),
            Some("cooperative-sticky")
        );
        assert_eq!(client.get("session.timeout.ms"), Some("6000"));
        assert_eq!(client.get("queued.min.messages"), Some("4096"));
        assert_eq!(client.get("group.id"), Some("g"));
        assert_eq!(client.get("bootstrap.servers"), Some("localhost:9092"));
    }
}
