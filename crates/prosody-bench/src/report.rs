//! The figures of one run: a flat JSON object of named figures, and the table
//! rows printed on stdout, each a figure next to the baseline it is compared with.
//!
//! The JSON keeps the rows too (under `table`), so `bench/merge_results.rb` can
//! print one table for every suite without knowing their scenarios.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::BenchResult;

/// One line of the table: what was measured, its figure, the baseline measured
/// in the same run (named), and figure / baseline.
pub(crate) struct Row {
    scenario: String,
    figure: String,
    baseline: String,
    ratio: String,
}

/// Figures and rows of one run.
#[derive(Default)]
pub(crate) struct Report {
    figures: BTreeMap<String, Value>,
    rows: Vec<Row>,
}

impl Report {
    /// Records a figure under `key` in the JSON.
    pub(crate) fn insert(&mut self, key: impl Into<String>, value: impl Into<Value>) {
        self.figures.insert(key.into(), value.into());
    }

    /// Adds a table row.
    pub(crate) fn row(
        &mut self,
        scenario: impl Into<String>,
        figure: impl Into<String>,
        baseline: impl Into<String>,
        ratio: impl Into<String>,
    ) {
        self.rows.push(Row {
            scenario: scenario.into(),
            figure: figure.into(),
            baseline: baseline.into(),
            ratio: ratio.into(),
        });
    }

    /// Prints the table under `title`.
    pub(crate) fn print(&self, title: &str) {
        let headings = Row {
            scenario: title.to_owned(),
            figure: "figure".to_owned(),
            baseline: "baseline (same run)".to_owned(),
            ratio: "ratio".to_owned(),
        };
        let width = |field: fn(&Row) -> &str| {
            std::iter::once(&headings)
                .chain(&self.rows)
                .map(|row| field(row).chars().count())
                .max()
                .unwrap_or(0)
        };
        let widths = [
            width(|row| &row.scenario),
            width(|row| &row.figure),
            width(|row| &row.baseline),
        ];
        for row in std::iter::once(&headings).chain(&self.rows) {
            println!(
                "{:<w0$}  {:>w1$}  {:<w2$}  {}",
                row.scenario,
                row.figure,
                row.baseline,
                row.ratio,
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2],
            );
        }
    }

    /// Writes the figures and the rows (under `table`) to `path`.
    pub(crate) fn write_json(&self, path: &str) -> BenchResult<()> {
        let mut object: serde_json::Map<String, Value> = self
            .figures
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|row| {
                json!({
                    "scenario": row.scenario,
                    "figure": row.figure,
                    "baseline": row.baseline,
                    "ratio": row.ratio,
                })
            })
            .collect();
        object.insert("table".to_owned(), Value::Array(rows));
        let text = serde_json::to_string_pretty(&Value::Object(object))
            .map_err(|error| error.to_string())?;
        std::fs::write(path, text + "\n").map_err(|error| format!("cannot write {path}: {error}"))
    }
}

/// Messages per second.
pub(crate) fn rate(count: usize, elapsed: Duration) -> f64 {
    as_f64(count) / elapsed.as_secs_f64().max(f64::EPSILON)
}

/// CPU time this process has used so far, every thread together.
pub(crate) fn cpu_now() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec for the duration of the call.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &raw mut now) };
    if status != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(now.tv_sec).unwrap_or(0),
        u32::try_from(now.tv_nsec).unwrap_or(0),
    )
}

/// CPU seconds per 100k messages, from the CPU time `used` over `count` messages.
pub(crate) fn cpu_per_100k(used: Duration, count: usize) -> f64 {
    used.as_secs_f64() * 100_000.0 / as_f64(count).max(1.0)
}

/// `1.23 CPU s/100k`.
pub(crate) fn cpu_shown(value: f64) -> String {
    format!("{value:.2} CPU s/100k")
}

/// The middle value (upper middle for an even count); 0 when empty.
pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Nearest-rank quantile of `values` (sorted here); 0 when empty.
pub(crate) fn percentile(values: &mut [f64], quantile: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let last = values.len().saturating_sub(1);
    // The rank is within 0..=last by construction.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rank = ((as_f64(last) * quantile).round() as usize).min(last);
    values.get(rank).copied().unwrap_or(0.0)
}

#[allow(clippy::cast_precision_loss)] // counts far below 2^52
pub(crate) fn as_f64(value: usize) -> f64 {
    value as f64
}

/// `figure / baseline`, 0 when the baseline is 0.
pub(crate) fn ratio(figure: f64, baseline: f64) -> f64 {
    if baseline > 0.0 {
        figure / baseline
    } else {
        0.0
    }
}

pub(crate) fn round0(value: f64) -> f64 {
    value.round()
}

pub(crate) fn round1(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

pub(crate) fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

pub(crate) fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// `12345 msg/s`.
pub(crate) fn per_second(value: f64) -> String {
    format!("{value:.0} msg/s")
}
