//! Backpressure: with a slow handler and a large backlog, a partition never
//! buffers more than `max_uncommitted` unfinished messages; it pauses when full
//! and resumes as it drains, and everything is handled in the end.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prosody::{Context, Message};
use serde_json::json;
use support::{lock, FnHandler, Record, Seen};

const MESSAGES: usize = 1_000;
const MAX_UNCOMMITTED: usize = 16;

/// Which offsets finished, and the lowest one that has not.
struct Window {
    finished: Vec<bool>,
    lowest_unfinished: usize,
    widest: usize,
    violations: Vec<String>,
}

impl Window {
    fn start(&mut self, offset: usize) {
        let width = offset - self.lowest_unfinished;
        self.widest = self.widest.max(width);
        if width >= MAX_UNCOMMITTED {
            self.violations.push(format!(
                "offset {offset} started while offset {} was unfinished",
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
async fn a_full_partition_pauses_and_resumes_with_bounded_buffer() {
    let topic = support::topic("backpressure", 1);
    support::produce(
        &topic,
        (0..MESSAGES).map(|n| Record::json(&format!("key-{}", n % 50), &json!({ "n": n }))),
    );

    let window = Arc::new(Mutex::new(Window {
        finished: vec![false; MESSAGES],
        lowest_unfinished: 0,
        widest: 0,
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

    support::wait_until("the partition paused and resumed", || {
        client
            .partition_stats()
            .iter()
            .any(|stats| stats.pauses >= 1 && stats.resumes >= 1)
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
        stats.pauses >= 1 && stats.resumes >= 1,
        "no pause/resume cycle: {stats:?}"
    );
    let window = lock(&window);
    assert!(
        window.violations.is_empty(),
        "handlers ran more than max_uncommitted offsets ahead of the lowest unfinished one (widest gap {}): {:#?}",
        window.widest,
        window.violations
    );
    assert_eq!(seen.positions().len(), MESSAGES);
}
