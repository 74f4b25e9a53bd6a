//! `/metrics` on the probe server: what is counted, both text formats, and
//! `promtool check metrics` accepting the page.

mod support;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use prosody::{Context, Event, EventKind, Message, MetricsFormat, Observer, OptionValue};
use serde_json::json;
use support::{
    client, config, metric_sum, produce, topic, unique, wait_until, FnHandler, Record, TestError,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// GETs `/metrics` with the given `Accept` header; (content type, body).
async fn scrape(address: std::net::SocketAddr, accept: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("probe server listening");
    let request = format!("GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: {accept}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("headers end");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|line| line.strip_prefix("Content-Type: "))
        .unwrap_or_default()
        .to_owned();
    (content_type, body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_the_consumer_and_producer_do_and_promtool_accepts_them() {
    let source = topic("metrics", 2);
    let sink = topic("metrics-out", 1);
    let records: Vec<Record> = (0..20)
        .map(|n| Record::json(&format!("k{}", n % 10), &json!({ "n": n })).in_partition(n % 2))
        .collect();
    produce(&source, records);
    let handled = Arc::new(AtomicU32::new(0));
    let failed_once = Arc::new(AtomicBool::new(false));
    let handler = {
        let handled = Arc::clone(&handled);
        let failed_once = Arc::clone(&failed_once);
        FnHandler(move |_context: Context, message: Message| {
            let handled = Arc::clone(&handled);
            let failed_once = Arc::clone(&failed_once);
            async move {
                if message.key() == "k3" && !failed_once.swap(true, Ordering::SeqCst) {
                    return Err(TestError::Cancelled);
                }
                handled.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
    };
    let consumer = client(
        config(&unique("group"), &source)
            .set("probe_port", OptionValue::Int(0))
            .and_then(|b| b.set("retry_base", "5ms".into()))
            .expect("options")
            .kafka("statistics.interval.ms", "200"),
    );
    consumer.subscribe(handler).expect("subscribe");
    let address = consumer.probe_address().expect("probe server");
    wait_until("every message handled", || {
        handled.load(Ordering::SeqCst) == 20
    })
    .await;
    consumer
        .send(&sink, "out", &json!({ "sent": true }), &[])
        .await
        .expect("send");

    // Commits and librdkafka's statistics arrive on their own intervals.
    let mut page = String::new();
    let deadline = std::time::Instant::now() + support::DEADLINE;
    while std::time::Instant::now() < deadline {
        page = scrape(address, "text/plain").await.1;
        if metric_sum(&page, "prosody_commits_total", &[]) > 0.0
            && page.matches("prosody_partition_lag{").count() == 2
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let on_source = format!("topic=\"{source}\"");
    let expect = BTreeMap::from([
        (
            "prosody_messages_received_total",
            metric_sum(&page, "prosody_messages_received_total", &[&on_source]),
        ),
        (
            "prosody_messages_handled_total",
            metric_sum(&page, "prosody_messages_handled_total", &[&on_source]),
        ),
        (
            "transient failures",
            metric_sum(
                &page,
                "prosody_handler_failures_total",
                &[&on_source, "kind=\"transient\""],
            ),
        ),
        (
            "prosody_messages_retried_total",
            metric_sum(&page, "prosody_messages_retried_total", &[&on_source]),
        ),
        (
            // k3's failed message, and those of its later ones that arrived
            // before its retry (timing decides how many).
            "deferred: at least the failed message",
            f64::from(u8::from(
                metric_sum(&page, "prosody_messages_deferred_total", &[&on_source]) >= 1.0,
            )),
        ),
        (
            "handler runs",
            metric_sum(
                &page,
                "prosody_handler_duration_seconds_count",
                &[&on_source],
            ),
        ),
        (
            "sent to the sink",
            metric_sum(
                &page,
                "prosody_messages_sent_total",
                &[&format!("topic=\"{sink}\"")],
            ),
        ),
        (
            "prosody_assigned_partitions",
            metric_sum(&page, "prosody_assigned_partitions", &[]),
        ),
        (
            "assignments",
            metric_sum(&page, "prosody_rebalances_total", &["change=\"assign\""]),
        ),
        (
            "prosody_handlers_in_flight",
            metric_sum(&page, "prosody_handlers_in_flight", &[]),
        ),
        (
            "lag",
            metric_sum(&page, "prosody_partition_lag", &[&on_source]),
        ),
        (
            "buffered",
            metric_sum(&page, "prosody_partition_buffered_messages", &[&on_source]),
        ),
    ]);
    let wanted = BTreeMap::from([
        ("prosody_messages_received_total", 20.0),
        ("prosody_messages_handled_total", 20.0),
        ("transient failures", 1.0),
        ("prosody_messages_retried_total", 1.0),
        ("deferred: at least the failed message", 1.0),
        ("handler runs", 21.0),
        ("sent to the sink", 1.0),
        ("prosody_assigned_partitions", 2.0),
        ("assignments", 1.0),
        ("prosody_handlers_in_flight", 0.0),
        ("lag", 0.0),
        ("buffered", 0.0),
    ]);
    assert_eq!(expect, wanted, "{page}");
    assert!(
        metric_sum(&page, "prosody_commits_total", &[]) >= 1.0,
        "{page}"
    );
    assert!(
        page.matches("prosody_partition_lag{").count() == 2,
        "{page}"
    );
    assert!(!page.contains("key="), "no key label: {page}");

    check_with_promtool(&page);

    let (content_type, openmetrics) = scrape(
        address,
        "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
    )
    .await;
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    assert!(
        openmetrics.contains("# TYPE prosody_messages_received counter"),
        "{openmetrics}"
    );
    assert_eq!(
        consumer
            .metrics_text(MetricsFormat::OpenMetrics)
            .lines()
            .count(),
        openmetrics.lines().count()
    );
    consumer.unsubscribe().await.expect("unsubscribe");
}

/// `promtool check metrics` (Debian `prometheus`, installed by script/setup)
/// must accept the page with no lint findings.
fn check_with_promtool(page: &str) {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; run ./script/setup)");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(page.as_bytes())
        .expect("page written to promtool");
    let output = promtool.wait_with_output().expect("promtool ran");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.trim().is_empty(),
        "promtool: {said}\n{page}"
    );
}

/// Collects the events of the kinds it wants.
struct Recorder {
    wanted: Vec<EventKind>,
    events: std::sync::Mutex<Vec<Event>>,
}

impl Observer for Recorder {
    fn wants(&self, kind: EventKind) -> bool {
        self.wanted.contains(&kind)
    }

    fn observe(&self, event: Event) {
        support::lock(&self.events).push(event);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_gets_only_the_events_it_wants_with_their_details() {
    let source = topic("events", 1);
    let records: Vec<Record> = (0..6)
        .map(|n| Record::json(&format!("k{n}"), &json!({ "n": n })))
        .collect();
    produce(&source, records);
    let failed_once = Arc::new(AtomicBool::new(false));
    let handler = {
        let failed_once = Arc::clone(&failed_once);
        FnHandler(move |_context: Context, message: Message| {
            let failed_once = Arc::clone(&failed_once);
            async move {
                if message.key() == "k2" && !failed_once.swap(true, Ordering::SeqCst) {
                    return Err(TestError::Cancelled);
                }
                Ok(())
            }
        })
    };
    let recorder = Arc::new(Recorder {
        wanted: EventKind::ALL
            .into_iter()
            .filter(|kind| *kind != EventKind::MessageReceived)
            .collect(),
        events: std::sync::Mutex::new(Vec::new()),
    });
    let consumer = client(
        config(&unique("group"), &source)
            .set("retry_base", "5ms".into())
            .expect("options"),
    );
    assert!(consumer.set_observer(Arc::clone(&recorder) as Arc<dyn Observer>));
    consumer.subscribe(handler).expect("subscribe");
    let count = |kind: EventKind| {
        support::lock(&recorder.events)
            .iter()
            .filter(|event| event.kind == kind)
            .count()
    };
    wait_until("every message handled", || {
        count(EventKind::MessageHandled) == 6
    })
    .await;
    consumer
        .send(&source, "reply", &json!({}), &[])
        .await
        .expect("send");
    consumer.unsubscribe().await.expect("unsubscribe");

    let events = support::lock(&recorder.events).clone();
    let of = |kind: EventKind| {
        events
            .iter()
            .filter(|event| event.kind == kind)
            .collect::<Vec<_>>()
    };
    assert!(
        of(EventKind::MessageReceived).is_empty(),
        "not wanted, not sent"
    );
    let failed = of(EventKind::MessageFailed);
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].key.as_deref(), Some("k2"));
    assert_eq!(failed[0].offset, Some(2));
    assert_eq!(failed[0].reason, Some("transient"));
    assert!(failed[0].error_message.is_some() && failed[0].duration.is_some());
    let retried = of(EventKind::MessageRetried);
    assert_eq!((retried.len(), retried[0].attempts), (1, Some(1)));
    let handled = of(EventKind::MessageHandled);
    assert!(handled
        .iter()
        .all(|event| event.topic.as_ref() == source && event.partition == Some(0)));
    assert_eq!(of(EventKind::PartitionAssigned).len(), 1);
    // Revocation events are for rebalances; unsubscribe releases without one.
    assert_eq!(of(EventKind::PartitionRevoked).len(), 0);
    let sent = of(EventKind::SendDelivered);
    assert_eq!((sent.len(), sent[0].key.as_deref()), (1, Some("reply")));
    assert_eq!(
        EventKind::from_name("message.dead_lettered"),
        Some(EventKind::MessageDeadLettered)
    );
}
