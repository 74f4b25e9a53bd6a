//! The Ruby-thread executor: Rust threads send closures, one Ruby thread runs them.
//!
//! Ruby may only be called from Ruby threads holding the GVL. Tokio workers and
//! librdkafka threads therefore never call Ruby; they send a [`Job`] down a
//! crossbeam channel to the bridge thread, a Ruby thread started on first use.
//! That thread waits for work with the GVL released, then takes the GVL once
//! and runs up to [`BATCH`] jobs before releasing it again.

pub(crate) mod owned;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use crossbeam_channel::{Receiver, Sender};
use magnus::{prelude::*, Error, Ruby};

use crate::gvl::without_gvl;

/// Jobs run per GVL acquisition before other Ruby threads get a turn.
const BATCH: usize = 256;

type Job = Box<dyn FnOnce(&Ruby) + Send + 'static>;

enum Command {
    Run(Job),
    /// Sent by Ruby's unblock callback: stop waiting and check interrupts.
    Wake,
}

struct Bridge {
    sender: Sender<Command>,
}

static BRIDGE: OnceLock<Bridge> = OnceLock::new();

/// Starts the bridge thread; call once at extension load, from a Ruby thread.
pub(crate) fn start(ruby: &Ruby) {
    let (sender, receiver) = crossbeam_channel::unbounded();
    if BRIDGE.set(Bridge { sender }).is_ok() {
        let thread = ruby.thread_create_from_fn(move |ruby| serve(ruby, &receiver));
        // The bridge thread is infrastructure: never report it and never keep the
        // process alive for it.
        let _ = thread.funcall::<_, _, magnus::Value>("name=", ("prosody-bridge",));
        let _ = thread.funcall::<_, _, magnus::Value>("report_on_exception=", (false,));
    }
}

/// Queues `job` to run on the bridge thread. Returns false when the bridge is
/// gone (process exiting): the job is then leaked, not dropped, because it may
/// hold Ruby values that must not be released off a Ruby thread.
pub(crate) fn run(job: impl FnOnce(&Ruby) + Send + 'static) -> bool {
    let command = Command::Run(Box::new(job));
    let unsent = match BRIDGE.get() {
        Some(bridge) => match bridge.sender.send(command) {
            Ok(()) => return true,
            Err(error) => error.into_inner(),
        },
        None => command,
    };
    std::mem::forget(unsent);
    false
}

fn serve(ruby: &Ruby, receiver: &Receiver<Command>) -> Result<(), Error> {
    let wake = BRIDGE.get().map(|bridge| bridge.sender.clone());
    loop {
        let unblock = || {
            if let Some(wake) = &wake {
                let _ = wake.send(Command::Wake);
            }
        };
        let first = match without_gvl(|| receiver.recv(), unblock) {
            Some(Ok(command)) => Some(command),
            // Every sender is gone: nothing can ever arrive.
            Some(Err(_)) => return Ok(()),
            None => None,
        };
        // Thread#kill and process exit arrive as interrupts; this raises them here.
        ruby.thread_check_ints()?;
        let mut next = first;
        for _ in 0..BATCH {
            match next {
                Some(Command::Run(job)) => execute(ruby, job),
                Some(Command::Wake) => {}
                None => break,
            }
            next = receiver.try_recv().ok();
        }
        if let Some(Command::Run(job)) = next {
            execute(ruby, job);
        }
    }
}

fn execute(ruby: &Ruby, job: Job) {
    // Jobs report their own Ruby errors; a panic must not unwind into Ruby.
    if catch_unwind(AssertUnwindSafe(|| job(ruby))).is_err() {
        eprintln!("prosody: a bridge job panicked; continuing");
    }
}
