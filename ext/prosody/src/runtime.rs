//! The tokio runtime every client of the process shares.

use std::sync::atomic::{AtomicPtr, Ordering};

use tokio::runtime::{Builder, Runtime};

/// This process's runtime, or null before first use and in a forked child
/// (whose copy has no worker threads). A runtime is leaked: it lives as long as
/// the process, and a child must not run the parent's destructor, which would
/// wait for threads that do not exist there.
static RUNTIME: AtomicPtr<Runtime> = AtomicPtr::new(std::ptr::null_mut());

/// Why the runtime cannot start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RuntimeError {
    /// `TOKIO_WORKER_THREADS` is set but is not a positive whole number.
    #[error(
        "TOKIO_WORKER_THREADS must be a positive whole number of tokio worker threads, \
         got {0:?}; unset it to use one fewer than the CPUs"
    )]
    WorkerThreads(String),
    /// The OS refused the runtime's threads (or its I/O driver).
    #[error("cannot start the tokio runtime: {0}")]
    Build(#[source] std::io::Error),
}

/// The shared multi-threaded runtime, built by the first call in this process
/// (`Prosody::Client.new` calls it before anything else, so a bad
/// `TOKIO_WORKER_THREADS` is a clear error there, not a panic later).
pub(crate) fn start() -> Result<&'static Runtime, RuntimeError> {
    let current = RUNTIME.load(Ordering::Acquire);
    // SAFETY: a non-null pointer came from `Box::into_raw` below and is never freed.
    if let Some(runtime) = unsafe { current.as_ref() } {
        return Ok(runtime);
    }
    // Read as given (lossily: a value that is not UTF-8 is as wrong as "abc").
    let setting =
        std::env::var_os("TOKIO_WORKER_THREADS").map(|value| value.to_string_lossy().into_owned());
    let workers = worker_threads(setting.as_deref())?;
    let runtime = Builder::new_multi_thread()
        .thread_name("prosody-worker")
        // Always set: left unset, tokio reads TOKIO_WORKER_THREADS itself and
        // panics on a bad value.
        .worker_threads(workers)
        .enable_all()
        .build()
        .map_err(RuntimeError::Build)?;
    let built = Box::into_raw(Box::new(runtime));
    match RUNTIME.compare_exchange(
        std::ptr::null_mut(),
        built,
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        // SAFETY: `built` was just leaked from a Box and is now published for good.
        Ok(_) => Ok(unsafe { &*built }),
        Err(winner) => {
            // Another thread built one first; ours has run nothing yet.
            // SAFETY: `built` came from `Box::into_raw` above and was never shared.
            drop(unsafe { Box::from_raw(built) });
            // SAFETY: `winner` is non-null (the exchange failed) and never freed.
            Ok(unsafe { &*winner })
        }
    }
}

/// The runtime [`start`] built. Every caller works for a `Prosody::Client` (or a
/// handler call of one) of this process, whose `new` started it; objects made
/// before a fork are refused before they get here (`check_same_process`).
pub(crate) fn runtime() -> &'static Runtime {
    match start() {
        Ok(runtime) => runtime,
        // Unreachable, as said above. (Were it reached, magnus would turn the
        // panic into a Ruby `fatal` rather than unwind into Ruby.)
        Err(error) => {
            panic!("prosody: the tokio runtime was used before a client started it: {error}")
        }
    }
}

/// Worker threads: `TOKIO_WORKER_THREADS` when set (`setting`), else one fewer
/// than the CPUs, at least one.
///
/// Besides the workers, the processor thread is busy whenever messages flow
/// (every Ruby handler runs there, under the GVL), and librdkafka has its own
/// threads. With a worker per CPU as well, the busy threads outnumbered the
/// CPUs: on 2 CPUs, one worker instead of two gave bench (b) 1.06x and 1.15x
/// the rate at 0.92x and 0.85x the CPU per message (medians of two sets of
/// 7 and 8 alternating runs, 12 of the 15 pairs in favour; session 14).
fn worker_threads(setting: Option<&str>) -> Result<usize, RuntimeError> {
    match setting {
        Some(text) => match text.trim().parse::<usize>() {
            Ok(workers) if workers > 0 => Ok(workers),
            _ => Err(RuntimeError::WorkerThreads(text.to_owned())),
        },
        None => {
            let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
            Ok(cpus.saturating_sub(1).max(1))
        }
    }
}

/// Forgets the parent's runtime in a forked child. Only an atomic store: this
/// runs between `fork` and anything else.
pub(crate) fn forget_after_fork() {
    RUNTIME.store(std::ptr::null_mut(), Ordering::Release);
}
