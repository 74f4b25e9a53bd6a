//! `Prosody::Native::Client`: the Ruby face of `prosody::Client`.
//!
//! Methods that talk to Kafka never run it on the caller's stack (which may be a
//! small fiber stack): they convert their arguments, hand the work to a tokio
//! task, and return; the task pushes its result onto the caller's Thread::Queue
//! through the bridge, and the Ruby side pops it (yielding its fiber under Async).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use magnus::{function, method, prelude::*, Error, RArray, RHash, RModule, Ruby, Symbol, Value};
use prosody::{Config, ConsumerState};

use crate::bridge::owned::RubyOwned;
use crate::convert;
use crate::errors::{self, from_core};
use crate::handler::RubyHandler;
use crate::monitor::RubyObserver;
use crate::process::{check_same_process, ensure_started, generation, off_ruby_stack};
use crate::reply::{answer_later, reply};
use crate::runtime::{self, runtime, RuntimeError};

#[magnus::wrap(class = "Prosody::Native::Client", free_immediately, size)]
pub(crate) struct NativeClient {
    inner: Option<Arc<prosody::Client>>,
    /// The process generation this client was made in (see `process`).
    generation: u64,
    /// Whether the current subscription's Ruby processor can still run handlers.
    processor_alive: Mutex<Option<Arc<AtomicBool>>>,
}

impl Drop for NativeClient {
    fn drop(&mut self) {
        // Dropping a client flushes and joins librdkafka threads; never do that
        // inside Ruby's garbage collector.
        if let Some(inner) = self.inner.take() {
            if self.generation != generation() {
                // Made before a fork: its librdkafka threads live in the parent,
                // and dropping it here would wait for them forever.
                std::mem::forget(inner);
                return;
            }
            let _ = std::thread::Builder::new()
                .name("prosody-drop".to_owned())
                .spawn(move || drop(inner));
        }
    }
}

/// A bad `TOKIO_WORKER_THREADS` is the user's configuration; a runtime the OS
/// refused is the bridge's failure.
fn runtime_error(ruby: &Ruby, error: &RuntimeError) -> Error {
    let kind = match error {
        RuntimeError::WorkerThreads(_) => errors::Kind::Configuration,
        RuntimeError::Build(_) => errors::Kind::Bridge,
    };
    errors::error(ruby, kind, error.to_string())
}

impl NativeClient {
    fn new(ruby: &Ruby, options: RHash) -> Result<Self, Error> {
        ensure_started(ruby);
        let mut builder = Config::builder();
        for (name, value) in convert::options(ruby, options)? {
            builder = builder
                .set(&name, value)
                .map_err(|error| from_core(ruby, &error))?;
        }
        let config = builder.build().map_err(|error| from_core(ruby, &error))?;
        let observer = RubyObserver::new(&config);
        let client = off_ruby_stack(ruby, move || {
            let runtime = runtime::start()?;
            let _entered = runtime.enter();
            Ok(prosody::Client::new(config))
        })?
        .map_err(|error| runtime_error(ruby, &error))?
        .map_err(|error| from_core(ruby, &error))?;
        client.set_observer(observer);
        Ok(Self {
            inner: Some(Arc::new(client)),
            generation: generation(),
            processor_alive: Mutex::new(None),
        })
    }

    /// The core client, unless this client was made before the process forked.
    /// Also restarts the bridge if its thread was killed, since answers to the
    /// caller travel through it.
    fn client(&self, ruby: &Ruby) -> Result<Arc<prosody::Client>, Error> {
        check_same_process(ruby, self.generation, "Prosody::Client")?;
        ensure_started(ruby);
        match &self.inner {
            Some(inner) => Ok(Arc::clone(inner)),
            // `inner` is only taken in `drop`.
            None => unreachable!("client used after drop"),
        }
    }

    fn send_message(
        ruby: &Ruby,
        rb_self: &Self,
        topic: Value,
        key: Value,
        payload: Value,
        headers: Value,
        queue: Value,
    ) -> Result<(), Error> {
        let client = rb_self.client(ruby)?;
        let topic = convert::text_argument(ruby, topic, "topic")?;
        let key = convert::text_argument(ruby, key, "key")?;
        let payload = convert::to_json(ruby, payload)?;
        let headers = convert::headers(ruby, headers)?;
        answer_later(ruby, queue, true, async move {
            client.send(&topic, &key, &payload, &headers).await
        });
        Ok(())
    }

