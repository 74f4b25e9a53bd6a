//! Process-level concerns: lazy start of the bridge and runtime, fork, and
//! moving heavy work off the caller's (possibly fiber) stack.
//!
//! Threads do not survive `fork`. A `pthread_atfork` child handler therefore
//! forgets the parent's bridge and runtime, so the child's first client starts
//! its own, and bumps the process generation, so a client made before the fork
//! (whose Kafka handles belong to threads left in the parent) refuses to work.
//! The core's trace exporter is told too: the child's next span starts its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

use magnus::{Error, Ruby};

use crate::errors::{error, Kind};
use crate::gvl::without_gvl;

/// How many forks separate this process from the one that loaded the extension.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// The current process generation; objects tied to threads record it at birth.
pub(crate) fn generation() -> u64 {
    GENERATION.load(Ordering::Acquire)
}

extern "C" fn after_fork_in_child() {
    // Only atomic stores: nothing else is safe between fork and exec-or-return.
    crate::bridge::forget_after_fork();
    crate::runtime::forget_after_fork();
    prosody::traces::forget_after_fork();
    GENERATION.fetch_add(1, Ordering::AcqRel);
}

/// Registers the fork handler; call once at extension load.
pub(crate) fn init(ruby: &Ruby) -> Result<(), Error> {
    static REGISTERED: Once = Once::new();
    let mut status = 0;
    REGISTERED.call_once(|| {
        // SAFETY: registers a plain `extern "C"` function that only performs atomic
        // stores, which is allowed in a child between fork and anything else.
        status = unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
    });
    if status == 0 {
        Ok(())
    } else {
        Err(error(
            ruby,
            Kind::Bridge,
            format!("cannot register the fork handler (pthread_atfork returned {status})"),
        ))
    }
}

/// Starts the bridge on first use in this process (again in a forked child).
///
/// Starting lazily means a preloading server (Puma, Unicorn) may `require`
/// prosody, and even use it, before forking.
pub(crate) fn ensure_started(ruby: &Ruby) {
    crate::bridge::start(ruby);
}

/// Fails with a `BridgeError` when `born` (a [`generation`]) is not this process's:
/// the object was made before a fork and its threads stayed in the parent.
pub(crate) fn check_same_process(ruby: &Ruby, born: u64, what: &str) -> Result<(), Error> {
    if born == generation() {
        return Ok(());
    }
    Err(error(
        ruby,
        Kind::Bridge,
        format!(
            "this {what} was created before the process forked and cannot be used in the child; \
             create a new Prosody::Client in the child (e.g. in Puma's on_worker_boot, or lazily on first use)"
        ),
    ))
}

/// Runs `work` on a fresh Rust thread and waits for it with the GVL released.
///
/// For calls that may go deep into librdkafka or tokio and may be made from a
/// fiber, whose machine stack is small. `work` must not touch Ruby.
pub(crate) fn off_ruby_stack<R: Send + 'static>(
    ruby: &Ruby,
    work: impl FnOnce() -> R + Send + 'static,
) -> Result<R, Error> {
    let (sender, receiver) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("prosody-call".to_owned())
        .spawn(move || {
            let _ = sender.send(work());
        })
        .map_err(|problem| {
            error(
                ruby,
                Kind::Bridge,
                format!("cannot start a thread: {problem}"),
            )
        })?;
    // The worker never touches Ruby, so an interrupt cannot leave it stuck: if
    // Ruby refuses to release the GVL (interrupt pending), wait with it held.
    let received = match without_gvl(|| receiver.recv(), || {}) {
        Some(received) => received,
        None => receiver.recv(),
    };
    received.map_err(|_| {
        error(
            ruby,
            Kind::Bridge,
            "the worker thread ended without a result",
        )
    })
}
