//! `Client`: one producer and at most one subscription behind a single configuration.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::runtime::Handle;

use crate::config::Config;
use crate::consumer::{ConsumerState, PartitionStats, QosStats, SkipCounts, Subscription};
use crate::error::{Error, Result};
use crate::events::Observer;
use crate::handler::EventHandler;
use crate::metrics::{Format as MetricsFormat, Metrics};
use crate::mock;
use crate::producer::Producer;
use crate::telemetry::Telemetry;

/// The entry point: sends messages and runs one subscription.
///
/// ```no_run
/// # async fn run() -> prosody::Result<()> {
/// use prosody::{Client, Config};
///
/// let config = Config::builder().mock(true).group_id("billing").subscribed_topics(["orders"]).build()?;
/// let client = Client::new(config)?;
/// client.send("orders", "customer-7", &serde_json::json!({"total": 12}), &[]).await?;
/// # Ok(()) }
/// ```
pub struct Client {
    config: Arc<Config>,
    bootstrap_servers: String,
    runtime: Handle,
    producer: Arc<Producer>,
    subscription: Mutex<Option<Subscription>>,
    metrics: Arc<Metrics>,
}

impl Client {
    /// Creates a client. Must be called inside a tokio runtime, which will run the handlers.
    pub fn new(config: Config) -> Result<Self> {
        let runtime = Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let bootstrap_servers = if config.mock {
            mock::bootstrap_servers()?
        } else {
            config.bootstrap_servers.join(",")
        };
        // Created now, not on first send: an idempotent producer needs a connection
        // and a producer id before its first delivery (about half a second), and
        // that should overlap with start-up rather than eat the first send_timeout.
        let metrics = Arc::new(Metrics::new());
        let producer = Arc::new(Producer::new(
            &config,
            &bootstrap_servers,
            Arc::clone(&metrics),
        )?);
        Ok(Self {
            metrics,
            config: Arc::new(config),
            bootstrap_servers,
            runtime,
            producer,
            subscription: Mutex::new(None),
        })
    }

    /// Attaches the observer that receives this client's events (see
    /// [`crate::events`]); false when one is attached already.
    pub fn set_observer(&self, observer: Arc<dyn Observer>) -> bool {
        self.metrics.set_observer(observer)
    }

    /// This client's metrics, what the probe server serves at `/metrics` (for
    /// serving them elsewhere, or when `probe_port` is off).
    pub fn metrics_text(&self, format: MetricsFormat) -> String {
        if let Some(subscription) = lock(&self.subscription).as_ref() {
            subscription.refresh_metrics();
        }
        self.metrics.render(format)
    }

    /// The configuration this client was built with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The brokers this client talks to (the mock cluster's address in mock mode).
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// The `source-system` header value this client writes.
    pub fn source_system(&self) -> &str {
        &self.config.source_system
    }

    /// The client's producer.
    pub fn producer(&self) -> Arc<Producer> {
        Arc::clone(&self.producer)
    }

    /// Sends a JSON payload and waits for the broker's acknowledgement.
    pub async fn send(
        &self,
        topic: &str,
        key: &str,
        payload: &serde_json::Value,
        headers: &[(String, String)],
    ) -> Result<()> {
        self.producer.send(topic, key, payload, headers).await
    }

    /// Starts consuming `subscribed_topics` as `group_id` with `handler`.
    pub fn subscribe<H: EventHandler>(&self, handler: H) -> Result<()> {
        let mut subscription = lock(&self.subscription);
        if subscription.is_some() {
            return Err(Error::AlreadySubscribed);
        }
        if self.config.group_id.is_none() {
            return Err(Error::config("group_id", "required to subscribe"));
        }
        if self.config.subscribed_topics.is_empty() {
            return Err(Error::config("subscribed_topics", "required to subscribe"));
        }
        if self.config.mock {
            for topic in &self.config.subscribed_topics {
                mock::ensure_topic(topic)?;
            }
        }
        if self.config.telemetry_enabled {
            if let Some(group_id) = &self.config.group_id {
                self.metrics.start_telemetry(|| {
                    Telemetry::start(
                        &self.config.telemetry_topic,
                        group_id,
                        self.producer(),
                        self.metrics.telemetry_lost(),
                        &self.runtime,
                    )
                });
            }
        }
        let dead_letters = self.config.failure_topic.as_ref().map(|_| self.producer());
        let started = Subscription::start(
            Arc::clone(&self.config),
            &self.bootstrap_servers,
            handler,
            dead_letters,
            Arc::clone(&self.metrics),
            self.runtime.clone(),
        )?;
        *subscription = Some(started);
        Ok(())
    }

    /// Stops consuming gracefully: in-flight handlers get until near the end of
    /// `shutdown_timeout`, then are cancelled; progress is committed and the group left.
    /// Returns within `shutdown_timeout` (plus at most about a second for leaving the
    /// group) even when the brokers are unreachable; what could not finish is logged.
    /// Does nothing when not subscribed.
    pub async fn unsubscribe(&self) -> Result<()> {
        let Some(subscription) = lock(&self.subscription).take() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || subscription.shutdown_blocking())
            .await
            .map_err(|_| Error::NoRuntime)
    }

    /// Whether this client can consume, and whether it is.
    pub fn consumer_state(&self) -> ConsumerState {
        if lock(&self.subscription).is_some() {
            ConsumerState::Running
        } else if self.config.group_id.is_some() && !self.config.subscribed_topics.is_empty() {
            ConsumerState::Configured
        } else {
            ConsumerState::Unconfigured
        }
    }

    /// Partitions currently assigned to this client.
    pub fn assigned_partitions(&self) -> usize {
        lock(&self.subscription)
            .as_ref()
            .map_or(0, Subscription::assigned_partitions)
    }

    /// True when a partition has had work but finished nothing for `stall_threshold`.
    pub fn is_stalled(&self) -> bool {
        lock(&self.subscription)
            .as_ref()
            .is_some_and(Subscription::is_stalled)
    }

    /// Where the `/readyz` and `/livez` probe server listens while subscribed.
    pub fn probe_address(&self) -> Option<std::net::SocketAddr> {
        lock(&self.subscription)
            .as_ref()
            .and_then(Subscription::probe_address)
    }

    /// Messages skipped without running the handler (own output, unwanted event
    /// types, message ids handled already) since the last `subscribe`.
    pub fn skip_counts(&self) -> SkipCounts {
        lock(&self.subscription)
            .as_ref()
            .map_or_else(SkipCounts::default, Subscription::skip_counts)
    }

    /// Buffer statistics per assigned partition.
    pub fn partition_stats(&self) -> Vec<PartitionStats> {
        lock(&self.subscription)
            .as_ref()
            .map_or_else(Vec::new, Subscription::stats)
    }

    /// The fair scheduler's queue and monopolization rejections since the
    /// last `subscribe` (all partitions of the subscription share one scheduler).
    pub fn qos_stats(&self) -> QosStats {
        lock(&self.subscription)
            .as_ref()
            .map_or_else(QosStats::default, Subscription::qos_stats)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
