//! OpenTelemetry: a send's producer span is the parent of the consumer's span
//! for that message (through the `traceparent` header), each handler attempt is
//! a child of that, and a send from the handler continues the same trace. A
//! timer's span links to (or, with `timer_spans: child`, is a child of) the
//! span of the handler call that scheduled it. The spans are exported over
//! OTLP/HTTP to a receiver in this test, decoded with `opentelemetry-proto`.
//!
//! Tracing is set up once per process from the environment, so every test
//! exports to one receiver, started by the first to ask ([`exported`]), and
//! finds its own spans by its topic's name or by span ids.

mod support;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prosody::{ClassifyError, Client, Context, EventHandler, Message, OptionValue, Timer};
use prost::Message as _;
use serde_json::json;
use support::{client, config, lock, produce, topic, unique, wait_until, FnHandler, Record};

/// The spans exported so far by every test of this process. The first call
/// points the exporter at a receiver of its own, before any span is made.
fn exported() -> &'static Mutex<Vec<Span>> {
    static SPANS: OnceLock<Arc<Mutex<Vec<Span>>>> = OnceLock::new();
    SPANS.get_or_init(|| {
        let (endpoint, spans) = otlp_receiver();
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint);
        std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
        std::env::set_var("OTEL_SERVICE_NAME", "prosody-traces-test");
        assert!(prosody::traces::enabled());
        spans
    })
}

/// The first exported span that `matches`.
fn exported_span(matches: impl Fn(&Span) -> bool) -> Option<Span> {
    lock(exported()).iter().find(|span| matches(span)).cloned()
}

/// Accepts OTLP/HTTP exports and keeps every span they carry.
fn otlp_receiver() -> (String, Arc<Mutex<Vec<Span>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("address"));
    let spans = Arc::new(Mutex::new(Vec::new()));
    let received = Arc::clone(&spans);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let received = Arc::clone(&received);
            std::thread::spawn(move || serve(stream, &received));
        }
    });
    (endpoint, spans)
}

