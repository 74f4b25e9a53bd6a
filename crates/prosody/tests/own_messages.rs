//! The `source-system` header and the loop guard: a consumer skips what its own
//! group sent and says so once per partition at INFO; a caller cannot forge the header.

mod support;

use prosody::{Config, Error};
use serde_json::json;
use support::Seen;

const SKIP_EXPLAINED: &str = "header is this consumer's group_id";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_own_message_skip_of_each_partition_is_explained_at_info() {
    let topic = support::topic("own-messages", 2);
    let group = support::unique("own-messages");
    // source_system defaults to the group id, so these messages are the group's own.
    let client = support::client(support::config(&group, &topic));
    let sent = 12;
    for n in 0..sent {
        client
            .send(&topic, &format!("k{n}"), &json!({ "n": n }), &[])
            .await
            .expect("send");
    }
    let seen = Seen::default();
    client.subscribe(seen.recorder()).expect("subscribe");
    support::wait_until("every own message is skipped", || {
        client.skip_counts().own_messages == sent
    })
    .await;
    let with_skips: Vec<i32> = client
        .partition_stats()
        .iter()
        .filter(|stats| stats.finished > 0)
        .map(|stats| stats.partition)
        .collect();
    let lines: Vec<String> = support::log_lines_with(SKIP_EXPLAINED)
        .into_iter()
        .filter(|line| line.contains(&topic))
        .collect();
    assert_eq!(
        lines.len(),
        with_skips.len(),
        "one INFO line per partition, not one per message: {lines:#?}"
    );
    for partition in with_skips {
        let line = lines
            .iter()
            .find(|line| line.contains(&format!("partition={partition}")))
            .unwrap_or_else(|| panic!("no line for partition {partition}: {lines:#?}"));
        assert!(line.contains("INFO"), "{line}");
        assert!(
            line.contains("source_system"),
            "says what to change: {line}"
        );
    }
    assert_eq!(seen.len(), 0);
    client.unsubscribe().await.expect("unsubscribe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_supplied_source_system_header_is_refused() {
    support::capture_logs();
    let topic = support::topic("own-header", 1);
    let client = support::client(
        Config::builder()
            .mock(true)
            .source_system("checkout")
            .set("probe_port", prosody::OptionValue::Bool(false))
            .expect("option"),
    );
    for name in ["source-system", "Source-System"] {
        let headers = [(name.to_owned(), "billing".to_owned())];
        match client.send(&topic, "k", &json!({}), &headers).await {
            Err(Error::InvalidMessage(reason)) => {
                assert!(reason.contains("source_system"), "{reason}");
            }
            other => panic!("expected Error::InvalidMessage for `{name}`, got {other:?}"),
        }
    }
    let headers = [("origin".to_owned(), "web".to_owned())];
    client
        .send(&topic, "k", &json!({}), &headers)
        .await
        .expect("other headers are fine");
}
