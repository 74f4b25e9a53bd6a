//! Prometheus metrics of one client, served as OpenMetrics text at `/metrics` on
//! the probe server.
//!
//! Everything is counted where it happens, with labels of bounded cardinality:
//! topic, partition, failure kind, skip reason. Never the key. Gauges that mirror
//! state held elsewhere (buffered messages, assigned partitions) are refreshed
//! from that state when the page is rendered.
//!
//! The page is OpenMetrics for scrapers that ask for it (Prometheus does), and
//! the classic Prometheus text format (0.0.4) otherwise, which is what `curl`
//! users and `promtool check metrics` read.

use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::handler::Context;

use crate::events::{Event, EventKind, Observer};
use crate::telemetry::Telemetry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PartitionLabels {
    pub(crate) topic: String,
    pub(crate) partition: i32,
}

impl PartitionLabels {
    pub(crate) fn new(topic: &str, partition: i32) -> Self {
        Self {
            topic: topic.to_owned(),
            partition,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicLabels {
    topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    topic: String,
    partition: i32,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SkipLabels {
    topic: String,
    partition: i32,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RebalanceLabels {
    change: &'static str,
}

/// Seconds from 1 ms to about 33 minutes, doubling: handler runs and sends.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 22))
}

/// One client's metrics. Cheap to update from any thread.
pub(crate) struct Metrics {
    registry: Registry,
    received: Family<PartitionLabels, Counter>,
    handled: Family<PartitionLabels, Counter>,
    failed: Family<FailureLabels, Counter>,
    retried: Family<PartitionLabels, Counter>,
    deferred: Family<PartitionLabels, Counter>,
    dead_lettered: Family<PartitionLabels, Counter>,
    skipped: Family<SkipLabels, Counter>,
    handler_seconds: Family<TopicLabels, Histogram, fn() -> Histogram>,
    in_flight: Gauge,
    buffered: Family<PartitionLabels, Gauge>,
    lag: Family<PartitionLabels, Gauge>,
    commits: Counter,
    commit_failures: Counter,
    rebalances: Family<RebalanceLabels, Counter>,
    assigned: Gauge,
    scheduler_waiting: Gauge,
    monopolization_rejections: Counter,
    sent: Family<TopicLabels, Counter>,
    send_failures: Family<TopicLabels, Counter>,
    send_seconds: Family<TopicLabels, Histogram, fn() -> Histogram>,
    timers_scheduled: Counter,
    timers_fired: Family<PartitionLabels, Counter>,
    timer_lateness: Histogram,
    store_errors: Counter,
    telemetry_lost: Counter,
    /// Where events go, once one is attached (see [`crate::events`]).
    observer: OnceLock<Arc<dyn Observer>>,
    /// The lifecycle events sent to Kafka (`telemetry_enabled`), once subscribed.
    telemetry: OnceLock<Telemetry>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut metrics = Self {
            registry: Registry::with_prefix("prosody"),
            received: Family::default(),
            handled: Family::default(),
            failed: Family::default(),
            retried: Family::default(),
            deferred: Family::default(),
            dead_lettered: Family::default(),
            skipped: Family::default(),
            handler_seconds: Family::new_with_constructor(seconds_histogram),
            in_flight: Gauge::default(),
            buffered: Family::default(),
            lag: Family::default(),
            commits: Counter::default(),
            commit_failures: Counter::default(),
            rebalances: Family::default(),
            assigned: Gauge::default(),
            scheduler_waiting: Gauge::default(),
            monopolization_rejections: Counter::default(),
            sent: Family::default(),
            send_failures: Family::default(),
            send_seconds: Family::new_with_constructor(seconds_histogram),
            timers_scheduled: Counter::default(),
            timers_fired: Family::default(),
            timer_lateness: seconds_histogram(),
            store_errors: Counter::default(),
            telemetry_lost: Counter::default(),
            observer: OnceLock::new(),
            telemetry: OnceLock::new(),
        };
        metrics.register();
        metrics
    }

    /// Names each metric once; the registry keeps handles sharing the values.
    fn register(&mut self) {
        let registry = &mut self.registry;
        registry.register(
            "messages_received",
            "Messages taken from Kafka into a partition's buffer",
            self.received.clone(),
        );
        registry.register(
            "messages_handled",
            "Messages whose handler succeeded",
            self.handled.clone(),
        );
        registry.register(
            "handler_failures",
            "Failed handler attempts (messages and timers), by failure kind",
            self.failed.clone(),
        );
        registry.register(
            "messages_retried",
            "Attempts scheduled again after a failure",
            self.retried.clone(),
        );
        registry.register(
            "messages_deferred",
            "Messages stored for a deferred retry (after a failure, or behind their key's deferred messages)",
            self.deferred.clone(),
        );
        registry.register(
            "messages_dead_lettered",
            "Messages written to failure_topic",
            self.dead_lettered.clone(),
        );
        registry.register(
            "messages_skipped",
            "Messages counted as done without a successful handler run, by reason",
            self.skipped.clone(),
        );
        registry.register_with_unit(
            "handler_duration",
            "Run time of handler attempts",
            Unit::Seconds,
            self.handler_seconds.clone(),
        );
        registry.register(
            "handlers_in_flight",
            "Handler attempts running now",
            self.in_flight.clone(),
        );
        registry.register(
            "partition_buffered_messages",
            "Unfinished messages buffered for a partition",
            self.buffered.clone(),
        );
        registry.register(
            "partition_lag",
            "Messages between the partition's end and the consumer's position (librdkafka statistics)",
            self.lag.clone(),
        );
        registry.register("commits", "Offset commits confirmed", self.commits.clone());
        registry.register(
            "commit_failures",
            "Offset commits that failed",
            self.commit_failures.clone(),
        );
        registry.register(
            "rebalances",
            "Partition assignment changes, by change (assign, revoke)",
            self.rebalances.clone(),
        );
        registry.register(
            "assigned_partitions",
            "Partitions this consumer owns",
            self.assigned.clone(),
        );
        registry.register(
            "scheduler_waiting_calls",
            "Handler calls waiting for a slot (the fair scheduler's queue)",
            self.scheduler_waiting.clone(),
        );
        registry.register(
            "monopolization_rejections",
            "Handler calls refused because their key monopolized handler time",
            self.monopolization_rejections.clone(),
        );
        registry.register(
            "messages_sent",
            "Messages the broker acknowledged",
            self.sent.clone(),
        );
        registry.register(
            "send_failures",
            "Sends that failed or timed out",
            self.send_failures.clone(),
        );
        registry.register_with_unit(
            "send_duration",
            "Time from send to the broker's acknowledgement",
            Unit::Seconds,
            self.send_seconds.clone(),
        );
        registry.register(
            "timers_scheduled",
            "Timers scheduled by handlers",
            self.timers_scheduled.clone(),
        );
        registry.register(
            "timers_fired",
            "Timers whose handler ran to a conclusion",
            self.timers_fired.clone(),
        );
        registry.register_with_unit(
            "timer_lateness",
            "How long after its time a timer's handler started",
            Unit::Seconds,
            self.timer_lateness.clone(),
        );
        registry.register(
            "store_errors",
            "Failed state store operations (timers, deduplication records)",
            self.store_errors.clone(),
        );
        registry.register(
            "telemetry_events_lost",
            "Telemetry events not sent to telemetry_topic (the send failed, or too many were queued)",
            self.telemetry_lost.clone(),
        );
    }

    /// Attaches the observer that receives this client's events; false if one is attached already.
    pub(crate) fn set_observer(&self, observer: Arc<dyn Observer>) -> bool {
        self.observer.set(observer).is_ok()
    }

    /// Starts sending lifecycle events to Kafka; later calls keep the first.
    pub(crate) fn start_telemetry(&self, start: impl FnOnce() -> Telemetry) {
        let _ = self.telemetry.get_or_init(start);
    }

    /// Passes a routine event (one telemetry never sends, such as a filter's
    /// skip) to the observer, if it wants `kind`; nothing is built otherwise.
    pub(crate) fn emit_routine(&self, kind: EventKind, build: impl FnOnce() -> Event) {
        if let Some(observer) = self.observer.get().filter(|observer| observer.wants(kind)) {
            observer.observe(build());
        }
    }

    /// Passes the event `build` makes to the observer and to telemetry, if
    /// either wants `kind`; nothing is built otherwise.
    pub(crate) fn emit(&self, kind: EventKind, build: impl FnOnce() -> Event) {
        let observer = self.observer.get().filter(|observer| observer.wants(kind));
        let telemetry = self
            .telemetry
            .get()
            .filter(|telemetry| telemetry.wants(kind));
        if observer.is_none() && telemetry.is_none() {
            return;
        }
        let event = build();
        if let Some(telemetry) = telemetry {
            telemetry.record(&event);
        }
        if let Some(observer) = observer {
            observer.observe(event);
        }
    }

    /// The page as OpenMetrics text, or in the classic text format.
    pub(crate) fn render(&self, format: Format) -> String {
        let mut page = String::new();
        if encode(&mut page, &self.registry).is_err() {
            // Writing to a String cannot fail; keep the page well formed regardless.
            page.clear();
            let _ = writeln!(page, "# EOF");
        }
        match format {
            Format::OpenMetrics => page,
            Format::Classic => classic(&page),
        }
    }

    /// Handles on one partition's per-message series, looked up once, so counting
    /// a message is an atomic add rather than a labelled lookup.
    pub(crate) fn partition(&self, topic: &str, partition: i32) -> PartitionMetrics {
        let labels = PartitionLabels::new(topic, partition);
        let topic_labels = TopicLabels {
            topic: topic.to_owned(),
        };
        PartitionMetrics {
            received: self.received.get_or_create(&labels).clone(),
            handled: self.handled.get_or_create(&labels).clone(),
            handler_seconds: self.handler_seconds.get_or_create(&topic_labels).clone(),
            in_flight: self.in_flight.clone(),
            labels,
        }
    }

    pub(crate) fn failed(&self, labels: &PartitionLabels, kind: &'static str) {
        let labels = FailureLabels {
            topic: labels.topic.clone(),
            partition: labels.partition,
            kind,
        };
        self.failed.get_or_create(&labels).inc();
    }

    pub(crate) fn retried(&self, labels: &PartitionLabels) {
        self.retried.get_or_create(labels).inc();
    }

    pub(crate) fn deferred(&self, labels: &PartitionLabels) {
        self.deferred.get_or_create(labels).inc();
    }

    pub(crate) fn dead_lettered(&self, labels: &PartitionLabels) {
        self.dead_lettered.get_or_create(labels).inc();
    }

    pub(crate) fn skipped(&self, labels: &PartitionLabels, reason: &'static str) {
        let labels = SkipLabels {
            topic: labels.topic.clone(),
            partition: labels.partition,
            reason,
        };
        self.skipped.get_or_create(&labels).inc();
    }

    pub(crate) fn set_buffered(&self, labels: &PartitionLabels, buffered: usize) {
        self.buffered
            .get_or_create(labels)
            .set(i64::try_from(buffered).unwrap_or(i64::MAX));
    }

    pub(crate) fn set_lag(&self, labels: &PartitionLabels, lag: i64) {
        self.lag.get_or_create(labels).set(lag);
    }

    /// Forgets a partition's gauges once it is no longer owned, so they do not linger.
    pub(crate) fn partition_released(&self, labels: &PartitionLabels) {
        self.buffered.remove(labels);
        self.lag.remove(labels);
    }

    pub(crate) fn set_scheduler_waiting(&self, waiting: usize) {
        self.scheduler_waiting
            .set(i64::try_from(waiting).unwrap_or(i64::MAX));
    }

    pub(crate) fn monopolization_rejected(&self) {
        self.monopolization_rejections.inc();
    }

    pub(crate) fn committed(&self, succeeded: bool) {
        if succeeded {
            self.commits.inc();
        } else {
            self.commit_failures.inc();
        }
    }

    pub(crate) fn rebalanced(&self, change: &'static str) {
        self.rebalances
            .get_or_create(&RebalanceLabels { change })
            .inc();
    }

    pub(crate) fn set_assigned(&self, partitions: usize) {
        self.assigned
            .set(i64::try_from(partitions).unwrap_or(i64::MAX));
    }

    pub(crate) fn sent(&self, topic: &str, took: Duration, succeeded: bool) {
        let labels = TopicLabels {
            topic: topic.to_owned(),
        };
        if succeeded {
            self.sent.get_or_create(&labels).inc();
        } else {
            self.send_failures.get_or_create(&labels).inc();
        }
        self.send_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    pub(crate) fn timer_scheduled(&self) {
        self.timers_scheduled.inc();
    }

    pub(crate) fn timer_fired(&self, labels: &PartitionLabels, late: Duration) {
        self.timers_fired.get_or_create(labels).inc();
        self.timer_lateness.observe(late.as_secs_f64());
    }

    pub(crate) fn store_error(&self) {
        self.store_errors.inc();
    }

    /// The counter of telemetry events not sent, for the telemetry task.
    pub(crate) fn telemetry_lost(&self) -> Counter {
        self.telemetry_lost.clone()
    }
}

/// How `/metrics` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/openmetrics-text; version=1.0.0`.
    OpenMetrics,
    /// `text/plain; version=0.0.4`, the Prometheus text format.
    Classic,
}

impl Format {
    /// OpenMetrics when the request's `Accept` header names it, else classic.
    pub(crate) fn for_accept(accept: &str) -> Self {
        if accept.contains("application/openmetrics-text") {
            Self::OpenMetrics
        } else {
            Self::Classic
        }
    }

    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::Classic => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// Rewrites OpenMetrics as the classic text format: a counter family takes its
/// samples' `_total` name in `# HELP`/`# TYPE`, and `# UNIT` and `# EOF` go.
fn classic(openmetrics: &str) -> String {
    let mut page = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        if line.starts_with("# HELP ") {
            help = Some(line);
            continue;
        }
        if let Some(family) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            if let Some(help) = help.take() {
                let text = help
                    .strip_prefix("# HELP ")
                    .and_then(|rest| rest.strip_prefix(family))
                    .unwrap_or_default();
                let _ = writeln!(page, "# HELP {family}_total{text}");
            }
            let _ = writeln!(page, "# TYPE {family}_total counter");
            continue;
        }
        if let Some(help) = help.take() {
            let _ = writeln!(page, "{help}");
        }
        let _ = writeln!(page, "{line}");
    }
    page
}

/// One partition's per-message series; see [`Metrics::partition`].
pub(crate) struct PartitionMetrics {
    pub(crate) labels: PartitionLabels,
    received: Counter,
    handled: Counter,
    handler_seconds: Histogram,
    in_flight: Gauge,
}

impl PartitionMetrics {
    pub(crate) fn received(&self) {
        self.received.inc();
    }

    pub(crate) fn handled(&self) {
        self.handled.inc();
    }

    /// Counts a handler attempt as running until the guard drops, then records its run time.
    pub(crate) fn handler_running(&self) -> HandlerRun<'_> {
        self.in_flight.inc();
        HandlerRun {
            partition: self,
            started: Instant::now(),
            queued: None,
            done: false,
        }
    }

    /// Like [`handler_running`](Self::handler_running) for a call its handler
    /// queues before it runs it ([`crate::EventHandler::queue_ahead`]): it
    /// counts as running, and its run time, from [`Context::start`] on; a call
    /// that ends without starting counts for neither.
    pub(crate) fn handler_queued(&self, context: &Context) -> HandlerRun<'_> {
        context.count_running_in(&self.in_flight);
        HandlerRun {
            partition: self,
            started: Instant::now(),
            queued: Some(context.clone()),
            done: false,
        }
    }
}

