//! OpenTelemetry: a send's producer span is the parent of the consumer's span
//! for that message (through the `traceparent` header), each handler attempt is
//! a child of that, and a send from the handler continues the same trace. The
//! spans are exported over OTLP/HTTP to a receiver in this test, decoded with
//! `opentelemetry-proto`.
//!
//! Tracing is set up once per process from the environment, so this file holds
//! one test and sets the variables before anything else runs.

mod support;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prosody::{Client, Context, Message};
use prost::Message as _;
use serde_json::json;
use support::{client, config, topic, unique, wait_until, FnHandler};

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
    let (endpoint, spans) = otlp_receiver();
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint);
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
    std::env::set_var("OTEL_SERVICE_NAME", "prosody-traces-test");
    assert!(prosody::traces::enabled());

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
    let named = |name: &str| {
        support::lock(&spans)
            .iter()
            .find(|span| span.name == name)
            .cloned()
    };
    wait_until("four spans exported", || {
        named(&format!("{source} publish")).is_some()
            && named(&format!("{source} process")).is_some()
            && named("handler").is_some()
            && named(&format!("{replies} publish")).is_some()
    })
    .await;

    let send = named(&format!("{source} publish")).expect("send span");
    let process = named(&format!("{source} process")).expect("process span");
    let attempt = named("handler").expect("attempt span");
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
