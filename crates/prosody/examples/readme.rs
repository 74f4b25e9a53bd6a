//! README's Rust quick start, word for word: `cargo run -p prosody --example readme`.

use std::sync::Arc;
use std::time::Duration;

use prosody::{ClassifyError, Client, Config, Context, EventHandler, Message};
use tokio::sync::Notify;

#[derive(Debug, thiserror::Error)]
#[error("billing unavailable")]
struct Unavailable;
impl ClassifyError for Unavailable {} // transient by default

struct Orders(Arc<Notify>);

impl EventHandler for Orders {
    type Error = Unavailable;

    async fn on_message(&self, _context: Context, message: Message) -> Result<(), Unavailable> {
        println!(
            "{} #{}: {}",
            message.key(),
            message.offset(),
            message.payload()
        );
        self.0.notify_one();
        Ok(())
    }
}

/// Sends one order, waits until the handler has seen it, and stops.
#[tokio::main]
pub async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::builder()
        .mock(true) // in-process Kafka; for real brokers: .bootstrap_servers(["kafka-1:9092"])
        .group_id("billing")
        .subscribed_topics(["orders"])
        // A consumer skips messages whose source-system is its own group_id (loop prevention),
        // and source_system defaults to group_id: this client sends as "checkout" so it can
        // consume what it sent. Normally another service sends.
        .source_system("checkout")
        .build()?;
    let client = Client::new(config)?;
    client
        .send(
            "orders",
            "customer-42",
            &serde_json::json!({"order_id": 7}),
            &[],
        )
        .await?;

    let handled = Arc::new(Notify::new());
    client.subscribe(Orders(Arc::clone(&handled)))?;
    tokio::time::timeout(Duration::from_secs(30), handled.notified()).await?;
    client.unsubscribe().await?;
    Ok(())
}
