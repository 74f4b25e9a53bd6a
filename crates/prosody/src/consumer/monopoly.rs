//! Monopolization detection (`:pipeline` mode): a key whose handlers ran for
//! more than `monopolization_threshold` of a rolling `monopolization_window`
//! (the window's capacity for one handler slot) is rejected with a transient
//! failure until its share falls, so one key cannot keep a slot to itself.
//!
//! The rolling window is two fixed buckets, the current window and the one
//! before it; the estimate counts the previous bucket in proportion to how much
//! of it still overlaps the rolling window ending now. Times are seconds since
//! the scheduler started (see `scheduler.rs`), so tests can drive a clock of
//! their own.

use std::time::Duration;

/// The limit, when monopolization detection is on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct MonopolySettings {
    /// The rolling window's length, in seconds.
    pub(crate) window: f64,
    /// Handler seconds within one window above which a key is rejected.
    pub(crate) limit: f64,
}

impl MonopolySettings {
    pub(crate) fn new(window: Duration, threshold: f64) -> Self {
        let window = window.as_secs_f64().max(f64::MIN_POSITIVE);
        Self {
            window,
            limit: window * threshold,
        }
    }

    /// The window `now` falls into.
    pub(crate) fn index(&self, now: f64) -> u64 {
        // Truncation is the point: whole windows since the start. `now` is never negative.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let index = (now / self.window) as u64;
        index
    }
}

/// One key's handler time over the current and the previous window.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Usage {
    /// The window `current` belongs to.
    index: u64,
    current: f64,
    previous: f64,
    /// The window in which the key was last reported at WARN.
    warned: Option<u64>,
    /// Set while the key was over the limit when last looked at.
    pub(crate) over: bool,
}

impl Usage {
    /// Adds `ran` handler seconds ending at `now`; true when the key is now over the limit.
    pub(crate) fn add(&mut self, settings: &MonopolySettings, ran: f64, now: f64) -> bool {
        self.roll(settings.index(now));
        self.current += ran;
        self.estimate(settings, now) > settings.limit
    }

    /// Handler seconds within the rolling window ending at `now`.
    pub(crate) fn estimate(&self, settings: &MonopolySettings, now: f64) -> f64 {
        let index = settings.index(now);
        let (current, previous) = match index.checked_sub(self.index) {
            Some(0) => (self.current, self.previous),
            Some(1) => (0.0, self.current),
            // Older, or a clock that went back: nothing recent.
            _ => (0.0, 0.0),
        };
        // Precision loss past 2^52 windows does not matter.
        #[allow(clippy::cast_precision_loss)]
        let started = index as f64 * settings.window;
        let into = ((now - started) / settings.window).clamp(0.0, 1.0);
        current + previous * (1.0 - into)
    }

    /// Whether the key is over the limit at `now` (and updates [`Usage::over`]).
    pub(crate) fn is_over(&mut self, settings: &MonopolySettings, now: f64) -> bool {
        self.over = self.estimate(settings, now) > settings.limit;
        self.over
    }

    /// True the first time per window: the rejection is then logged at WARN.
    pub(crate) fn first_warning(&mut self, settings: &MonopolySettings, now: f64) -> bool {
        let index = settings.index(now);
        if self.warned == Some(index) {
            return false;
        }
        self.warned = Some(index);
        true
    }

    /// Whether nothing of the key's handler time is left in the rolling window.
    pub(crate) fn is_idle(&self, settings: &MonopolySettings, now: f64) -> bool {
        !self.over && self.estimate(settings, now) <= 0.0
    }

    fn roll(&mut self, index: u64) {
        match index.checked_sub(self.index) {
            Some(0) => {}
            Some(1) => {
                self.previous = self.current;
                self.current = 0.0;
            }
            _ => {
                self.previous = 0.0;
                self.current = 0.0;
            }
        }
        self.index = index;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> MonopolySettings {
        MonopolySettings::new(Duration::from_secs(10), 0.5)
    }

    #[test]
    fn a_key_over_the_threshold_of_its_window_is_over() {
        let settings = settings();
        let mut usage = Usage::default();
        assert!(!usage.add(&settings, 2.0, 1.0));
        assert!(
            !usage.add(&settings, 3.0, 4.0),
            "exactly the limit is allowed"
        );
        assert!(usage.add(&settings, 0.5, 5.0));
        assert!(usage.is_over(&settings, 6.0));
    }

    #[test]
    fn the_previous_window_counts_while_it_overlaps_the_rolling_window() {
        let settings = settings();
        let mut usage = Usage::default();
        usage.add(&settings, 8.0, 9.0);
        // At 12 s the rolling window (2 s .. 12 s) still holds 80% of the first window.
        assert!((usage.estimate(&settings, 12.0) - 6.4).abs() < 1e-9);
        assert!(usage.is_over(&settings, 12.0));
        // At 16 s it holds 40% of it: 3.2 s, under the 5 s limit.
        assert!(!usage.is_over(&settings, 16.0));
        // Two windows later nothing is left.
        assert!(usage.estimate(&settings, 25.0).abs() < 1e-9);
        assert!(usage.is_idle(&settings, 25.0));
    }

    #[test]
    fn time_added_in_a_new_window_rolls_the_buckets() {
        let settings = settings();
        let mut usage = Usage::default();
        usage.add(&settings, 4.0, 5.0);
        usage.add(&settings, 1.0, 15.0);
        // 1 s now + 4 s × 50% of the previous window still overlapping.
        assert!((usage.estimate(&settings, 15.0) - 3.0).abs() < 1e-9);
        usage.add(&settings, 1.0, 35.0);
        assert!((usage.estimate(&settings, 35.0) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_warning_is_due_once_per_window() {
        let settings = settings();
        let mut usage = Usage::default();
        assert!(usage.first_warning(&settings, 1.0));
        assert!(!usage.first_warning(&settings, 9.9));
        assert!(usage.first_warning(&settings, 10.0));
        assert!(!usage.first_warning(&settings, 12.0));
    }
}