/// Answers the requests of one connection (the exporter keeps it alive).
fn serve(stream: std::net::TcpStream, spans: &Mutex<Vec<Span>>) {
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    loop {
        let mut length = 0;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let request = ExportTraceServiceRequest::decode(&body[..]).expect("OTLP protobuf");
        support::lock(spans).extend(
            request
                .resource_spans
                .into_iter()
                .flat_map(|resource| resource.scope_spans)
                .flat_map(|scope| scope.spans),
        );
        let answer =
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n";
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_traces_from_its_send_through_its_handler_to_the_handlers_own_send() {
    exported();

    let source = topic("traced", 1);
    let replies = topic("traced-replies", 1);
    let sender = client(config(&unique("sender"), &source).source_system("sender"));
    let seen_parent = Arc::new(Mutex::new(None));
    let context_parent = Arc::new(Mutex::new(None));
    let handler = {
        let context_parent = Arc::clone(&context_parent);
        let sender: Arc<Client> = Arc::clone(&sender);
        let replies = replies.clone();
        let seen_parent = Arc::clone(&seen_parent);
        FnHandler(move |context: Context, message: Message| {
            *support::lock(&context_parent) = context.trace_parent().map(str::to_owned);
            let sender = Arc::clone(&sender);
            let replies = replies.clone();
            let seen_parent = Arc::clone(&seen_parent);
            async move {
                *support::lock(&seen_parent) = message.trace_parent().map(str::to_owned);
                sender
                    .send(&replies, message.key(), &json!({ "reply": true }), &[])
                    .await
                    .expect("reply sent");
                Ok(())
            }
        })
    };
    let consumer = client(config(&unique("group"), &source));
    consumer.subscribe(handler).expect("subscribe");
    sender
        .send(&source, "order-1", &json!({ "n": 1 }), &[])
        .await
        .expect("send");
    wait_until("the handler ran", || support::lock(&seen_parent).is_some()).await;
    consumer.unsubscribe().await.expect("unsubscribe");
    prosody::traces::flush();
    let named = |name: &str| exported_span(|span| span.name == name);
    // Other tests' attempts are named "handler" too: this one's is the child
    // of this topic's consumer span.
    let attempt_of = |process: &Span| {
        exported_span(|span| span.name == "handler" && span.parent_span_id == process.span_id)
    };
    wait_until("four spans exported", || {
        named(&format!("{source} publish")).is_some()
            && named(&format!("{source} process"))
                .is_some_and(|process| attempt_of(&process).is_some())
            && named(&format!("{replies} publish")).is_some()
    })
    .await;

    let send = named(&format!("{source} publish")).expect("send span");
    let process = named(&format!("{source} process")).expect("process span");
    let attempt = attempt_of(&process).expect("attempt span");
    let reply = named(&format!("{replies} publish")).expect("reply span");
    assert_eq!(send.kind, SpanKind::Producer as i32);
    assert_eq!(process.kind, SpanKind::Consumer as i32);
    assert!(
        send.parent_span_id.is_empty(),
        "the first send starts the trace"
    );
    assert_eq!(
        process.parent_span_id, send.span_id,
        "consumer span is the send's child"
    );
    assert_eq!(
        attempt.parent_span_id, process.span_id,
        "attempt is the consumer span's child"
    );
    assert_eq!(
        reply.parent_span_id, attempt.span_id,
        "the handler's send continues the trace"
    );
    for span in [&process, &attempt, &reply] {
        assert_eq!(
            span.trace_id, send.trace_id,
            "{} is in the same trace",
            span.name
        );
    }
    let attribute = |span: &Span, key: &str| {
        span.attributes
            .iter()
            .find(|attribute| attribute.key == key)
            .and_then(|attribute| attribute.value.clone())
            .map(|value| format!("{:?}", value.value))
    };
    assert!(attribute(&process, "messaging.system").is_some_and(|value| value.contains("kafka")));
    assert!(attribute(&process, "messaging.kafka.message.key")
        .is_some_and(|value| value.contains("order-1")));
    assert!(attribute(&attempt, "prosody.attempt").is_some_and(|value| value.contains('1')));
    let parent = support::lock(&seen_parent).clone().expect("traceparent");
    assert!(
        parent.contains(&hex(&process.span_id)) && parent.contains(&hex(&send.trace_id)),
        "Message::trace_parent names the consumer span: {parent}"
    );
    let parent = support::lock(&context_parent)
        .clone()
        .expect("context traceparent");
    assert!(
        parent.contains(&hex(&attempt.span_id)) && parent.contains(&hex(&send.trace_id)),
        "Context::trace_parent names the attempt's span: {parent}"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failed(String);

impl ClassifyError for Failed {}

/// Schedules a timer `in_ms` from now for each message's key, keeping the
/// scheduling call's `traceparent`; counts the timers that fire.
#[derive(Default, Clone)]
struct Scheduler {
    scheduled_by: Arc<Mutex<Option<String>>>,
    fired: Arc<AtomicUsize>,
}

impl Scheduler {
    fn fired(&self) -> usize {
        self.fired.load(Ordering::SeqCst)
    }
}

impl EventHandler for Scheduler {
    type Error = Failed;

    async fn on_message(&self, context: Context, message: Message) -> Result<(), Failed> {
        let delay = Duration::from_millis(message.payload()["in_ms"].as_u64().unwrap_or(0));
        context
            .schedule(SystemTime::now() + delay)
            .await
            .map_err(|error| Failed(error.to_string()))?;
        let scheduled_by = context.trace_parent().unwrap_or("untraced").to_owned();
        *lock(&self.scheduled_by) = Some(scheduled_by);
        Ok(())
    }

    async fn on_timer(&self, _context: Context, _timer: Timer) -> Result<(), Failed> {
        self.fired.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// The spans of one timer: the attempt span of the handler call that
/// scheduled it, and the timer's firing span.
struct TimerSpans {
    scheduling_attempt: Span,
    timer: Span,
}

/// A handler schedules a timer for a message's key; the timer fires, with
/// `timer_spans` set to `relation` (the default when `None`). With `restart`
/// the timer is scheduled 1.5 s ahead and its consumer replaced before then,
/// so it fires from the store (loaded anew) rather than from the window the
/// scheduling consumer kept in memory.
async fn fire_a_scheduled_timer(relation: Option<&str>, restart: bool) -> TimerSpans {
    exported();
    let source = topic("traced-timers", 1);
    let group = unique("group");
    let consumer_config = || {
        let builder = config(&group, &source);
        match relation {
            Some(relation) => builder
                .set("timer_spans", OptionValue::Str(relation.into()))
                .expect("timer_spans is an option"),
            None => builder,
        }
    };
    let scheduler = Scheduler::default();
    let consumer = client(consumer_config());
    consumer.subscribe(scheduler.clone()).expect("subscribe");
    let in_ms = if restart { 1_500 } else { 0 };
    produce(
        &source,
        [Record::json("timer-key", &json!({ "in_ms": in_ms }))],
    );
    wait_until("the handler scheduled a timer", || {
        lock(&scheduler.scheduled_by).is_some()
    })
    .await;
    let scheduled_by = lock(&scheduler.scheduled_by).clone().expect("scheduled");
    if restart {
        consumer.unsubscribe().await.expect("unsubscribe");
        drop(consumer);
        let restarted = Scheduler::default();
        let consumer = client(consumer_config());
        consumer
            .subscribe(restarted.clone())
            .expect("subscribe again");
        wait_until("the timer fires under the new consumer", || {
            restarted.fired() == 1
        })
        .await;
        consumer.unsubscribe().await.expect("unsubscribe");
        assert_eq!(scheduler.fired(), 0, "the timer fired before the restart");
    } else {
        wait_until("the timer fires", || scheduler.fired() == 1).await;
        consumer.unsubscribe().await.expect("unsubscribe");
    }
    prosody::traces::flush();

    // traceparent: version-trace_id-span_id-flags; Context::trace_parent
    // names the scheduling call's attempt span.
    let scheduling_span_id = scheduled_by
        .split('-')
        .nth(2)
        .unwrap_or_else(|| panic!("the scheduling call is traced: {scheduled_by}"))
        .to_owned();
    let scheduling_attempt = || exported_span(|span| hex(&span.span_id) == scheduling_span_id);
    let timer = || exported_span(|span| span.name == format!("{source} timer"));
    wait_until(
        "the scheduling attempt's and the timer's spans exported",
        || scheduling_attempt().is_some() && timer().is_some(),
    )
    .await;
    let timer = timer().expect("timer span");
    let timer_attempt = exported_span(|span| span.parent_span_id == timer.span_id);
    assert!(
        timer_attempt.is_some_and(|attempt| attempt.name == "timer handler"),
        "the timer's handler attempt is the timer span's child"
    );
    TimerSpans {
        scheduling_attempt: scheduling_attempt().expect("scheduling attempt span"),
        timer,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_starts_a_trace_linked_to_the_call_that_scheduled_it_by_default() {
    let TimerSpans {
        scheduling_attempt,
        timer,
    } = fire_a_scheduled_timer(None, false).await;
    assert_ne!(
        timer.trace_id, scheduling_attempt.trace_id,
        "the timer starts a trace of its own"
    );
    assert!(timer.parent_span_id.is_empty(), "the timer span is a root");
    let links: Vec<(&[u8], &[u8])> = timer
        .links
        .iter()
        .map(|link| (&link.trace_id[..], &link.span_id[..]))
        .collect();
    assert_eq!(
        links,
        vec![(
            &scheduling_attempt.trace_id[..],
            &scheduling_attempt.span_id[..]
        )],
        "the timer span links to the scheduling call's attempt span"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_timer_spans_child_a_timer_continues_the_trace_of_the_call_that_scheduled_it() {
    let TimerSpans {
        scheduling_attempt,
        timer,
    } = fire_a_scheduled_timer(Some("child"), true).await;
    assert_eq!(
        timer.trace_id, scheduling_attempt.trace_id,
        "the timer is in the scheduling call's trace"
    );
    assert_eq!(
        timer.parent_span_id, scheduling_attempt.span_id,
        "the timer span is the scheduling attempt's child"
    );
    assert!(timer.links.is_empty(), "a child needs no link");
}

/// With `message_spans: follows_from` the consumer span starts a trace of its
/// own and links to the sender's span instead of being its child; the
/// handler's attempt is still the consumer span's child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_message_spans_follows_from_a_message_starts_a_trace_linked_to_its_send() {
    exported();
    let source = topic("traced-follows", 1);
    let sender = client(config(&unique("sender"), &source).source_system("sender"));
    let handled = Arc::new(AtomicUsize::new(0));
    let handler = {
        let handled = Arc::clone(&handled);
        FnHandler(move |_context: Context, _message: Message| {
            handled.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        })
    };
    let consumer = client(
        config(&unique("group"), &source)
            .set("message_spans", OptionValue::Str("follows_from".into()))
            .expect("message_spans is an option"),
    );
    consumer.subscribe(handler).expect("subscribe");
    sender
        .send(&source, "order-2", &json!({ "n": 2 }), &[])
        .await
        .expect("send");
    wait_until("the handler ran", || handled.load(Ordering::SeqCst) == 1).await;
    consumer.unsubscribe().await.expect("unsubscribe");
    prosody::traces::flush();
    let named = |name: &str| exported_span(|span| span.name == name);
    let attempt_of = |process: &Span| {
        exported_span(|span| span.name == "handler" && span.parent_span_id == process.span_id)
    };
    wait_until("the send, process and attempt spans exported", || {
        named(&format!("{source} publish")).is_some()
            && named(&format!("{source} process"))
                .is_some_and(|process| attempt_of(&process).is_some())
    })
    .await;
    let send = named(&format!("{source} publish")).expect("send span");
    let process = named(&format!("{source} process")).expect("process span");
    assert_ne!(process.trace_id, send.trace_id, "a trace of its own");
    assert!(process.parent_span_id.is_empty(), "no parent");
    assert_eq!(process.links.len(), 1, "{:?}", process.links);
    assert_eq!(process.links[0].trace_id, send.trace_id);
    assert_eq!(process.links[0].span_id, send.span_id, "linked to the send");
    let attempt = attempt_of(&process).expect("attempt span");
    assert_eq!(attempt.trace_id, process.trace_id);
}
