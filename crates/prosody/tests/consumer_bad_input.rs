//! Bad input never stops a partition: a message that is not JSON, one without
//! a key and one whose key is not UTF-8 are skipped with an error log (an
//! unusable key shown hex-escaped), and the rest are handled. A send to a
//! topic name librdkafka cannot take is refused as an invalid message.

mod support;

use std::collections::BTreeSet;

use serde_json::json;
use support::{Record, Seen};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_messages_are_logged_and_skipped() {
    let topic = support::topic("bad-input", 1);
    let mut records: Vec<Record> = (0..10)
        .map(|n| Record::json(&format!("key-{}", n % 3), &json!({ "n": n })))
        .collect();
    // Offset 10: not JSON. Offset 11: no key. Offset 12: neither key nor payload.
    records.push(Record {
        key: Some(b"key-0".to_vec()),
        payload: Some(b"{not json".to_vec()),
        ..Record::default()
    });
    records.push(Record {
        key: None,
        payload: Some(br#"{"n": "keyless"}"#.to_vec()),
        ..Record::default()
    });
    records.push(Record::default());
    // Offset 13: a key that is not UTF-8.
    records.push(Record {
        key: Some(vec![0xff, 0x00, b'k']),
        payload: Some(br#"{"n": "binary key"}"#.to_vec()),
        ..Record::default()
    });
    records.extend((14..26).map(|n| Record::json(&format!("key-{}", n % 3), &json!({ "n": n }))));
    let total = records.len();
    support::produce(&topic, records);

    let seen = Seen::default();
    let client = support::client(support::config(&support::unique("bad-input"), &topic));
    client.subscribe(seen.recorder()).expect("subscribe");
    support::wait_until("every offset finished or skipped", || {
        client
            .partition_stats()
            .iter()
            .map(|stats| stats.finished)
            .sum::<u64>()
            >= total as u64
    })
    .await;
    client.unsubscribe().await.expect("unsubscribe");

    let handled: BTreeSet<i64> = seen.positions().iter().map(|(_, offset)| *offset).collect();
    let expected: BTreeSet<i64> = (0..26)
        .filter(|offset| ![10, 11, 12, 13].contains(offset))
        .collect();
    assert_eq!(
        handled, expected,
        "the good messages were handled, the bad ones skipped"
    );
    assert_eq!(seen.len(), expected.len(), "nothing handled twice");

    let errors = support::log_lines_with(&topic);
    let logged = |offset: i64, needle: &str| {
        errors.iter().any(|line| {
            line.contains("ERROR")
                && line.contains(&format!("offset={offset}"))
                && line.contains(needle)
        })
    };
    assert!(
        logged(10, "not JSON"),
        "no error logged for the non-JSON payload: {errors:#?}"
    );
    assert!(
        logged(11, "no key"),
        "no error logged for the keyless message: {errors:#?}"
    );
    assert!(
        logged(12, "no key"),
        "no error logged for the empty message: {errors:#?}"
    );
    // The reason reads as a sentence; a missing key is not shown as `key=""`, and
    // a binary key is shown with its bytes escaped.
    assert!(
        logged(11, "unusable message: it has no key") && logged(11, "key=\"<none>\""),
        "keyless message line: {errors:#?}"
    );
    assert!(
        logged(13, "unusable message: its key is not valid UTF-8")
            && logged(13, r#"key="\\xff\\x00k""#),
        "binary key line: {errors:#?}"
    );
    assert!(
        !errors
            .iter()
            .any(|line| line.contains("message it") || line.contains("key=\"\"")),
        "{errors:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_to_an_impossible_topic_name_is_an_invalid_message() {
    let client = support::client(
        prosody::Config::builder()
            .mock(true)
            .source_system("bad-topic")
            .set("probe_port", prosody::OptionValue::Bool(false))
            .expect("option"),
    );
    for topic in ["", "orders\0shadow"] {
        match client.send(topic, "k", &json!({}), &[]).await {
            Err(prosody::Error::InvalidMessage(reason)) => {
                assert!(reason.contains(&format!("{topic:?}")), "{reason}");
            }
            other => panic!("expected Error::InvalidMessage for {topic:?}, got {other:?}"),
        }
    }
}
