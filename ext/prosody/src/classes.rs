//! Ruby classes the native code uses, resolved once when the extension loads
//! instead of by name on every message or error, and the one frozen empty Hash
//! that every message without headers shares.
//!
//! lib/prosody.rb requires the Ruby files that define them (errors, Message,
//! Timer, Context, Logging) before the extension. Each class is registered as a mark
//! object, so the GC neither frees nor moves it.

use std::sync::OnceLock;

use magnus::value::{InnerValue, Opaque};
use magnus::{exception::ExceptionClass, prelude::*, Error, RClass, RHash, RModule, Ruby};

use crate::errors::Kind;

struct Classes {
    prosody: Opaque<RModule>,
    message: Opaque<RClass>,
    timer: Opaque<RClass>,
    context: Opaque<RClass>,
    permanent_error: Opaque<ExceptionClass>,
    /// A frozen empty Hash: the headers of every message that has none.
    empty_headers: Opaque<RHash>,
    errors: Vec<(Kind, Opaque<ExceptionClass>)>,
}

static CLASSES: OnceLock<Classes> = OnceLock::new();

fn classes() -> &'static Classes {
    match CLASSES.get() {
        Some(classes) => classes,
        // `init` runs before any method that could get here is defined.
        None => unreachable!("prosody: Ruby classes used before the extension loaded"),
    }
}

/// Resolves every class; the first thing the extension's init does.
pub(crate) fn init(ruby: &Ruby) -> Result<(), Error> {
    let prosody: RModule = ruby.class_object().const_get("Prosody")?;
    let message: RClass = prosody.const_get("Message")?;
    let timer: RClass = prosody.const_get("Timer")?;
    let context: RClass = prosody.const_get("Context")?;
    let permanent_error: ExceptionClass = prosody.const_get("PermanentError")?;
    let mut errors = Vec::with_capacity(Kind::ALL.len());
    for kind in Kind::ALL {
        let class: ExceptionClass = prosody.const_get(kind.class_name())?;
        magnus::gc::register_mark_object(class);
        errors.push((kind, Opaque::from(class)));
    }
    for value in [
        prosody.as_value(),
        message.as_value(),
        timer.as_value(),
        context.as_value(),
    ] {
        magnus::gc::register_mark_object(value);
    }
    magnus::gc::register_mark_object(permanent_error);
    let empty_headers = ruby.hash_new();
    empty_headers.freeze();
    magnus::gc::register_mark_object(empty_headers);
    let _ = CLASSES.set(Classes {
        prosody: Opaque::from(prosody),
        message: Opaque::from(message),
        timer: Opaque::from(timer),
        context: Opaque::from(context),
        permanent_error: Opaque::from(permanent_error),
        empty_headers: Opaque::from(empty_headers),
        errors,
    });
    Ok(())
}

/// `Prosody`.
pub(crate) fn prosody(ruby: &Ruby) -> RModule {
    classes().prosody.get_inner_with(ruby)
}

/// `Prosody::Message`.
pub(crate) fn message(ruby: &Ruby) -> RClass {
    classes().message.get_inner_with(ruby)
}

/// `Prosody::Timer`.
pub(crate) fn timer(ruby: &Ruby) -> RClass {
    classes().timer.get_inner_with(ruby)
}

/// `Prosody::Context`.
pub(crate) fn context(ruby: &Ruby) -> RClass {
    classes().context.get_inner_with(ruby)
}

/// `Prosody::PermanentError`.
pub(crate) fn permanent_error(ruby: &Ruby) -> ExceptionClass {
    classes().permanent_error.get_inner_with(ruby)
}

/// The frozen empty Hash shared by every message without headers.
pub(crate) fn empty_headers(ruby: &Ruby) -> RHash {
    classes().empty_headers.get_inner_with(ruby)
}

/// The `Prosody::Error` subclass for `kind`.
pub(crate) fn error(ruby: &Ruby, kind: Kind) -> ExceptionClass {
    let found = classes()
        .errors
        .iter()
        .find(|(known, _)| *known == kind)
        .map(|(_, class)| class.get_inner_with(ruby));
    // Every kind is resolved in `init`.
    found.unwrap_or_else(|| ruby.exception_standard_error())
}
