//! The Ruby-thread executor: Rust threads send closures, one Ruby thread runs them.
//!
//! Ruby may only be called from Ruby threads holding the GVL. Tokio workers and
//! librdkafka threads therefore never call Ruby; they send a [`Job`] down a
//! crossbeam channel to the bridge thread, a Ruby thread started on first use.
//! That thread waits for work with the GVL released, then takes the GVL once
//! and runs up to [`BATCH`] jobs before releasing it again.
//!
//! Handler calls do not come this way: the processor's thread takes them
//! itself (see `handler.rs`). Jobs here are replies to native calls, log
//! lines, monitor events and the release of Ruby values.
//!
//! A job must never swallow a termination (Thread#kill at process exit, a
//! signal, `exit`): it passes every Ruby error through [`recoverable`], which
//! keeps terminations for the loop to re-raise, so the thread really ends and
//! the process can exit.

pub(crate) mod owned;

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use crossbeam_channel::{Receiver, Sender};
use magnus::error::ErrorType;
use magnus::value::BoxValue;
use magnus::{prelude::*, Error, Ruby, Value};

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

/// This process's bridge, or null before the first start and in a forked child
/// (see [`forget_after_fork`]). A started bridge is leaked: it lives as long as
/// the process, and a child must not run its destructor.
static BRIDGE: AtomicPtr<Bridge> = AtomicPtr::new(std::ptr::null_mut());

/// Whether the current bridge's thread is running: false before the first start,
/// once the thread ended (killed, or the process is exiting), and in a fork.
static RUNNING: AtomicBool = AtomicBool::new(false);

/// Clears [`RUNNING`] when the bridge thread's function ends, however it ends.
struct RunningGuard;

impl Drop for RunningGuard {
    fn drop(&mut self) {
        RUNNING.store(false, Ordering::Release);
    }
}

/// Whether jobs sent now will run: handlers report themselves dead otherwise.
pub(crate) fn is_running() -> bool {
    RUNNING.load(Ordering::Acquire)
}

fn current() -> Option<&'static Bridge> {
    let bridge = BRIDGE.load(Ordering::Acquire);
    // SAFETY: a non-null pointer came from `Box::leak` in `start` and is never freed.
    unsafe { bridge.as_ref() }
}

/// Starts the bridge thread unless this process has a running one (a bridge
/// whose thread was killed is replaced). Call from a Ruby thread holding the
/// GVL, which serialises callers.
pub(crate) fn start(ruby: &Ruby) {
    if current().is_some() && is_running() {
        return;
    }
    let (sender, receiver) = crossbeam_channel::unbounded();
    let wake = sender.clone();
    let bridge = Box::leak(Box::new(Bridge { sender }));
    BRIDGE.store(bridge, Ordering::Release);
    RUNNING.store(true, Ordering::Release);
    let thread = ruby.thread_create_from_fn(move |ruby| {
        let _running = RunningGuard;
        serve(ruby, &receiver, &wake)
    });
    // The bridge thread is infrastructure: never report it and never keep the
    // process alive for it.
    let _ = thread.funcall::<_, _, Value>("name=", ("prosody-bridge",));
    let _ = thread.funcall::<_, _, Value>("report_on_exception=", (false,));
}

/// Forgets the parent's bridge in a forked child, whose copy of it has no
/// thread. Only an atomic store: this runs between `fork` and anything else.
pub(crate) fn forget_after_fork() {
    BRIDGE.store(std::ptr::null_mut(), Ordering::Release);
    RUNNING.store(false, Ordering::Release);
}

/// Queues `job` to run on the bridge thread. Returns false when the bridge is
/// gone (process exiting) or not started: the job is then leaked, not dropped,
/// because it may hold Ruby values that must not be released off a Ruby thread.
pub(crate) fn run(job: impl FnOnce(&Ruby) + Send + 'static) -> bool {
    send(Command::Run(Box::new(job)))
}

fn send(command: Command) -> bool {
    let unsent = match current() {
        Some(bridge) => match bridge.sender.send(command) {
            Ok(()) => return true,
            Err(error) => error.into_inner(),
        },
        None => command,
    };
    std::mem::forget(unsent);
    false
}

/// A termination met by a job, waiting for the loop to re-raise it. The box
/// keeps an exception object alive until then.
struct Termination {
    error: Error,
    _keep_alive: Option<BoxValue<Value>>,
}

thread_local! {
    static TERMINATION: RefCell<Option<Termination>> = const { RefCell::new(None) };
}

/// Sorts a Ruby error a bridge job met: returns it when the job may handle it
/// (log it, report it), or `None` when it is a termination (`Thread#kill` at
/// process exit, an `Interrupt` or other signal, `exit`), which the job must
/// not handle: the bridge loop re-raises it after the job, ending the thread.
/// Swallowing one would keep the thread alive and the process from exiting.
pub(crate) fn recoverable(ruby: &Ruby, error: Error) -> Option<Error> {
    let terminates = match error.error_type() {
        ErrorType::Jump(_) => true,
        ErrorType::Error(..) => false,
        ErrorType::Exception(_) => {
            error.is_kind_of(ruby.exception_signal())
                || error.is_kind_of(ruby.exception_system_exit())
        }
    };
    if !terminates {
        return Some(error);
    }
    TERMINATION.with(|slot| {
        let mut slot = slot.borrow_mut();
        // The first termination wins; a second one would end the same thread.
        if slot.is_none() {
            let keep_alive = error.value().map(BoxValue::new);
            *slot = Some(Termination {
                error,
                _keep_alive: keep_alive,
            });
        }
    });
    None
}

fn pending_termination() -> Option<Error> {
    TERMINATION.with(|slot| {
        slot.borrow_mut()
            .take()
            .map(|termination| termination.error)
    })
}

fn serve(ruby: &Ruby, receiver: &Receiver<Command>, wake: &Sender<Command>) -> Result<(), Error> {
    loop {
        let unblock = || {
            let _ = wake.send(Command::Wake);
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
                Some(command) => dispatch(ruby, command)?,
                None => break,
            }
            next = receiver.try_recv().ok();
        }
        if let Some(command) = next {
            dispatch(ruby, command)?;
        }
    }
}

fn dispatch(ruby: &Ruby, command: Command) -> Result<(), Error> {
    match command {
        Command::Run(job) => execute(ruby, job),
        Command::Wake => Ok(()),
    }
}

/// Runs one job; a termination it met ends the bridge thread.
fn execute(ruby: &Ruby, job: Job) -> Result<(), Error> {
    // Jobs report their own Ruby errors; a panic must not unwind into Ruby.
    if catch_unwind(AssertUnwindSafe(|| job(ruby))).is_err() {
        eprintln!("prosody: a bridge job panicked; continuing");
    }
    match pending_termination() {
        Some(termination) => Err(termination),
        None => Ok(()),
    }
}
