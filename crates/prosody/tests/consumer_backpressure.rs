//! Backpressure: with a slow handler and a large backlog, a partition never
//! buffers more than `max_uncommitted` unfinished messages; it stops reading the
//! partition when the buffer is full and reads on as it drains, and everything is
//! handled in the end.
//!
//! The bound is a count of unfinished messages, not a window of offsets: a key
//! that is slow or failing holds the committed offset but must not stop the other
//! keys (see `consumer_failure_modes`), so offsets that finished above the lowest
//! unfinished one do not count against `max_uncommitted`.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prosody::{Context, Message};
use serde_json::json;
use support::{lock, FnHandler, Record, Seen};

const MESSAGES: usize = 1_000;
const MAX_UNCOMMITTED: usize = 16;

/// Which offsets finished, and the lowest one that has not, as handlers see them.
struct Window {
    finished: Vec<bool>,
    lowest_unfinished: usize,
    /// Largest started offset minus the lowest unfinished one.
    widest: usize,
    /// Most unfinished offsets from the lowest unfinished one to a started one.
    most_unfinished: usize,
    violations: Vec<String>,
}

impl Window {
    /// Every offset from the lowest unfinished one up to a started one has been
    /// fetched, so the unfinished ones among them are all buffered: at most
    /// `max_uncommitted` of them.
    fn start(&mut self, offset: usize) {
        self.widest = self.widest.max(offset - self.lowest_unfinished);
        let unfinished = self.finished[self.lowest_unfinished..=offset]
            .iter()
            .filter(|done| !**done)
            .count();
        self.most_unfinished = self.most_unfinished.max(unfinished);
        if unfinished > MAX_UNCOMMITTED {
            self.violations.push(format!(
                "offset {offset} started with {unfinished} unfinished offsets from {}",
                self.lowest_unfinished
            ));
        }
    }

    fn finish(&mut self, offset: usize) {
        self.finished[offset] = true;
        while self.finished.get(self.lowest_unfinished) == Some(&true) {
            self.lowest_unfinished += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_buffer_stops_reading_until_it_drains_and_stays_bounded() {
    let topic = support::topic("backpressure", 1);
    support::produce(
        &topic,
        (0..MESSAGES).map(|n| Record::json(&format!("key-{}", n % 50), &json!({ "n": n }))),
    );

    let window = Arc::new(Mutex::new(Window {
        finished: vec![false; MESSAGES],
        lowest_unfinished: 0,
        widest: 0,
        most_unfinished: 0,
        violations: Vec::new(),
    }));
    let seen = Seen::default();
    let handler = {
        let (window, seen) = (Arc::clone(&window), seen.clone());
        FnHandler(move |_context: Context, message: Message| {
            let (window, seen) = (Arc::clone(&window), seen.clone());
            async move {
                let offset = usize::try_from(message.offset()).expect("offsets start at 0");
                lock(&window).start(offset);
                tokio::time::sleep(Duration::from_millis(20)).await;
                lock(&window).finish(offset);
                seen.push(message);
                Ok(())
            }
        })
    };
    let client = support::client(
        support::config(&support::unique("backpressure"), &topic)
            .max_uncommitted(MAX_UNCOMMITTED)
            .max_concurrency(4),
    );
    client.subscribe(handler).expect("subscribe");

    support::wait_until("the buffer filled and drained", || {
        client
            .partition_stats()
            .iter()
            .any(|stats| stats.fills >= 1 && stats.drains >= 1)
    })
    .await;
    // 1000 messages at 4 × 20 ms take about 5 s.
    support::wait_until("all messages handled", || {
        seen.positions().len() >= MESSAGES
    })
    .await;
    let stats = client.partition_stats();
    client.unsubscribe().await.expect("unsubscribe");

    assert_eq!(stats.len(), 1, "one partition assigned: {stats:?}");
    let stats = &stats[0];
    assert!(
        stats.max_buffered <= MAX_UNCOMMITTED,
        "buffer grew past max_uncommitted: {stats:?}"
    );
    assert!(
        stats.max_buffered >= MAX_UNCOMMITTED / 2,
        "the buffer never filled up: {stats:?}"
    );
    assert!(
        stats.fills >= 1 && stats.drains >= 1,
        "the buffer never filled and drained: {stats:?}"
    );
    let window = lock(&window);
    println!(
        "{stats:?}; most unfinished offsets up to a started one: {}; widest started-to-lowest-unfinished gap: {}",
        window.most_unfinished, window.widest
    );
    assert!(
        window.violations.is_empty(),
        "a handler started with more than max_uncommitted unfinished offsets at or below it: {:#?}",
        window.violations
    );
    assert_eq!(seen.positions().len(), MESSAGES);
}
