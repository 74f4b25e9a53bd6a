//! What to do after a handler failure: retry with backoff, dead-letter, or skip.

use std::time::Duration;

use rand::Rng as _;

use super::dispatch::{Failure, FailureKind};
use crate::config::{Config, Mode};

/// The next step for a message whose attempt just failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Run the handler again: after [`backoff`] in place, after [`defer_backoff`]
    /// when the message is deferred (each path draws its own delay, when it takes it).
    Retry,
    /// Write the message to `failure_topic`, then move on.
    DeadLetter,
    /// Log and move on.
    Skip,
}

/// Applies the mode's policy to the `attempt`-th failure (1-based) of a message.
pub(crate) fn decide(config: &Config, kind: FailureKind, attempt: u32) -> Decision {
    let exhausted = attempt > config.max_retries;
    let retry = Decision::Retry;
    match (config.mode, kind.is_permanent()) {
        (Mode::Pipeline, false) => retry,
        (Mode::Pipeline, true) if config.failure_topic.is_some() => Decision::DeadLetter,
        (Mode::Pipeline, true) | (Mode::BestEffort, true) => Decision::Skip,
        (Mode::LowLatency, true) => Decision::DeadLetter,
        (Mode::LowLatency, false) if exhausted => Decision::DeadLetter,
        (Mode::BestEffort, false) if exhausted => Decision::Skip,
        (Mode::LowLatency | Mode::BestEffort, false) => retry,
    }
}

/// The delay before retrying in place: [`jittered_backoff`] from `retry_base`
/// up to `max_retry_delay`.
pub(crate) fn backoff(config: &Config, attempt: u32) -> Duration {
    jittered_backoff(config.retry_base, config.max_retry_delay, attempt)
}

/// The delay before a deferred message's next try: [`jittered_backoff`] from
/// `defer_base` up to `defer_max_delay` (longer than in place: the partition
/// moves on meanwhile, and each deferral is a write to the state store).
pub(crate) fn defer_backoff(config: &Config, attempt: u32) -> Duration {
    jittered_backoff(config.defer_base, config.defer_max_delay, attempt)
}

/// Exponential backoff with jitter: `base × 2^(attempt-1)`, capped at `max`,
/// then drawn uniformly from its upper half so that keys failing together do
/// not retry in lockstep.
fn jittered_backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let exponent = attempt.saturating_sub(1).min(32);
    let ceiling = base
        .checked_mul(1_u32 << exponent.min(31))
        .unwrap_or(max)
        .min(max);
    let floor = ceiling / 2;
    let spread = u64::try_from((ceiling - floor).as_micros()).unwrap_or(u64::MAX);
    floor + Duration::from_micros(rand::rng().random_range(0..=spread))
}

/// Headers explaining a dead-lettered message, after its original headers.
pub(crate) fn dead_letter_headers(
    original: &[(String, Option<Vec<u8>>)],
    topic: &str,
    partition: i32,
    offset: i64,
    failure: &Failure,
    attempts: u32,
) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = original
        .iter()
        .filter(|(name, _)| !name.starts_with("prosody-"))
        .filter_map(|(name, value)| {
            let value = std::str::from_utf8(value.as_deref()?).ok()?;
            Some((name.clone(), value.to_owned()))
        })
        .collect();
    headers.extend([
        ("prosody-error-class".to_owned(), failure.class.clone()),
        ("prosody-error-message".to_owned(), failure.message.clone()),
        (
            "prosody-failure-kind".to_owned(),
            failure.kind.as_str().to_owned(),
        ),
        ("prosody-original-topic".to_owned(), topic.to_owned()),
        (
            "prosody-original-partition".to_owned(),
            partition.to_string(),
        ),
        ("prosody-original-offset".to_owned(), offset.to_string()),
        ("prosody-attempts".to_owned(), attempts.to_string()),
    ]);
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OptionValue;

    fn config(mode: &str) -> Config {
        Config::builder()
            .mock(true)
            .group_id("g")
            .set("mode", mode.into())
            .and_then(|b| b.set("failure_topic", "dlq".into()))
            .and_then(|b| b.set("max_retries", OptionValue::Int(2)))
            .and_then(|b| b.build_with_env(Vec::new()))
            .unwrap()
    }

    #[test]
    fn pipeline_retries_transient_failures_forever() {
        let config = config("pipeline");
        assert!(matches!(
            decide(&config, FailureKind::Transient, 1_000),
            Decision::Retry
        ));
        assert!(matches!(
            decide(&config, FailureKind::Timeout, 50),
            Decision::Retry
        ));
        assert_eq!(
            decide(&config, FailureKind::Permanent, 1),
            Decision::DeadLetter
        );
        assert_eq!(
            decide(&config, FailureKind::BadInput, 1),
            Decision::DeadLetter
        );
    }

    #[test]
    fn low_latency_gives_up_after_max_retries() {
        let config = config("low_latency");
        assert!(matches!(
            decide(&config, FailureKind::Transient, 2),
            Decision::Retry
        ));
        assert_eq!(
            decide(&config, FailureKind::Transient, 3),
            Decision::DeadLetter
        );
        assert_eq!(
            decide(&config, FailureKind::Permanent, 1),
            Decision::DeadLetter
        );
    }

    #[test]
    fn best_effort_skips_after_max_retries() {
        let config = config("best_effort");
        assert!(matches!(
            decide(&config, FailureKind::Transient, 1),
            Decision::Retry
        ));
        assert_eq!(decide(&config, FailureKind::Transient, 3), Decision::Skip);
        assert_eq!(decide(&config, FailureKind::Permanent, 1), Decision::Skip);
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let config = config("pipeline");
        for attempt in 1..40 {
            let ceiling = (Duration::from_millis(20) * 2_u32.pow(attempt.min(20) - 1))
                .min(Duration::from_secs(300));
            let delay = backoff(&config, attempt);
            assert!(
                delay <= ceiling && delay >= ceiling / 2,
                "attempt {attempt}: {delay:?}"
            );
        }
        let samples: std::collections::HashSet<_> = (0..20).map(|_| backoff(&config, 5)).collect();
        assert!(samples.len() > 1, "backoff is not jittered");
    }
}
