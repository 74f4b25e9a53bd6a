//! OpenTelemetry traces, W3C trace context in message headers.
//!
//! A send opens a producer span and writes its `traceparent`/`tracestate` into the
//! message's headers; the consumer reads them back and opens a consumer span per
//! message (a child of the sender's span), with one child span per handler
//! attempt and one span per timer firing (linked to the span of the handler
//! attempt that scheduled the timer, or its child: `timer_spans`, the
//! `traceparent` stored with the timer). Handlers run inside their attempt's
//! context, so a send from a handler continues the trace, and Rust handlers'
//! own spans are its children.
//!
//! Spans are exported over OTLP/HTTP (protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT`
//! or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, configured by the standard
//! `OTEL_*` variables (`OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`).
//! Without an endpoint tracing is off: every hook is one check of a `OnceLock`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{
    Link, SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing::{info, warn};

use crate::config::SpanRelation;

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

/// The OTLP endpoint from the environment, read once; `None`: tracing is off.
static ENDPOINT: OnceLock<Option<String>> = OnceLock::new();
/// The fork generation the exporter was set up in, and the exporter (`None`
/// when it could not be built: tracing stays off, said once).
type Current = Option<(u64, Option<Arc<Tracing>>)>;
static TRACING: RwLock<Current> = RwLock::new(None);
/// Bumped in a forked child, whose copy of the exporter has no thread behind it.
static FORKS: AtomicU64 = AtomicU64::new(0);

/// The process's tracer, set up from the environment on first use (again in a
/// forked child); `None` when off.
fn tracing() -> Option<Arc<Tracing>> {
    let endpoint = ENDPOINT
        .get_or_init(|| {
            ENDPOINT_VARIABLES
                .iter()
                .find_map(|name| std::env::var(name).ok().filter(|value| !value.is_empty()))
        })
        .as_deref()?;
    let generation = FORKS.load(Ordering::Acquire);
    if let Some((made_in, tracing)) = &*TRACING.read().unwrap_or_else(PoisonError::into_inner) {
        if *made_in == generation {
            return tracing.clone();
        }
    }
    let mut current = TRACING.write().unwrap_or_else(PoisonError::into_inner);
    match current.take() {
        Some((made_in, tracing)) if made_in == generation => {
            *current = Some((made_in, tracing.clone()));
            return tracing;
        }
        // The parent's exporter: its batch thread stayed in the parent, and
        // dropping it would wait for that thread to shut down. Leak it.
        Some(stale) => std::mem::forget(stale),
        None => {}
    }
    let tracing = start(endpoint).map(Arc::new);
    *current = Some((generation, tracing.clone()));
    tracing
}

/// Whether spans are recorded and exported in this process.
pub fn enabled() -> bool {
    tracing().is_some()
}

/// Call in a forked child (e.g. from a `pthread_atfork` child handler; it only
/// stores an atomic): the next span starts a new exporter, since the parent's
/// has no thread in the child.
pub fn forget_after_fork() {
    FORKS.fetch_add(1, Ordering::AcqRel);
}

