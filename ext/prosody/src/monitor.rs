//! Core events delivered to `Prosody.monitor` (`lib/prosody/monitor.rb`).
//!
//! Each client has a [`RubyObserver`]. The core calls it on its own threads; an
//! event waits in a channel (at most [`CAPACITY`]), and one bridge job at a time moves every
//! waiting event, as one Array, onto the monitor's Ruby queue, where the
//! monitor's own thread calls the subscribers. A slow subscriber therefore
//! delays other subscribers, never the consumer. Events beyond [`CAPACITY`]
//! waiting are dropped and counted (`Native.monitor_dropped`).
//!
//! Only the kinds someone subscribed to are built at all: the monitor sends the
//! subscribed names (`Native.monitor_wants`), kept here as one bit mask.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Sender};
use magnus::{function, prelude::*, Error, RArray, RModule, Ruby, Value};
use prosody::{Event, EventKind, Observer};

use crate::bridge::owned::RubyOwned;
use crate::bridge::{self, recoverable};

/// Events that may wait for the monitor's queue, per client.
const CAPACITY: usize = 65_536;

/// The subscribed kinds ([`EventKind::bit`]), shared by every client.
static WANTED: AtomicU32 = AtomicU32::new(0);

/// Events dropped because a client's channel was full.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// The monitor's `Thread::Queue`, once the monitor has started.
static QUEUE: Mutex<Option<RubyOwned>> = Mutex::new(None);

/// One client's events on their way to Ruby.
pub(crate) struct RubyObserver {
    sender: Sender<Event>,
    waiting: Arc<Waiting>,
}

// The channel is unbounded and counted rather than bounded: a bounded one
// allocates all of its CAPACITY slots up front (about 10 MB per client).

/// What a delivery job takes: the channel's other end and the client's labels.
struct Waiting {
    receiver: Receiver<Event>,
    /// Events in the channel, kept at most [`CAPACITY`].
    count: AtomicUsize,
    /// A bridge job is queued that will take what waits in the channel.
    scheduled: AtomicBool,
    /// Added to every event's payload.
    group: Option<String>,
    mode: &'static str,
}

impl RubyObserver {
    pub(crate) fn new(config: &prosody::Config) -> Arc<Self> {
        let (sender, receiver) = crossbeam_channel::unbounded();
        Arc::new(Self {
            sender,
            waiting: Arc::new(Waiting {
                receiver,
                count: AtomicUsize::new(0),
                scheduled: AtomicBool::new(false),
                group: config.group_id().map(str::to_owned),
                mode: match config.mode() {
                    prosody::Mode::Pipeline => "pipeline",
                    prosody::Mode::LowLatency => "low_latency",
                    _ => "best_effort",
                },
            }),
        })
    }
}

impl Observer for RubyObserver {
    fn wants(&self, kind: EventKind) -> bool {
        WANTED.load(Ordering::Relaxed) & kind.bit() != 0
    }

    fn observe(&self, event: Event) {
        if self.waiting.count.fetch_add(1, Ordering::AcqRel) >= CAPACITY
            || self.sender.send(event).is_err()
        {
            self.waiting.count.fetch_sub(1, Ordering::AcqRel);
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if !self.waiting.scheduled.swap(true, Ordering::AcqRel) {
            let waiting = Arc::clone(&self.waiting);
            if !bridge::run(move |ruby| waiting.deliver(ruby)) {
                // No bridge (the process is exiting): a later event tries again.
                self.waiting.scheduled.store(false, Ordering::Release);
            }
        }
    }
}

impl Waiting {
    /// Moves every waiting event onto the monitor's queue as one Array.
    fn deliver(&self, ruby: &Ruby) {
        // Cleared first: an event sent from now on schedules another job.
        self.scheduled.store(false, Ordering::Release);
        let batch = ruby.ary_new();
        for event in self.receiver.try_iter() {
            self.count.fetch_sub(1, Ordering::AcqRel);
            if let Some(entry) = self.entry(ruby, &event) {
                let _ = batch.push(entry);
            }
        }
        let queue = lock(&QUEUE).as_ref().map(|queue| queue.get(ruby));
        let (Some(queue), false) = (queue, batch.is_empty()) else {
            return;
        };
        if let Err(error) = queue.funcall::<_, _, Value>("push", (batch,)) {
            if let Some(error) = recoverable(ruby, error) {
                eprintln!("prosody: cannot pass events to Prosody.monitor: {error}");
            }
        }
    }

    /// `[name, payload]` for one event; `None` if Ruby refused to build it.
    fn entry(&self, ruby: &Ruby, event: &Event) -> Option<RArray> {
        let payload = ruby.hash_new();
        let set = |name: &str, value: Value| payload.aset(ruby.to_symbol(name), value).ok();
        set("topic", ruby.str_new(&event.topic).as_value());
        if let Some(partition) = event.partition {
            set(
                "partition",
                ruby.integer_from_i64(i64::from(partition)).as_value(),
            );
        }
        if let Some(offset) = event.offset {
            set("offset", ruby.integer_from_i64(offset).as_value());
        }
        if let Some(key) = &event.key {
            set("key", ruby.str_new(key).as_value());
        }
        if let Some(duration) = event.duration {
            set(
                "duration",
                ruby.float_from_f64(duration.as_secs_f64()).as_value(),
            );
        }
        if let Some(attempts) = event.attempts {
            set(
                "attempts",
                ruby.integer_from_i64(i64::from(attempts)).as_value(),
            );
        }
        if let Some(reason) = event.reason {
            set("reason", ruby.str_new(reason).as_value());
        }
        if let Some(class) = &event.error_class {
            set("error_class", ruby.str_new(class).as_value());
        }
        if let Some(message) = &event.error_message {
            set("error_message", ruby.str_new(message).as_value());
        }
        if let Some(group) = &self.group {
            set("group_id", ruby.str_new(group).as_value());
        }
        set("mode", ruby.to_symbol(self.mode).as_value());
        let entry = ruby.ary_new_capa(2);
        entry.push(ruby.str_new(event.kind.name())).ok()?;
        entry.push(payload).ok()?;
        Some(entry)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Sets the kinds to build, by name; an unknown name is an `ArgumentError`.
fn monitor_wants(ruby: &Ruby, names: Vec<String>) -> Result<(), Error> {
    let mut mask = 0;
    for name in &names {
        let kind = EventKind::from_name(name).ok_or_else(|| {
            Error::new(
                ruby.exception_arg_error(),
                format!("unknown native event `{name}`"),
            )
        })?;
        mask |= kind.bit();
    }
    WANTED.store(mask, Ordering::Relaxed);
    Ok(())
}

/// Where events go from now on (the monitor's `Thread::Queue`).
fn monitor_queue(ruby: &Ruby, queue: Value) {
    *lock(&QUEUE) = Some(RubyOwned::new(ruby, queue));
}

/// The names of the events the core sends.
fn monitor_events() -> Vec<&'static str> {
    EventKind::ALL.iter().map(|kind| kind.name()).collect()
}

/// Events dropped because the monitor fell behind.
fn monitor_dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

pub(crate) fn init(_ruby: &Ruby, native: RModule) -> Result<(), Error> {
    native.define_singleton_method("monitor_wants", function!(monitor_wants, 1))?;
    native.define_singleton_method("monitor_queue=", function!(monitor_queue, 1))?;
    native.define_singleton_method("monitor_events", function!(monitor_events, 0))?;
    native.define_singleton_method("monitor_dropped", function!(monitor_dropped, 0))?;
    Ok(())
}
