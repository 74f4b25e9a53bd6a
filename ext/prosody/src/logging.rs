//! Native logs (tracing events, librdkafka logs) delivered to `Prosody.logger`.
//!
//! Events can fire on any thread, so they are formatted where they happen and
//! delivered by a bridge job that calls `Prosody.log_native(severity, message, fields)`,
//! which passes them to `Prosody.logger` with progname `prosody`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};

use magnus::{function, prelude::*, Error, RModule, Ruby, Value};
use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::Registry;

use crate::bridge;

/// Ruby Logger severities: DEBUG 0, INFO 1, WARN 2, ERROR 3.
static MIN_SEVERITY: AtomicU8 = AtomicU8::new(1);

fn severity(level: &Level) -> u8 {
    match *level {
        Level::TRACE | Level::DEBUG => 0,
        Level::INFO => 1,
        Level::WARN => 2,
        Level::ERROR => 3,
    }
}

struct RubyLogger;

impl<S: Subscriber> Layer<S> for RubyLogger {
    fn register_callsite(&self, _metadata: &'static Metadata<'static>) -> Interest {
        // The level can change at run time, so ask `enabled` every time.
        Interest::sometimes()
    }

    fn enabled(&self, metadata: &Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        severity(metadata.level()) >= MIN_SEVERITY.load(Ordering::Relaxed)
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut line = Line::default();
        event.record(&mut line);
        let severity = severity(event.metadata().level());
        bridge::run(move |ruby| deliver(ruby, severity, line));
    }
}

/// `Prosody.log_native(severity, message, fields)`: the Ruby side tags the line
/// with its fields (see `Prosody::LogLine`) and hands it to `Prosody.logger`.
fn deliver(ruby: &Ruby, severity: u8, line: Line) {
    let Line { message, fields } = line;
    let delivered = crate::classes::prosody(ruby)
        .funcall::<_, _, Value>("log_native", (severity, message.as_str(), fields.clone()));
    if let Err(error) = delivered {
        // Interrupted (the process is exiting): let the bridge thread end.
        if bridge::recoverable(ruby, error).is_some() {
            // The logger itself failed; stderr is the last place left to say anything.
            let fields: Vec<String> = fields
                .iter()
                .map(|(name, value)| format!("{name}={value}"))
                .collect();
            eprintln!("prosody: {message} ({})", fields.join(", "));
        }
    }
}

#[derive(Default)]
struct Line {
    message: String,
    /// Each field's name and value, in the order the event gave them.
    fields: Vec<(&'static str, String)>,
}

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.fields.push((field.name(), value.to_owned()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.fields.push((field.name(), format!("{value:?}")));
        }
    }
}

fn set_log_level(severity: i64) {
    MIN_SEVERITY.store(
        u8::try_from(severity.clamp(0, 5)).unwrap_or(1),
        Ordering::Relaxed,
    );
}

pub(crate) fn init(_ruby: &Ruby, native: RModule) -> Result<(), Error> {
    // Another library may own the global subscriber; then native logs go there.
    let _ = tracing::subscriber::set_global_default(Registry::default().with(RubyLogger));
    native.define_singleton_method("log_level=", function!(set_log_level, 1))?;
    Ok(())
}
