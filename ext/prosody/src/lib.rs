//! The native half of the `prosody` gem: conversion, threading and error mapping
//! around the `prosody` core crate. No Kafka logic lives here.
//!
//! # Layout
//! - `bridge`: the Ruby-thread executor (command queue + bridge thread) and `RubyOwned`.
//! - `classes`: the Ruby classes the native code uses, resolved once at load.
//! - `gvl`: the only place that releases the GVL.
//! - `process`: lazy start, fork handling, running work off the caller's stack.
//! - `runtime`: the process-wide tokio runtime.
//! - `reply`: results of off-thread work, pushed onto the Ruby caller's queue.
//! - `client`: `Prosody::Native::Client`.
//! - `handler`: `RubyHandler` (core handler → Ruby processor), `Native::Context`, `Native::Completion`.
//! - `convert`: Ruby ↔ JSON and option values.
//! - `errors`: Rust errors → `Prosody::Error` subclasses, in one place.
//! - `logging`: native logs → `Prosody.logger`.
//! - `mock`: mock-cluster helpers.
//! - `monitor`: core events → `Prosody.monitor`'s queue.

mod bridge;
mod classes;
mod client;
mod convert;
mod errors;
mod gvl;
mod handler;
mod logging;
mod mock;
mod monitor;
mod process;
mod reply;
mod runtime;

/// Holds the entry point Ruby calls on `require`; the macro's exported
/// `Init_prosody_native` carries no docs, hence the allowance on this module only.
#[allow(missing_docs)]
mod entry {
    use magnus::{prelude::*, Error, Ruby};

    use crate::{classes, client, handler, logging, mock, monitor, process};

    /// Defines `Prosody::Native` when Ruby loads the extension.
    #[magnus::init(name = "prosody_native")]
    fn init(ruby: &Ruby) -> Result<(), Error> {
        classes::init(ruby)?;
        process::init(ruby)?;
        let prosody = ruby.define_module("Prosody")?;
        let native = prosody.define_module("Native")?;
        logging::init(ruby, native)?;
        client::init(ruby, native)?;
        handler::init(ruby, native)?;
        mock::init(ruby, native)?;
        monitor::init(ruby, native)?;
        Ok(())
    }
}
