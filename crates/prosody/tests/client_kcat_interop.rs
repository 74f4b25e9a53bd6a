//! Interoperability with kcat, a plain Kafka client: what kcat produces Prosody
//! consumes, and what Prosody produces kcat reads back with the JSON payload and
//! the `source-system` header.

mod support;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Debug;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt as _;
use std::process::{Command, Output, Stdio};

use prosody::{Config, Header, SOURCE_SYSTEM_HEADER};
use serde_json::{json, Value};
use support::Seen;

/// Runs kcat with `args`, feeding it `input`; fails the test when kcat is missing.
fn kcat(args: &[impl AsRef<OsStr> + Debug], input: &str) -> Output {
    let mut child = Command::new("kcat")
        .args(args.iter().map(AsRef::as_ref))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| {
            panic!("cannot run kcat ({error}): run ./script/setup to install it")
        });
    child
        .stdin
        .take()
        .expect("kcat stdin")
        .write_all(input.as_bytes())
        .expect("write to kcat");
    let output = child.wait_with_output().expect("kcat finished");
    assert!(
        output.status.success(),
        "kcat {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prosody_consumes_what_kcat_produces() {
    let topic = support::topic("kcat-in", 2);
    let bootstrap = prosody::mock::bootstrap_servers().expect("mock cluster");
    let sent: BTreeMap<String, Value> = (0..20)
        .map(|n| {
            (
                format!("key-{n}"),
                json!({ "n": n, "text": format!("from kcat {n}") }),
            )
        })
        .collect();
    let lines: String = sent
        .iter()
        .map(|(key, payload)| format!("{key}:{payload}\n"))
        .collect();
    kcat(&["-P", "-b", &bootstrap, "-t", &topic, "-K:"], &lines);

    let seen = Seen::default();
    let client = support::client(support::config(&support::unique("kcat-in"), &topic));
    client.subscribe(seen.recorder()).expect("subscribe");
    support::wait_until("every kcat message handled", || seen.len() >= sent.len()).await;
    client.unsubscribe().await.expect("unsubscribe");

    let received: BTreeMap<String, Value> = seen
        .messages()
        .into_iter()
        .map(|message| (message.key().to_owned(), message.payload().clone()))
        .collect();
    assert_eq!(received, sent);
}

/// Headers arrive in order with their values, runs of equal headers included
/// (the fetch shares one copy between them). A header name that is not UTF-8
/// (brokers pass any bytes) arrives with U+FFFD in place of the bad bytes, as
/// the Java client shows it, rather than failing the fetch: rdkafka's own
/// header accessor panics on it, which once stopped the partition's reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prosody_reads_kcat_headers_even_with_a_name_that_is_not_utf8() {
    let topic = support::topic("kcat-headers", 1);
    let bootstrap = prosody::mock::bootstrap_servers().expect("mock cluster");
    let plain = ["-P", "-b", &bootstrap, "-t", &topic, "-K:"].map(OsStr::new);
    let with = |headers: &[&'static [u8]]| -> Vec<&OsStr> {
        let mut args = plain.to_vec();
        for header in headers {
            args.extend([OsStr::new("-H"), OsStr::from_bytes(header)]);
        }
        args
    };
    kcat(
        &with(&[b"a=1", b"b=", b"a=2"]),
        "k-0:{\"n\":0}\nk-1:{\"n\":1}\n",
    );
    kcat(&with(&[b"bad\xffname=x"]), "k-2:{\"n\":2}\n");
    kcat(&with(&[]), "k-3:{\"n\":3}\n");

    let seen = Seen::default();
    let client = support::client(support::config(&support::unique("kcat-headers"), &topic));
    client.subscribe(seen.recorder()).expect("subscribe");
    support::wait_until("every kcat message handled", || seen.len() >= 4).await;
    client.unsubscribe().await.expect("unsubscribe");

    let mut messages = seen.messages();
    messages.sort_by_key(|message| message.offset());
    let headers: Vec<(&str, Vec<Header>)> = messages
        .iter()
        .map(|message| (message.key(), message.headers().to_vec()))
        .collect();
    let pair = |name: &str, value: &[u8]| (name.to_owned(), Some(value.to_vec()));
    let first = vec![pair("a", b"1"), pair("b", b""), pair("a", b"2")];
    assert_eq!(
        headers,
        [
            ("k-0", first.clone()),
            ("k-1", first),
            ("k-2", vec![pair("bad\u{fffd}name", b"x")]),
            ("k-3", Vec::new()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kcat_reads_what_prosody_produces() {
    support::capture_logs();
    let topic = support::topic("kcat-out", 1);
    let config = Config::builder()
        .mock(true)
        .source_system("billing-service")
        // A fresh producer's first send waits for its idempotent producer id.
        .send_timeout(std::time::Duration::from_secs(10))
        .build()
        .expect("config");
    let client = prosody::Client::new(config).expect("client");
    for n in 0..5 {
        let headers = [("trace".to_owned(), format!("t{n}"))];
        client
            .send(
                &topic,
                &format!("key-{n}"),
                &json!({ "n": n, "ok": true }),
                &headers,
            )
            .await
            .expect("send");
    }

    let bootstrap = client.bootstrap_servers().to_owned();
    let output = kcat(
        &[
            "-C",
            "-b",
            &bootstrap,
            "-t",
            &topic,
            "-e",
            "-o",
            "beginning",
            "-q",
            "-f",
            "%k|%s|%h\n",
        ],
        "",
    );
    let text = String::from_utf8(output.stdout).expect("kcat prints UTF-8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "kcat read five messages: {text}");
    for (n, line) in lines.iter().enumerate() {
        let mut fields = line.splitn(3, '|');
        let (key, payload, headers) = (
            fields.next().expect("key"),
            fields.next().expect("payload"),
            fields.next().expect("headers"),
        );
        assert_eq!(key, format!("key-{n}"));
        let payload: Value = serde_json::from_str(payload).expect("payload is JSON");
        assert_eq!(payload, json!({ "n": n, "ok": true }));
        let headers: BTreeMap<&str, &str> = headers
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .collect();
        assert_eq!(
            headers.get(SOURCE_SYSTEM_HEADER),
            Some(&client.source_system()),
            "{line}"
        );
        assert_eq!(
            headers.get("trace").copied(),
            Some(format!("t{n}").as_str()),
            "{line}"
        );
    }
}
