//! The `source-system` header and the loop guard: a consumer skips what its own
//! group sent and says so once at INFO; a caller cannot forge the header.

mod support;

use prosody::{Config, Error};
use serde_json::json;
use support::Seen;

const SKIP_EXPLAINED: &str = "header is this consumer's group_id";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_own_message_skip_is_explained_at_info() {
    let topic = support::topic("own-messages", 1);
    let group = support::unique("own-messages");
    // source_system defaults to the group id, so these messages are the group's own.
    let client = support::client(support::config(&group, &topic));
    for n in 0..3 {
        client
            .send(&topic, "k", &json!({ "n": n }), &[])
            .await
            .expect("send");
    }
    let seen = Seen::default();
    client.subscribe(seen.recorder()).expect("subscribe");
    support::wait_until("the three own messages are skipped", || {
        client.skip_counts().own_messages == 3
    })
    .await;
    let lines = support::log_lines_with(SKIP_EXPLAINED);
    assert_eq!(
        lines.len(),
        1,
        "one INFO line, not one per message: {lines:#?}"
    );
    assert!(lines[0].contains("INFO"), "{}", lines[0]);
    assert!(
        lines[0].contains("source_system"),
        "says what to change: {}",
        lines[0]
    );
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