fn start(endpoint: &str) -> Option<Tracing> {
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

/// The consumer span of one message: the sender's span is its parent
/// (`message_spans: child`), or only linked, the span starting a trace of its
/// own (`follows_from`). `None` when tracing is off.
pub(crate) fn process_span(
    position: &Position<'_>,
    headers: &[crate::message::Header],
    relation: SpanRelation,
) -> Option<Context> {
    let tracing = tracing()?;
    let pairs: Vec<(&str, &str)> = headers
        .iter()
        .filter_map(|(name, value)| {
            let value = std::str::from_utf8(value.as_deref()?).ok()?;
            Some((name.as_str(), value))
        })
        .collect();
    let sender = extract(&pairs);
    let (parent, links) = match relation {
        SpanRelation::Child => (sender, Vec::new()),
        SpanRelation::FollowsFrom => {
            let sent = sender.span().span_context().clone();
            let links = if sent.is_valid() {
                vec![Link::with_context(sent)]
            } else {
                Vec::new()
            };
            (Context::new(), links)
        }
    };
    let span = tracing
        .tracer
        .span_builder(format!("{} process", position.topic))
        .with_links(links)
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

/// A timer firing's span. `scheduled_by` is the `traceparent` stored with the
/// timer, naming the span of the handler call that scheduled it: the timer's
/// span is that span's child (`timer_spans: child`), or starts a trace of its
/// own linked to it (`follows_from`). Without one, or when it does not parse,
/// the span starts a trace of its own, unlinked. `None` when tracing is off.
pub(crate) fn timer_span(
    topic: &str,
    partition: i32,
    key: &str,
    scheduled_by: Option<&str>,
    relation: SpanRelation,
) -> Option<Context> {
    let tracing = tracing()?;
    let scheduler = scheduled_by.and_then(remote_span);
    let (parent, links) = match (scheduler, relation) {
        (Some(scheduler), SpanRelation::Child) => (scheduler, Vec::new()),
        (Some(scheduler), SpanRelation::FollowsFrom) => {
            let scheduled = scheduler.span().span_context().clone();
            (Context::new(), vec![Link::with_context(scheduled)])
        }
        (None, _) => (Context::new(), Vec::new()),
    };
    let span = tracing
        .tracer
        .span_builder(format!("{topic} timer"))
        .with_kind(SpanKind::Internal)
        .with_links(links)
        .with_attributes([
            KeyValue::new("messaging.destination.name", topic.to_owned()),
            KeyValue::new("messaging.destination.partition.id", partition.to_string()),
            KeyValue::new("messaging.kafka.message.key", key.to_owned()),
        ])
        .start_with_context(&tracing.tracer, &parent);
    Some(parent.with_span(span))
}

/// A context holding the remote span a stored `traceparent` names; `None` when
/// it does not parse (it came from a database: never trusted to be well formed).
fn remote_span(traceparent: &str) -> Option<Context> {
    let headers = [(TRACEPARENT_HEADER, traceparent)];
    let context = TraceContextPropagator::new()
        .extract_with_context(&Context::new(), &HeaderReader(&headers));
    context.span().span_context().is_valid().then_some(context)
}

/// One handler attempt's span, a child of the current (message or timer) span.
/// A retry links to `first`, the span of the message's first attempt.
pub(crate) fn attempt_span(
    handler: &str,
    attempt: u32,
    first: Option<&Context>,
) -> Option<Context> {
    let tracing = tracing()?;
    let parent = Context::current();
    if !parent.has_active_span() {
        return None;
    }
    let mut builder = tracing
        .tracer
        .span_builder(handler.to_owned())
        .with_kind(SpanKind::Internal)
        .with_attributes([KeyValue::new("prosody.attempt", i64::from(attempt))]);
    if let Some(first) = first.filter(|first| first.has_active_span()) {
        let first = first.span().span_context().clone();
        builder = builder.with_links(vec![Link::with_context(first)]);
    }
    let span = builder.start_with_context(&tracing.tracer, &parent);
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

/// The `traceparent` of the current span (a handler attempt's, while it is
/// polled); `None` when tracing is off or no span is current.
pub(crate) fn current_traceparent() -> Option<String> {
    tracing()?;
    let current = Context::current();
    if current.has_active_span() {
        traceparent(&current)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_traceparent_names_its_span_or_is_ignored() {
        let span = remote_span("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .expect("a well-formed traceparent");
        let span = span.span().span_context().clone();
        assert_eq!(
            span.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(span.span_id().to_string(), "b7ad6b7169203331");
        assert!(span.is_remote());
        for malformed in [
            "",
            "garbage",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "zz-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b71692033é1-01",
        ] {
            assert!(remote_span(malformed).is_none(), "{malformed:?}");
        }
    }
}