    fn subscribe(ruby: &Ruby, rb_self: &Self, processor: Value, queue: Value) -> Result<(), Error> {
        let client = rb_self.client(ruby)?;
        let alive = Arc::new(AtomicBool::new(true));
        *lock(&rb_self.processor_alive) = Some(Arc::clone(&alive));
        let handler = RubyHandler::new(ruby, processor, alive, client.config().max_concurrency())?;
        let queue = RubyOwned::new(ruby, queue);
        runtime().spawn_blocking(move || {
            let _entered = runtime().enter();
            reply(queue, client.subscribe(handler), false);
        });
        Ok(())
    }

    fn unsubscribe(ruby: &Ruby, rb_self: &Self, queue: Value) -> Result<(), Error> {
        let client = rb_self.client(ruby)?;
        answer_later(
            ruby,
            queue,
            false,
            async move { client.unsubscribe().await },
        );
        Ok(())
    }

    /// Called by the Ruby processor when its thread ended without being stopped:
    /// handlers can no longer run, so the consumer must report itself stalled.
    fn processor_died(&self) {
        if let Some(alive) = lock(&self.processor_alive).as_ref() {
            alive.store(false, Ordering::Release);
        }
    }

    fn consumer_state(ruby: &Ruby, rb_self: &Self) -> Result<Symbol, Error> {
        let name = match rb_self.client(ruby)?.consumer_state() {
            ConsumerState::Unconfigured => "unconfigured",
            ConsumerState::Configured => "configured",
            ConsumerState::Running => "running",
        };
        Ok(ruby.to_symbol(name))
    }

    fn assigned_partitions(ruby: &Ruby, rb_self: &Self) -> Result<usize, Error> {
        Ok(rb_self.client(ruby)?.assigned_partitions())
    }

    fn is_stalled(ruby: &Ruby, rb_self: &Self) -> Result<bool, Error> {
        Ok(rb_self.client(ruby)?.is_stalled())
    }

    /// The probe server's port while subscribed, else nil.
    fn probe_port(ruby: &Ruby, rb_self: &Self) -> Result<Option<u16>, Error> {
        Ok(rb_self
            .client(ruby)?
            .probe_address()
            .map(|address| address.port()))
    }

    fn source_system(ruby: &Ruby, rb_self: &Self) -> Result<String, Error> {
        Ok(rb_self.client(ruby)?.source_system().to_owned())
    }

    /// Messages skipped by the filters: `{own_messages:, event_type:, duplicates:}`.
    fn skip_counts(ruby: &Ruby, rb_self: &Self) -> Result<RHash, Error> {
        let counts = rb_self.client(ruby)?.skip_counts();
        let hash = ruby.hash_new();
        hash.aset(ruby.to_symbol("own_messages"), counts.own_messages)?;
        hash.aset(ruby.to_symbol("event_type"), counts.event_type)?;
        hash.aset(ruby.to_symbol("duplicates"), counts.duplicates)?;
        Ok(hash)
    }

    /// The fair scheduler: `{waiting:, waiting_retries:, max_waiting:, waited:,
    /// tracked_keys:, rejections:}`.
    fn qos_stats(ruby: &Ruby, rb_self: &Self) -> Result<RHash, Error> {
        let stats = rb_self.client(ruby)?.qos_stats();
        let hash = ruby.hash_new();
        hash.aset(ruby.to_symbol("waiting"), stats.waiting)?;
        hash.aset(ruby.to_symbol("waiting_retries"), stats.waiting_retries)?;
        hash.aset(ruby.to_symbol("max_waiting"), stats.max_waiting)?;
        hash.aset(ruby.to_symbol("waited"), stats.waited)?;
        hash.aset(ruby.to_symbol("tracked_keys"), stats.tracked_keys)?;
        hash.aset(ruby.to_symbol("rejections"), stats.rejections)?;
        Ok(hash)
    }

