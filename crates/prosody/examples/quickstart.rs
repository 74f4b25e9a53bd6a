//! Quick start on the in-process mock cluster: `cargo run -p prosody --example quickstart`
//!
//! Sends 300 orders for 12 customers, handles them with a small [`EventHandler`]
//! that checks every customer's orders arrive in the order they were sent, prints
//! a summary and unsubscribes. Needs no Kafka: `mock(true)` starts one in-process.
//! Exits with an error unless every order was handled, in order
//! (crates/prosody/tests/quickstarts.rs runs it).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prosody::{ClassifyError, Client, Config, Context, EventHandler, Message, OptionValue};
use serde_json::json;

const CUSTOMERS: u64 = 12;
const ORDERS_PER_CUSTOMER: u64 = 25;

/// Why an order could not be handled.
#[derive(Debug, thiserror::Error)]
enum OrderError {
    #[error("order payload is missing `{0}`")]
    Missing(&'static str),
}

// Bad data fails the same way every time: not worth retrying.
impl ClassifyError for OrderError {
    fn is_permanent(&self) -> bool {
        true
    }
}

/// Per customer: orders handled, their total, and whether any arrived out of order.
#[derive(Debug, Default)]
struct Account {
    orders: u64,
    total: u64,
    last_sequence: Option<u64>,
    out_of_order: u64,
}

/// What the handler has seen, shared with `main` for the summary.
#[derive(Default)]
struct Ledger {
    handled: AtomicUsize,
    accounts: Mutex<BTreeMap<String, Account>>,
}

struct Orders(Arc<Ledger>);

impl EventHandler for Orders {
    type Error = OrderError;

    async fn on_message(&self, context: Context, message: Message) -> Result<(), OrderError> {
        let payload = message.payload();
        let sequence = payload["sequence"]
            .as_u64()
            .ok_or(OrderError::Missing("sequence"))?;
        let total = payload["total"]
            .as_u64()
            .ok_or(OrderError::Missing("total"))?;
        // Pretend to do some I/O; other customers' orders run meanwhile.
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(2)) => {}
            () = context.on_cancel() => return Ok(()),
        }
        let mut accounts = self
            .0
            .accounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let account = accounts.entry(message.key().to_owned()).or_default();
        if account.last_sequence.is_some_and(|last| sequence <= last) {
            account.out_of_order += 1;
        }
        account.last_sequence = Some(sequence);
        account.orders += 1;
        account.total += total;
        self.0.handled.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Sends the orders, handles them, prints the summary; fails unless all were handled in order.
#[tokio::main]
pub async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _ = tracing_subscriber::fmt().with_env_filter("warn").try_init();

    let config = Config::builder()
        .mock(true)
        .group_id("quickstart")
        .subscribed_topics(["quickstart-orders"])
        // A consumer skips messages whose source-system header is its own group_id
        // (loop prevention), and source_system defaults to group_id: this client
        // sends as "checkout" so that it can consume what it sent.
        .source_system("checkout")
        // No /readyz and /livez server for a one-off example.
        .set("probe_port", OptionValue::Bool(false))?
        .build()?;
    let client = Arc::new(Client::new(config)?);
    println!("mock cluster at {}", client.bootstrap_servers());

    // Each customer's orders are sent in sequence; customers are sent concurrently.
    let started = Instant::now();
    let mut senders = tokio::task::JoinSet::new();
    for customer in 0..CUSTOMERS {
        let client = Arc::clone(&client);
        senders.spawn(async move {
            for sequence in 0..ORDERS_PER_CUSTOMER {
                let order = json!({ "sequence": sequence, "total": 10 + sequence });
                client
                    .send(
                        "quickstart-orders",
                        &format!("customer-{customer}"),
                        &order,
                        &[],
                    )
                    .await?;
            }
            Ok::<(), prosody::Error>(())
        });
    }
    while let Some(sent) = senders.join_next().await {
        sent.map_err(|_| prosody::Error::NoRuntime)??;
    }
    let expected = usize::try_from(CUSTOMERS * ORDERS_PER_CUSTOMER)?;
    println!("sent {expected} orders in {:?}", started.elapsed());

    let ledger = Arc::new(Ledger::default());
    client.subscribe(Orders(Arc::clone(&ledger)))?;
    let started = Instant::now();
    while ledger.handled.load(Ordering::Relaxed) < expected {
        if started.elapsed() > Duration::from_secs(60) {
            eprintln!(
                "gave up waiting: only {} orders handled",
                ledger.handled.load(Ordering::Relaxed)
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "handled {} orders in {:?} on {} partitions",
        ledger.handled.load(Ordering::Relaxed),
        started.elapsed(),
        client.assigned_partitions()
    );
    client.unsubscribe().await?;

    println!(
        "{:<12} {:>6} {:>7} {:>12}",
        "customer", "orders", "total", "out of order"
    );
    let accounts = ledger
        .accounts
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (customer, account) in accounts.iter() {
        println!(
            "{customer:<12} {:>6} {:>7} {:>12}",
            account.orders, account.total, account.out_of_order
        );
    }
    let handled = ledger.handled.load(Ordering::Relaxed);
    let out_of_order: u64 = accounts.values().map(|account| account.out_of_order).sum();
    if handled != expected || out_of_order > 0 {
        return Err(
            format!("handled {handled} of {expected} orders, {out_of_order} out of order").into(),
        );
    }
    Ok(())
}
