//! A send that the broker never acknowledges fails with `Error::SendTimeout`
//! after `send_timeout`, instead of hanging.

mod support;

use std::time::{Duration, Instant};

use prosody::{Client, Config, Error};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sending_to_an_unreachable_broker_times_out() {
    support::capture_logs();
    let config = Config::builder()
        .bootstrap_servers(["127.0.0.1:1"])
        .source_system("timeout-test")
        .send_timeout(Duration::from_millis(200))
        .build()
        .expect("config");
    let client = Client::new(config).expect("client");
    let started = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        client.send("nowhere", "key", &json!({ "n": 1 }), &[]),
    )
    .await
    .expect("send returned within 5 s");
    let elapsed = started.elapsed();
    match result {
        Err(Error::SendTimeout { topic, timeout }) => {
            assert_eq!(topic, "nowhere");
            assert_eq!(timeout, Duration::from_millis(200));
        }
        other => panic!("expected Error::SendTimeout, got {other:?}"),
    }
    assert!(
        elapsed >= Duration::from_millis(150),
        "gave up too early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "took {elapsed:?} for a 200 ms send_timeout"
    );
    assert!(Error::SendTimeout {
        topic: String::new(),
        timeout: Duration::ZERO
    }
    .is_retriable());
}
