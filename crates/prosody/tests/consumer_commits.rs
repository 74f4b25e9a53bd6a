//! Commits: what a consumer finished is not run again by the next owner of the
//! partition, and what it did not finish is. A blocked key holds the committed
//! watermark down; the offsets finished above it travel in the commit metadata.

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prosody::{Context, Message};
use serde_json::json;
use support::{FnHandler, Record, Seen, TestError};

const MESSAGES: i64 = 40;
/// Offsets of the key whose first message blocks until cancelled.
const STUCK: [i64; 3] = [5, 17, 30];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_next_owner_reruns_exactly_the_unfinished_messages() {
    let topic = support::topic("commits", 1);
    let group = support::unique("commits");
    let records = (0..MESSAGES).map(|offset| {
        let key = if STUCK.contains(&offset) {
            "stuck".to_owned()
        } else {
            format!("done-{}", offset % 7)
        };
        Record::json(&key, &json!({ "offset": offset }))
    });
    support::produce(&topic, records);

    // Consumer A: every key finishes except "stuck", which waits for cancellation.
    let finished_by_a = Seen::default();
    let stuck_started = Arc::new(AtomicBool::new(false));
    let handler = {
        let (finished_by_a, stuck_started) = (finished_by_a.clone(), Arc::clone(&stuck_started));
        FnHandler(move |context: Context, message: Message| {
            let (finished_by_a, stuck_started) =
                (finished_by_a.clone(), Arc::clone(&stuck_started));
            async move {
                if message.key() == "stuck" {
                    stuck_started.store(true, Ordering::SeqCst);
                    context.on_cancel().await;
                    return Err(TestError::Cancelled);
                }
                finished_by_a.push(message);
                Ok(())
            }
        })
    };
    let a =
        support::client(support::config(&group, &topic).shutdown_timeout(Duration::from_secs(2)));
    a.subscribe(handler).expect("subscribe A");
    let expected_by_a = usize::try_from(MESSAGES).expect("small") - STUCK.len();
    support::wait_until("A finished every unblocked message", || {
        finished_by_a.len() >= expected_by_a && stuck_started.load(Ordering::SeqCst)
    })
    .await;
    let started = Instant::now();
    a.unsubscribe().await.expect("unsubscribe A");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "unsubscribe with a blocked handler took {:?}; shutdown_timeout is 2 s",
        started.elapsed()
    );
    let finished: BTreeSet<i64> = finished_by_a
        .positions()
        .iter()
        .map(|(_, offset)| *offset)
        .collect();
    let expected_finished: BTreeSet<i64> = (0..MESSAGES)
        .filter(|offset| !STUCK.contains(offset))
        .collect();
    assert_eq!(
        finished, expected_finished,
        "A finished everything but the stuck key"
    );

    // One more message after A left, so B has something new too.
    support::produce(
        &topic,
        [Record::json("after", &json!({ "offset": MESSAGES }))],
    );

    // Consumer B, same group: must run the stuck key's messages and the new one, nothing else.
    let handled_by_b = Seen::default();
    let b = support::client(support::config(&group, &topic));
    b.subscribe(handled_by_b.recorder()).expect("subscribe B");
    let expected: BTreeSet<i64> = STUCK.iter().copied().chain([MESSAGES]).collect();
    // B counts skipped offsets as finished too; once it finished everything from the
    // watermark (the first stuck offset) on, no re-run can still be in flight.
    let from_watermark = u64::try_from(MESSAGES + 1 - STUCK[0]).expect("small");
    support::wait_until("B finished everything from the committed watermark", || {
        b.partition_stats()
            .iter()
            .map(|stats| stats.finished)
            .sum::<u64>()
            >= from_watermark
            && handled_by_b.len() >= expected.len()
    })
    .await;
    b.unsubscribe().await.expect("unsubscribe B");

    let rerun: Vec<i64> = handled_by_b
        .messages()
        .iter()
        .map(Message::offset)
        .collect();
    let rerun_set: BTreeSet<i64> = rerun.iter().copied().collect();
    assert_eq!(
        rerun_set, expected,
        "B ran exactly the unfinished messages (got offsets {rerun:?})"
    );
    assert_eq!(
        rerun.len(),
        expected.len(),
        "B ran each of them once: {rerun:?}"
    );
    let stuck_order: Vec<i64> = handled_by_b
        .messages()
        .iter()
        .filter(|message| message.key() == "stuck")
        .map(Message::offset)
        .collect();
    assert_eq!(stuck_order, STUCK, "the stuck key ran in order");
}