    fn partition_stats(ruby: &Ruby, rb_self: &Self) -> Result<RArray, Error> {
        let stats = rb_self.client(ruby)?.partition_stats();
        let list = ruby.ary_new_capa(stats.len());
        for entry in stats {
            let hash = ruby.hash_new();
            hash.aset(ruby.to_symbol("topic"), entry.topic)?;
            hash.aset(ruby.to_symbol("partition"), entry.partition)?;
            hash.aset(ruby.to_symbol("buffered"), entry.buffered)?;
            hash.aset(ruby.to_symbol("max_buffered"), entry.max_buffered)?;
            hash.aset(ruby.to_symbol("full"), entry.full)?;
            hash.aset(ruby.to_symbol("fills"), entry.fills)?;
            hash.aset(ruby.to_symbol("drains"), entry.drains)?;
            hash.aset(ruby.to_symbol("finished"), entry.finished)?;
            hash.aset(ruby.to_symbol("deferred_keys"), entry.deferred_keys)?;
            hash.aset(ruby.to_symbol("deferred_messages"), entry.deferred_messages)?;
            list.push(hash)?;
        }
        Ok(list)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Every option the core accepts, so the Ruby configuration cannot drift from it.
fn option_names() -> Vec<&'static str> {
    prosody::config::OPTION_NAMES.to_vec()
}

/// Every option with the kind of value it takes (the core's options table).
fn option_kinds() -> std::collections::HashMap<&'static str, &'static str> {
    prosody::config::OPTION_KINDS.iter().copied().collect()
}

/// Other names options answer to: alias => option.
fn option_aliases() -> std::collections::HashMap<&'static str, &'static str> {
    prosody::config::OPTION_ALIASES.iter().copied().collect()
}

/// The names a `choice` option accepts (empty for other options).
fn option_choices(option: String) -> Vec<&'static str> {
    prosody::config::choices(&option).unwrap_or_default()
}

/// The canonical spelling of a `choice` option's value, or `ConfigurationError`.
fn option_choice(ruby: &Ruby, option: String, text: String) -> Result<&'static str, Error> {
    prosody::config::choice(&option, &text).map_err(|error| from_core(ruby, &error))
}

/// Whether spans are exported (an OTLP endpoint is set in the environment).
fn tracing_enabled() -> bool {
    prosody::traces::enabled()
}

/// Exports the spans ended so far, off the caller's (possibly fiber) stack and
/// with the GVL released; at most the exporter's timeout.
fn flush_traces(ruby: &Ruby) -> Result<(), Error> {
    if prosody::traces::enabled() {
        off_ruby_stack(ruby, prosody::traces::flush)?;
    }
    Ok(())
}

pub(crate) fn init(ruby: &Ruby, native: RModule) -> Result<(), Error> {
    let class = native.define_class("Client", ruby.class_object())?;
    class.undef_default_alloc_func();
    class.define_singleton_method("new", function!(NativeClient::new, 1))?;
    class.define_method("send_message", method!(NativeClient::send_message, 5))?;
    class.define_method("subscribe", method!(NativeClient::subscribe, 2))?;
    class.define_method("unsubscribe", method!(NativeClient::unsubscribe, 1))?;
    class.define_method("consumer_state", method!(NativeClient::consumer_state, 0))?;
    class.define_method(
        "assigned_partitions",
        method!(NativeClient::assigned_partitions, 0),
    )?;
    class.define_method("source_system", method!(NativeClient::source_system, 0))?;
    class.define_method("stalled?", method!(NativeClient::is_stalled, 0))?;
    class.define_method("probe_port", method!(NativeClient::probe_port, 0))?;
    class.define_method("partition_stats", method!(NativeClient::partition_stats, 0))?;
    class.define_method("skip_counts", method!(NativeClient::skip_counts, 0))?;
    class.define_method("qos_stats", method!(NativeClient::qos_stats, 0))?;
    class.define_method("processor_died", method!(NativeClient::processor_died, 0))?;
    native.define_singleton_method("option_names", function!(option_names, 0))?;
    native.define_singleton_method("option_kinds", function!(option_kinds, 0))?;
    native.define_singleton_method("option_aliases", function!(option_aliases, 0))?;
    native.define_singleton_method("option_choices", function!(option_choices, 1))?;
    native.define_singleton_method("option_choice", function!(option_choice, 2))?;
    native.define_singleton_method("tracing?", function!(tracing_enabled, 0))?;
    native.define_singleton_method("flush_traces", function!(flush_traces, 0))?;
    Ok(())
}
