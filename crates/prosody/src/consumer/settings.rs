//! The consumer's librdkafka settings, beside the passthrough (`kafka`) that
//! [`Config::client_config`] applies for [`Role::Consumer`].
//!
//! Three kinds: defaults the passthrough may override ([`DEFAULTS`]), the
//! prefetch bound derived from `max_uncommitted`, and settings Prosody owns
//! because it manages offsets itself (always set, whatever the passthrough says).

use rdkafka::ClientConfig;

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

/// Messages librdkafka prefetches per partition, per message of `max_uncommitted`.
const PREFETCH_PER_UNCOMMITTED: usize = 16;

/// The least librdkafka prefetches per partition.
const MIN_PREFETCH: usize = 10_000;

/// Settings Prosody owns: it stores and commits offsets itself.
const OWNED: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
];

/// `queued.min.messages`: a smaller prefetch than librdkafka's bounds memory
/// under a large backlog.
fn prefetch(config: &Config) -> usize {
    (config.max_uncommitted * PREFETCH_PER_UNCOMMITTED).max(MIN_PREFETCH)
}

/// The librdkafka configuration of a subscription's consumer.
pub(crate) fn consumer_config(config: &Config, bootstrap_servers: &str) -> ClientConfig {
    let mut client = config.client_config(Role::Consumer);
    let prefetch = prefetch(config).to_string();
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
        let mut builder = Config::builder().mock(true).group_id("g");
        for (key, value) in kafka {
            builder = builder.kafka(key, value);
        }
        builder.build_with_env(Vec::new()).unwrap()
    }

    #[test]
    fn the_passthrough_overrides_defaults_but_not_owned_settings() {
        let config = config(&[("fetch.wait.max.ms", "500"), ("enable.auto.commit", "true")]);
        let client = consumer_config(&config, "localhost:9092");
        assert_eq!(client.get("fetch.wait.max.ms"), Some("500"));
        assert_eq!(client.get("enable.auto.commit"), Some("false"));
        assert_eq!(
            client.get("partition.assignment.strategy"),
            Some("cooperative-sticky")
        );
        assert_eq!(client.get("session.timeout.ms"), Some("6000"));
        assert_eq!(client.get("queued.min.messages"), Some("10000"));
        assert_eq!(client.get("group.id"), Some("g"));
        assert_eq!(client.get("bootstrap.servers"), Some("localhost:9092"));
    }
}