/// A running handler attempt; see [`PartitionMetrics::handler_running`].
pub(crate) struct HandlerRun<'a> {
    partition: &'a PartitionMetrics,
    started: Instant,
    /// The call's context, when its handler queued it.
    queued: Option<Context>,
    /// Recorded already (by `finish`).
    done: bool,
}

impl HandlerRun<'_> {
    /// Ends the run now (rather than when dropped) and says how long it took
    /// (for a queued call, since it started; zero if it never did).
    pub(crate) fn finish(mut self) -> Duration {
        self.done = true;
        self.record()
    }

    fn record(&self) -> Duration {
        let started = match &self.queued {
            None => self.started,
            Some(context) => match context.end_running_count() {
                Some(started) => started.max(self.started),
                // Never started: it was not counted, and did not run.
                None => return Duration::ZERO,
            },
        };
        let took = started.elapsed();
        self.partition.in_flight.dec();
        self.partition.handler_seconds.observe(took.as_secs_f64());
        took
    }
}

impl Drop for HandlerRun<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.record();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_openmetrics_with_labels_and_eof() {
        let metrics = Metrics::new();
        let orders = metrics.partition("orders", 3);
        let partition = &orders.labels;
        orders.received();
        orders.received();
        orders.handled();
        metrics.failed(partition, "transient");
        metrics.skipped(partition, "duplicate");
        drop(orders.handler_running());
        metrics.sent("orders", Duration::from_millis(3), true);
        let page = metrics.render(Format::OpenMetrics);
        assert!(
            page.contains("prosody_messages_received_total{topic=\"orders\",partition=\"3\"} 2"),
            "{page}"
        );
        assert!(page.contains("prosody_handler_failures_total{topic=\"orders\",partition=\"3\",kind=\"transient\"} 1"), "{page}");
        assert!(page.contains("prosody_messages_skipped_total{topic=\"orders\",partition=\"3\",reason=\"duplicate\"} 1"), "{page}");
        assert!(
            page.contains("prosody_handler_duration_seconds_count{topic=\"orders\"} 1"),
            "{page}"
        );
        assert!(page.contains("prosody_handlers_in_flight 0"), "{page}");
        assert!(page.ends_with("# EOF\n"), "{page}");
        let classic = metrics.render(Format::Classic);
        assert!(
            classic.contains("# TYPE prosody_messages_received_total counter\n"),
            "{classic}"
        );
        assert!(
            classic.contains("# HELP prosody_messages_received_total Messages taken"),
            "{classic}"
        );
        assert!(
            classic.contains("# TYPE prosody_handler_duration_seconds histogram\n"),
            "{classic}"
        );
        assert!(
            !classic.contains("# EOF") && !classic.contains("# UNIT"),
            "{classic}"
        );
    }
}
