//! The tokio runtime every client of the process shares.

use std::sync::atomic::{AtomicPtr, Ordering};

use tokio::runtime::{Builder, Runtime};

/// This process's runtime, or null before first use and in a forked child
/// (whose copy has no worker threads). A runtime is leaked: it lives as long as
/// the process, and a child must not run the parent's destructor, which would
/// wait for threads that do not exist there.
static RUNTIME: AtomicPtr<Runtime> = AtomicPtr::new(std::ptr::null_mut());

/// The shared multi-threaded runtime, built on first use. Building only fails
/// when the OS refuses threads, and then nothing here could work.
pub(crate) fn runtime() -> &'static Runtime {
    let current = RUNTIME.load(Ordering::Acquire);
    // SAFETY: a non-null pointer came from `Box::leak` below and is never freed.
    if let Some(runtime) = unsafe { current.as_ref() } {
        return runtime;
    }
    let mut builder = Builder::new_multi_thread();
    builder.thread_name("prosody-worker").enable_all();
    if let Some(workers) = worker_threads() {
        builder.worker_threads(workers);
    }
    let built = Box::into_raw(Box::new(builder.build().unwrap_or_else(|error| {
        panic!("prosody: cannot start the tokio runtime: {error}")
    })));
    match RUNTIME.compare_exchange(
        std::ptr::null_mut(),
        built,
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        // SAFETY: `built` was just leaked from a Box and is now published for good.
        Ok(_) => unsafe { &*built },
        Err(winner) => {
            // Another thread built one first; ours has run nothing yet.
            // SAFETY: `built` came from `Box::into_raw` above and was never shared.
            drop(unsafe { Box::from_raw(built) });
            // SAFETY: `winner` is non-null (the exchange failed) and never freed.
            unsafe { &*winner }
        }
    }
}

/// Worker threads: one fewer than the CPUs, at least one; `None` when
/// `TOKIO_WORKER_THREADS` is set (tokio then reads it itself).
///
/// Besides the workers, the processor thread is busy whenever messages flow
/// (every Ruby handler runs there, under the GVL), and librdkafka has its own
/// threads. With a worker per CPU as well, the busy threads outnumbered the
/// CPUs: on 2 CPUs, one worker instead of two gave bench (b) 1.06x and 1.15x
/// the rate at 0.92x and 0.85x the CPU per message (medians of two sets of
/// 7 and 8 alternating runs, 12 of the 15 pairs in favour; session 14).
fn worker_threads() -> Option<usize> {
    if std::env::var_os("TOKIO_WORKER_THREADS").is_some() {
        return None;
    }
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    Some(cpus.saturating_sub(1).max(1))
}

/// Forgets the parent's runtime in a forked child. Only an atomic store: this
/// runs between `fork` and anything else.
pub(crate) fn forget_after_fork() {
    RUNTIME.store(std::ptr::null_mut(), Ordering::Release);
}
