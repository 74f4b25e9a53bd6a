//! OpenTelemetry traces, W3C trace context in message headers.
//!
//! A send opens a producer span and writes its `traceparent`/`tracestate` into the
//! message's headers; the consumer reads them back and opens a consumer span per
//! message (a child of the sender's span), with one child span per handler
//! attempt and one span per timer firing. Handlers run inside their attempt's
//! context, so a send from a handler continues the trace, and Rust handlers'
//! own spans are its children.
//!
//! Spans are exported over OTLP/HTTP (protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT`
//! or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, configured by the standard
//! `OTEL_*` variables (`OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`).
//! Without an endpoint tracing is off: every hook is one check of a `OnceLock`.

use std::sync::OnceLock;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{
    SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing::{info, warn};

/// The W3C header carrying the trace and parent span ids.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// The W3C header carrying vendor trace state.
pub const TRACESTATE_HEADER: &str = "tracestate";

const ENDPOINT_VARIABLES: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

static TRACING: OnceLock<Option<Tracing>> = OnceLock::new();

/// The process's tracer, set up from the environment on first use; `None` when off.
fn tracing() -> Option<&'static Tracing> {
    TRACING.get_or_init(start).as_ref()
}

/// Whether spans are recorded and exported in this process.
pub fn enabled() -> bool {
    tracing().is_some()
}

fn start() -> Option<Tracing> {
    let endpoint = ENDPOINT_VARIABLES
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|value| !value.is_empty()))?;
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(exporter) => exporter,
        Err(error) => {
            warn!(endpoint, "cannot export traces; tracing is off: {error}");
            return None;
        }
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .build();
    let tracer = provider.tracer("prosody");
    info!(endpoint, "exporting traces over OTLP/HTTP");
    Some(Tracing { provider, tracer })
}

/// Exports the spans that have ended so far; waits at most the exporter's timeout.
/// Call before a process exits so its last spans are not lost.
pub fn flush() {
    if let Some(tracing) = tracing() {
        if let Err(error) = tracing.provider.force_flush() {
            warn!("cannot export traces: {error}");
        }
    }
}

/// Reads trace context from message headers.
struct HeaderReader<'a>(&'a [(&'a str, &'a str)]);

impl Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(key))
            .map(|(_, value)| *value)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| *name).collect()
    }
}

/// Collects the trace context headers a propagator writes.
#[derive(Default)]
struct HeaderWriter(Vec<(String, String)>);

impl Injector for HeaderWriter {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_owned(), value));
    }
}

/// The trace context the headers carry (the current context when they carry none).
fn extract(headers: &[(&str, &str)]) -> Context {
    TraceContextPropagator::new().extract(&HeaderReader(headers))
}

/// `traceparent` (and `tracestate`) of `context`'s span.
fn inject(context: &Context) -> Vec<(String, String)> {
    let mut writer = HeaderWriter::default();
    TraceContextPropagator::new().inject_context(context, &mut writer);
    writer.0
}

/// A producer span for one send, and the headers that carry it.
pub(crate) struct SendSpan {
    context: Context,
    /// Trace context headers to write (replacing any the caller gave).
    pub(crate) headers: Vec<(String, String)>,
}

impl SendSpan {
    /// Opens the span: a child of the trace context in `headers` when the caller
    /// passed one (a Ruby handler continuing its message's trace), else of the
    /// current context. `None` when tracing is off.
    pub(crate) fn start(topic: &str, key: &str, headers: &[(String, String)]) -> Option<Self> {
        let tracing = tracing()?;
        let given: Vec<(&str, &str)> = headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        let parent = if HeaderReader(&given).get(TRACEPARENT_HEADER).is_some() {
            extract(&given)
        } else {
            Context::current()
        };
        let span = tracing
            .tracer
            .span_builder(format!("{topic} publish"))
            .with_kind(SpanKind::Producer)
            .with_attributes([
                KeyValue::new("messaging.system", "kafka"),
                KeyValue::new("messaging.operation.type", "publish"),
                KeyValue::new("messaging.destination.name", topic.to_owned()),
                KeyValue::new("messaging.kafka.message.key", key.to_owned()),
            ])
            .start_with_context(&tracing.tracer, &parent);
        let context = parent.with_span(span);
        let headers = inject(&context);
        Some(Self { context, headers })
    }

