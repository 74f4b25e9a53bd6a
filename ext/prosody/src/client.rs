//! `Prosody::Native::Client`: the Ruby face of `prosody::Client`.
//!
//! Methods that talk to Kafka never run it on the caller's stack (which may be a
//! small fiber stack): they convert their arguments, hand the work to a tokio
//! task, and return; the task pushes its result onto the caller's Thread::Queue
//! through the bridge, and the Ruby side pops it (yielding its fiber under Async).

use std::sync::Arc;

use magnus::{function, method, prelude::*, Error, RArray, RHash, RModule, Ruby, Symbol, Value};
use prosody::{Config, ConsumerState};

use crate::bridge::owned::RubyOwned;
use crate::convert;
use crate::errors::from_core;
use crate::handler::RubyHandler;
use crate::process::{ensure_started, off_ruby_stack};
use crate::reply::{answer_later, reply};
use crate::runtime::runtime;

#[magnus::wrap(class = "Prosody::Native::Client", free_immediately, size)]
pub(crate) struct NativeClient {
    inner: Option<Arc<prosody::Client>>,
}

impl Drop for NativeClient {
    fn drop(&mut self) {
        // Dropping a client flushes and joins librdkafka threads; never do that
        // inside Ruby's garbage collector.
        if let Some(inner) = self.inner.take() {
            let _ = std::thread::Builder::new()
                .name("prosody-drop".to_owned())
                .spawn(move || drop(inner));
        }
    }
}

impl NativeClient {
    fn new(ruby: &Ruby, options: RHash) -> Result<Self, Error> {
        ensure_started(ruby)?;
        let mut builder = Config::builder();
        for (name, value) in convert::options(ruby, options)? {
            builder = builder
                .set(&name, value)
                .map_err(|error| from_core(ruby, &error))?;
        }
        let config = builder.build().map_err(|error| from_core(ruby, &error))?;
        let client = off_ruby_stack(ruby, move || {
            let _entered = runtime().enter();
            prosody::Client::new(config)
        })?
        .map_err(|error| from_core(ruby, &error))?;
        Ok(Self {
            inner: Some(Arc::new(client)),
        })
    }

    fn client(&self) -> Arc<prosody::Client> {
        match &self.inner {
            Some(inner) => Arc::clone(inner),
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
        ensure_started(ruby)?;
        let topic = convert::text_argument(ruby, topic, "topic")?;
        let key = convert::text_argument(ruby, key, "key")?;
        let payload = convert::to_json(ruby, payload)?;
        let headers = convert::headers(ruby, headers)?;
        let client = rb_self.client();
        answer_later(ruby, queue, true, async move {
            client.send(&topic, &key, &payload, &headers).await
        });
        Ok(())
    }

    fn subscribe(ruby: &Ruby, rb_self: &Self, processor: Value, queue: Value) -> Result<(), Error> {
        ensure_started(ruby)?;
        let handler = RubyHandler::new(RubyOwned::new(ruby, processor));
        let queue = RubyOwned::new(ruby, queue);
        let client = rb_self.client();
        runtime().spawn_blocking(move || {
            let _entered = runtime().enter();
            reply(queue, client.subscribe(handler), false);
        });
        Ok(())
    }

    fn unsubscribe(ruby: &Ruby, rb_self: &Self, queue: Value) -> Result<(), Error> {
        ensure_started(ruby)?;
        let client = rb_self.client();
        answer_later(
            ruby,
            queue,
            false,
            async move { client.unsubscribe().await },
        );
        Ok(())
    }

    fn consumer_state(ruby: &Ruby, rb_self: &Self) -> Symbol {
        let name = match rb_self.client().consumer_state() {
            ConsumerState::Unconfigured => "unconfigured",
            ConsumerState::Configured => "configured",
            ConsumerState::Running => "running",
        };
        ruby.to_symbol(name)
    }

    fn assigned_partitions(&self) -> usize {
        self.client().assigned_partitions()
    }

    fn is_stalled(&self) -> bool {
        self.client().is_stalled()
    }

    /// The probe server's port while subscribed, else nil.
    fn probe_port(&self) -> Option<u16> {
        self.client().probe_address().map(|address| address.port())
    }

    fn source_system(&self) -> String {
        self.client().source_system().to_owned()
    }

    /// Messages skipped by the filters: `{own_messages:, event_type:, duplicates:}`.
    fn skip_counts(ruby: &Ruby, rb_self: &Self) -> Result<RHash, Error> {
        let counts = rb_self.client().skip_counts();
        let hash = ruby.hash_new();
        hash.aset(ruby.to_symbol("own_messages"), counts.own_messages)?;
        hash.aset(ruby.to_symbol("event_type"), counts.event_type)?;
        hash.aset(ruby.to_symbol("duplicates"), counts.duplicates)?;
        Ok(hash)
    }

    fn partition_stats(ruby: &Ruby, rb_self: &Self) -> Result<RArray, Error> {
        let stats = rb_self.client().partition_stats();
        let list = ruby.ary_new_capa(stats.len());
        for entry in stats {
            let hash = ruby.hash_new();
            hash.aset(ruby.to_symbol("topic"), entry.topic)?;
            hash.aset(ruby.to_symbol("partition"), entry.partition)?;
            hash.aset(ruby.to_symbol("buffered"), entry.buffered)?;
            hash.aset(ruby.to_symbol("max_buffered"), entry.max_buffered)?;
            hash.aset(ruby.to_symbol("paused"), entry.paused)?;
            hash.aset(ruby.to_symbol("pauses"), entry.pauses)?;
            hash.aset(ruby.to_symbol("resumes"), entry.resumes)?;
            hash.aset(ruby.to_symbol("finished"), entry.finished)?;
            list.push(hash)?;
        }
        Ok(list)
    }
}

/// Every option the core accepts, so the Ruby configuration cannot drift from it.
fn option_names() -> Vec<&'static str> {
    prosody::config::OPTION_NAMES.to_vec()
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
    native.define_singleton_method("option_names", function!(option_names, 0))?;
    Ok(())
}
