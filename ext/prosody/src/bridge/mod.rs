//! The Ruby-thread executor: Rust threads send closures, one Ruby thread runs them.
//!
//! Ruby may only be called from Ruby threads holding the GVL. Tokio workers and
//! librdkafka threads therefore never call Ruby; they send a [`Job`] down a
//! crossbeam channel to the bridge thread, a Ruby thread started on first use.
//! That thread waits for work with the GVL released, then takes the GVL once
//! and runs up to [`BATCH`] jobs before releasing it again.
//!
//! Jobs sent with [`run_coalesced`] may [`coalesce`] values for one Ruby
//! object: they are gathered into one Array per object and handed over by a
//! single method call (`processor.submit_batch`) when the GVL hold ends, or
//! before any ordinary job runs, so ordinary jobs (a cancellation, say) never
//! overtake values coalesced before them.
//!
//! A job must never swallow a termination (Thread#kill at process exit, a
//! signal, `exit`): it passes every Ruby error through [`recoverable`], which
//! keeps terminations for the loop to re-raise, so the thread really ends and
//! the process can exit.

pub(crate) mod owned;

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use magnus::error::ErrorType;
use magnus::value::BoxValue;
use magnus::{prelude::*, Error, RArray, Ruby, Value};

use crate::bridge::owned::RubyOwned;
use crate::gvl::without_gvl;

/// Jobs run per GVL acquisition before other Ruby threads get a turn.
const BATCH: usize = 256;

type Job = Box<dyn FnOnce(&Ruby) + Send + 'static>;

enum Command {
    Run(Job),
    /// A job that only [`coalesce`]s: it does not flush what was coalesced before it.
    Coalesced(Job),
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
        let served = serve(ruby, &receiver, &wake);
        // Still holding the GVL: release what was coalesced but never handed over.
        GATHERED.with(|gathered| gathered.borrow_mut().clear());
        served
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

/// Like [`run`], for a job whose only effect on Ruby is through [`coalesce`].
pub(crate) fn run_coalesced(job: impl FnOnce(&Ruby) + Send + 'static) -> bool {
    send(Command::Coalesced(Box::new(job)))
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
    static GATHERED: RefCell<Vec<Gathered>> = const { RefCell::new(Vec::new()) };
}

/// Values coalesced for one receiver, until [`flush`] hands them over.
struct Gathered {
    receiver: Arc<RubyOwned>,
    method: &'static str,
    /// Registered with the GC (a box), so the values stay alive in between.
    items: BoxValue<RArray>,
}

/// Appends `items` to the Array that goes to `receiver.method(array)` at the
/// end of this GVL hold. Only from a bridge job (it runs on the bridge thread).
pub(crate) fn coalesce(
    ruby: &Ruby,
    receiver: &Arc<RubyOwned>,
    method: &'static str,
    items: &[Value],
) -> Result<(), Error> {
    GATHERED.with(|gathered| {
        let mut gathered = gathered.borrow_mut();
        let index = match gathered
            .iter()
            .position(|entry| Arc::ptr_eq(&entry.receiver, receiver) && entry.method == method)
        {
            Some(index) => index,
            None => {
                gathered.push(Gathered {
                    receiver: Arc::clone(receiver),
                    method,
                    items: BoxValue::new(ruby.ary_new_capa(BATCH * items.len())),
                });
                gathered.len() - 1
            }
        };
        let array = *gathered[index].items;
        for item in items {
            array.push(*item)?;
        }
        Ok(())
    })
}

/// Hands every coalesced Array to its receiver. Errors are logged (the values'
/// own finalizers report what was lost); a termination ends the bridge thread.
fn flush(ruby: &Ruby) -> Result<(), Error> {
    let gathered = GATHERED.with(|gathered| std::mem::take(&mut *gathered.borrow_mut()));
    for entry in gathered {
        let array = *entry.items;
        let handed = entry
            .receiver
            .get(ruby)
            .funcall::<_, _, Value>(entry.method, (array,));
        if let Err(error) = handed {
            match recoverable(ruby, error) {
                Some(error) => {
                    tracing::warn!("cannot hand values to Ruby ({}): {error}", entry.method)
                }
                // Terminating: what is left is dropped here, with the GVL held.
                None => break,
            }
        }
    }
    match pending_termination() {
        Some(termination) => Err(termination),
        None => Ok(()),
    }
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
        flush(ruby)?;
    }
}

fn dispatch(ruby: &Ruby, command: Command) -> Result<(), Error> {
    match command {
        Command::Run(job) => {
            // Whatever was coalesced before this job reaches Ruby first.
            flush(ruby)?;
            execute(ruby, job)
        }
        Command::Coalesced(job) => execute(ruby, job),
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