    /// Ends the span, marked failed when the send failed.
    pub(crate) fn end(self, failure: Option<&str>) {
        let span = self.context.span();
        if let Some(failure) = failure {
            span.set_status(Status::error(failure.to_owned()));
        }
        span.end();
    }
}

/// Where a message sits, for span attributes.
pub(crate) struct Position<'a> {
    pub(crate) topic: &'a str,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: &'a str,
    pub(crate) group: &'a str,
}

/// The consumer span of one message: the sender's span is its parent.
/// `None` when tracing is off.
pub(crate) fn process_span(
    position: &Position<'_>,
    headers: &[crate::message::Header],
) -> Option<Context> {
    let tracing = tracing()?;
    let pairs: Vec<(&str, &str)> = headers
        .iter()
        .filter_map(|(name, value)| {
            let value = std::str::from_utf8(value.as_deref()?).ok()?;
            Some((name.as_str(), value))
        })
        .collect();
    let parent = extract(&pairs);
    let span = tracing
        .tracer
        .span_builder(format!("{} process", position.topic))
        .with_kind(SpanKind::Consumer)
        .with_attributes([
            KeyValue::new("messaging.system", "kafka"),
            KeyValue::new("messaging.operation.type", "process"),
            KeyValue::new("messaging.destination.name", position.topic.to_owned()),
            KeyValue::new(
                "messaging.destination.partition.id",
                position.partition.to_string(),
            ),
            KeyValue::new("messaging.kafka.offset", position.offset),
            KeyValue::new("messaging.kafka.message.key", position.key.to_owned()),
            KeyValue::new("messaging.consumer.group.name", position.group.to_owned()),
        ])
        .start_with_context(&tracing.tracer, &parent);
    Some(parent.with_span(span))
}

/// A timer firing's span (no parent: timers start their own trace).
pub(crate) fn timer_span(topic: &str, partition: i32, key: &str) -> Option<Context> {
    let tracing = tracing()?;
    let span = tracing
        .tracer
        .span_builder(format!("{topic} timer"))
        .with_kind(SpanKind::Internal)
        .with_attributes([
            KeyValue::new("messaging.destination.name", topic.to_owned()),
            KeyValue::new("messaging.destination.partition.id", partition.to_string()),
            KeyValue::new("messaging.kafka.message.key", key.to_owned()),
        ])
        .start_with_context(&tracing.tracer, &Context::new());
    Some(Context::new().with_span(span))
}

/// One handler attempt's span, a child of the current (message or timer) span.
pub(crate) fn attempt_span(handler: &str, attempt: u32) -> Option<Context> {
    let tracing = tracing()?;
    let parent = Context::current();
    if !parent.has_active_span() {
        return None;
    }
    let span = tracing
        .tracer
        .span_builder(handler.to_owned())
        .with_kind(SpanKind::Internal)
        .with_attributes([KeyValue::new("prosody.attempt", i64::from(attempt))])
        .start_with_context(&tracing.tracer, &parent);
    Some(parent.with_span(span))
}

/// Ends the span of `context`, marked failed with `failure` if given.
pub(crate) fn end(context: &Context, failure: Option<&str>) {
    let span = context.span();
    if let Some(failure) = failure {
        span.set_status(Status::error(failure.to_owned()));
    }
    span.end();
}

/// The `traceparent` of `context`'s span, for a handler to continue the trace.
pub(crate) fn traceparent(context: &Context) -> Option<String> {
    inject(context)
        .into_iter()
        .find(|(name, _)| name == TRACEPARENT_HEADER)
        .map(|(_, value)| value)
}
