//! Messages a consumer skips without running its handler: its own output (loop
//! prevention), event types it did not ask for (`allowed_events`) and message
//! ids it handled already (deduplication, see `crate::dedup`).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::Config;
use crate::message::Header;
use crate::producer::SOURCE_SYSTEM_HEADER;

/// Why a message was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Skip {
    /// Its `source-system` header is this consumer's group: it produced it.
    OwnMessage,
    /// Its payload `type` matches none of `allowed_events`.
    EventType,
    /// Its payload `id` was handled already for this topic and key.
    Duplicate,
}

impl Skip {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::OwnMessage => "produced by this group",
            Self::EventType => "event type not in allowed_events",
            Self::Duplicate => "message id handled already",
        }
    }

    /// The `reason` label in metrics.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::OwnMessage => "own_message",
            Self::EventType => "event_type",
            Self::Duplicate => "duplicate",
        }
    }
}

/// True when the `source-system` header names `group_id`.
pub(crate) fn is_own(config: &Config, headers: &[Header]) -> bool {
    let Some(group) = config.group_id.as_deref() else {
        return false;
    };
    headers.iter().any(|(name, value)| {
        name == SOURCE_SYSTEM_HEADER && value.as_deref() == Some(group.as_bytes())
    })
}

/// True when `allowed_events` is set and the payload's `type` starts with none of
/// its prefixes. A payload without a string `type` is always processed.
pub(crate) fn is_unwanted_type(config: &Config, payload: &serde_json::Value) -> bool {
    let (Some(prefixes), Some(event)) = (
        &config.allowed_events,
        payload.get("type").and_then(|kind| kind.as_str()),
    ) else {
        return false;
    };
    !prefixes
        .iter()
        .any(|prefix| event.starts_with(prefix.as_str()))
}

/// How many messages were skipped, by reason, since the subscription started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SkipCounts {
    /// Skipped because this group produced them (loop prevention).
    pub own_messages: u64,
    /// Skipped because their `type` is not in `allowed_events`.
    pub event_type: u64,
    /// Skipped because their `id` was handled already (deduplication).
    pub duplicates: u64,
}

#[derive(Debug, Default)]
pub(crate) struct SkipCounters {
    own_messages: AtomicU64,
    event_type: AtomicU64,
    duplicates: AtomicU64,
}

impl SkipCounters {
    /// Counts a skip.
    pub(crate) fn count(&self, skip: Skip) {
        let counter = match skip {
            Skip::OwnMessage => &self.own_messages,
            Skip::EventType => &self.event_type,
            Skip::Duplicate => &self.duplicates,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> SkipCounts {
        SkipCounts {
            own_messages: self.own_messages.load(Ordering::Relaxed),
            event_type: self.event_type.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::OptionValue;

    fn config(allowed: Option<&[&str]>) -> Config {
        let builder = Config::builder().mock(true).group_id("billing");
        let builder = match allowed {
            Some(prefixes) => builder
                .set(
                    "allowed_events",
                    OptionValue::List(prefixes.iter().map(|p| (*p).to_owned()).collect()),
                )
                .unwrap(),
            None => builder,
        };
        builder.build_with_env(Vec::new()).unwrap()
    }

    #[test]
    fn prefixes_match_from_the_start_of_type() {
        let config = config(Some(&["user."]));
        assert!(!is_unwanted_type(&config, &json!({"type": "user.created"})));
        assert!(is_unwanted_type(
            &config,
            &json!({"type": "admin.user.created"})
        ));
        assert!(
            !is_unwanted_type(&config, &json!({"id": 1})),
            "no type: processed"
        );
        assert!(
            !is_unwanted_type(&config, &json!([1, 2])),
            "not an object: processed"
        );
    }

    #[test]
    fn no_list_allows_everything() {
        assert!(!is_unwanted_type(
            &config(None),
            &json!({"type": "anything"})
        ));
    }

    #[test]
    fn own_messages_are_recognised_by_header() {
        let config = config(None);
        let own = vec![(SOURCE_SYSTEM_HEADER.to_owned(), Some(b"billing".to_vec()))];
        let other = vec![(SOURCE_SYSTEM_HEADER.to_owned(), Some(b"shipping".to_vec()))];
        assert!(is_own(&config, &own));
        assert!(!is_own(&config, &other));
        assert!(!is_own(&config, &[]));
    }
}
