//! Handler deadlines, shutdown budgets, stall detection and the probe server.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prosody::{Context, Message, OptionValue};
use serde_json::json;
use support::{client, config, produce, topic, unique, wait_until, FnHandler, Record, TestError};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_cancels_the_handler_and_counts_as_a_transient_failure() {
    let source = topic("timeout", 1);
    produce(&source, [Record::json("slow", &json!({}))]);
    let attempts = Arc::new(AtomicU32::new(0));
    let cancelled_after = Arc::new(std::sync::Mutex::new(Vec::new()));
    let handler = {
        let attempts = Arc::clone(&attempts);
        let cancelled_after = Arc::clone(&cancelled_after);
        FnHandler(move |context: Context, _message: Message| {
            let attempts = Arc::clone(&attempts);
            let cancelled_after = Arc::clone(&cancelled_after);
            async move {
                attempts.fetch_add(1, Ordering::SeqCst);
                let started = Instant::now();
                tokio::select! {
                    () = context.on_cancel() => {
                        assert!(context.should_cancel());
                        support::lock(&cancelled_after).push(started.elapsed());
                        Err(TestError::Cancelled)
                    }
                    () = tokio::time::sleep(Duration::from_secs(30)) => Ok(()),
                }
            }
        })
    };
    let consumer = client(
        config(&unique("group"), &source)
            .set("timeout", "200ms".into())
            .and_then(|b| b.set("mode", "best_effort".into()))
            .and_then(|b| b.set("max_retries", OptionValue::Int(1)))
            .and_then(|b| b.set("retry_base", "5ms".into()))
            .and_then(|b| b.set("probe_port", OptionValue::Bool(false)))
            .expect("options"),
    );
    consumer.subscribe(handler).expect("subscribe");
    wait_until("both attempts cancelled by the deadline", || {
        support::lock(&cancelled_after).len() == 2
    })
    .await;
    for elapsed in support::lock(&cancelled_after).iter() {
        assert!(
            *elapsed >= Duration::from_millis(190) && *elapsed < Duration::from_secs(5),
            "cancelled after {elapsed:?}"
        );
    }
    wait_until("the message is skipped after max_retries", || {
        support::log_lines_with(&source)
            .iter()
            .any(|line| line.contains("skipping message after failure") && line.contains("timeout"))
    })
    .await;
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    consumer.unsubscribe().await.expect("unsubscribe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_ignoring_cancellation_cannot_hold_unsubscribe() {
    let source = topic("stubborn", 1);
    produce(&source, [Record::json("stubborn", &json!({}))]);
    let started = Arc::new(AtomicU32::new(0));
    let handler = {
        let started = Arc::clone(&started);
        FnHandler(move |_context: Context, _message: Message| {
            let started = Arc::clone(&started);
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                // Ignores its context entirely.
                tokio::time::sleep(Duration::from_secs(120)).await;
                Ok(())
            }
        })
    };
    let consumer = client(
        config(&unique("group"), &source)
            .shutdown_timeout(Duration::from_secs(1))
            .set("probe_port", OptionValue::Bool(false))
            .expect("options"),
    );
    consumer.subscribe(handler).expect("subscribe");
    wait_until("the stubborn handler started", || {
        started.load(Ordering::SeqCst) == 1
    })
    .await;
    let stopping = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), consumer.unsubscribe())
        .await
        .expect("unsubscribe returned")
        .expect("unsubscribe");
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "unsubscribe took {took:?} with a 1 s shutdown_timeout"
    );
    wait_until("the abandonment is logged", || {
        support::log_lines_with("ignored cancellation")
            .iter()
            .any(|line| line.contains("abandoning"))
    })
    .await;
}

/// GETs `path` from the probe server; None when nothing listens.
async fn probe(address: std::net::SocketAddr, path: &str) -> Option<u16> {
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_report_readiness_and_stalls() {
    let source = topic("probes", 1);
    let release = Arc::new(tokio::sync::Notify::new());
    let handler = {
        let release = Arc::clone(&release);
        FnHandler(move |context: Context, message: Message| {
            let release = Arc::clone(&release);
            async move {
                if message.key() == "stuck" {
                    tokio::select! {
                        () = release.notified() => {}
                        () = context.on_cancel() => return Err(TestError::Cancelled),
                    }
                }
                Ok(())
            }
        })
    };
    let consumer = client(
        config(&unique("group"), &source)
            .set("probe_port", OptionValue::Int(0))
            .and_then(|b| b.set("stall_threshold", "300ms".into()))
            .and_then(|b| b.set("timeout", "60s".into()))
            .expect("options"),
    );
    assert_eq!(
        consumer.probe_address(),
        None,
        "no probe server before subscribe"
    );
    consumer.subscribe(handler).expect("subscribe");
    let address = consumer
        .probe_address()
        .expect("probe server while subscribed");
    wait_until("assigned", || consumer.assigned_partitions() == 1).await;
    assert_eq!(probe(address, "/readyz").await, Some(200));
    assert_eq!(probe(address, "/livez").await, Some(200));
    assert_eq!(probe(address, "/nothing").await, Some(404));

    produce(&source, [Record::json("stuck", &json!({}))]);
    let mut live = Some(200);
    let deadline = Instant::now() + support::DEADLINE;
    while live == Some(200) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        live = probe(address, "/livez").await;
    }
    assert_eq!(
        live,
        Some(503),
        "a handler stuck past stall_threshold must fail /livez"
    );
    assert!(consumer.is_stalled());

    release.notify_one();
    wait_until("progress clears the stall", || !consumer.is_stalled()).await;
    assert_eq!(probe(address, "/livez").await, Some(200));
    consumer.unsubscribe().await.expect("unsubscribe");
    assert_eq!(
        probe(address, "/readyz").await,
        None,
        "the probe server stops on unsubscribe"
    );
}
