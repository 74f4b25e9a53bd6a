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
    let built = Box::into_raw(Box::new(
        Builder::new_multi_thread()
            .thread_name("prosody-worker")
            .enable_all()
            .build()
            .unwrap_or_else(|error| panic!("prosody: cannot start the tokio runtime: {error}")),
    ));
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

/// Forgets the parent's runtime in a forked child. Only an atomic store: this
/// runs between `fork` and anything else.
pub(crate) fn forget_after_fork() {
    RUNTIME.store(std::ptr::null_mut(), Ordering::Release);
}
