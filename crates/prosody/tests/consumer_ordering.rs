//! Per-key order under concurrency: inside one partition, different keys run at
//! the same time while each key's messages run one at a time, in offset order.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prosody::{Context, Message};
use rand::Rng as _;
use serde_json::json;
use support::{lock, FnHandler, Record, Seen};

const KEYS: usize = 32;
const MESSAGES: usize = 1_000;

#[derive(Default)]
struct KeyState {
    running: bool,
    last_offset: Option<i64>,
}

#[derive(Default)]
struct Observed {
    keys: Mutex<HashMap<String, KeyState>>,
    violations: Mutex<Vec<String>>,
    running: AtomicUsize,
    peak: AtomicUsize,
}

impl Observed {
    fn start(&self, message: &Message) {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let mut keys = lock(&self.keys);
        let state = keys.entry(message.key().to_owned()).or_default();
        if state.running {
            lock(&self.violations).push(format!(
                "key {} started offset {} while running",
                message.key(),
                message.offset()
            ));
        }
        if let Some(last) = state.last_offset {
            if message.offset() <= last {
                lock(&self.violations).push(format!(
                    "key {} ran offset {} after offset {last}",
                    message.key(),
                    message.offset()
                ));
            }
        }
        state.running = true;
        state.last_offset = Some(message.offset());
    }

    fn finish(&self, message: &Message) {
        lock(&self.keys)
            .entry(message.key().to_owned())
            .or_default()
            .running = false;
        self.running.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_key_runs_in_offset_order_while_keys_run_concurrently() {
    let topic = support::topic("ordering", 1);
    let mut rng = rand::rng();
    let records: Vec<Record> = (0..MESSAGES)
        .map(|n| {
            Record::json(
                &format!("key-{}", rng.random_range(0..KEYS)),
                &json!({ "n": n }),
            )
        })
        .collect();
    support::produce(&topic, records);

    let observed = Arc::new(Observed::default());
    let seen = Seen::default();
    let handler = {
        let (observed, seen) = (Arc::clone(&observed), seen.clone());
        FnHandler(move |_context: Context, message: Message| {
            let (observed, seen) = (Arc::clone(&observed), seen.clone());
            async move {
                observed.start(&message);
                let pause = rand::rng().random_range(0..=5);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                observed.finish(&message);
                seen.push(message);
                Ok(())
            }
        })
    };
    let client =
        support::client(support::config(&support::unique("ordering"), &topic).max_concurrency(32));
    client.subscribe(handler).expect("subscribe");

    support::wait_until("every message handled", || seen.len() >= MESSAGES).await;
    client.unsubscribe().await.expect("unsubscribe");

    let violations = lock(&observed.violations).clone();
    assert!(
        violations.is_empty(),
        "per-key order violated: {violations:#?}"
    );
    assert_eq!(
        seen.positions().len(),
        MESSAGES,
        "every offset handled exactly once"
    );
    assert_eq!(seen.len(), MESSAGES, "no offset handled twice");
    let peak = observed.peak.load(Ordering::SeqCst);
    println!("peak concurrency inside the partition: {peak}");
    assert!(
        peak >= 8,
        "at most {peak} handlers ran at once inside the partition; expected at least 8"
    );
    assert!(
        peak <= 32,
        "{peak} handlers ran at once; max_concurrency is 32"
    );
}
