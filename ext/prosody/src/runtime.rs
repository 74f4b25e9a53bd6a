//! The tokio runtime every client of the process shares.

use std::sync::OnceLock;

use tokio::runtime::{Builder, Runtime};

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// The shared multi-threaded runtime, built on first use. Building only fails
/// when the OS refuses threads, and then nothing here could work.
pub(crate) fn runtime() -> &'static Runtime {
    RUNTIME.get_or_init(|| {
        Builder::new_multi_thread()
            .thread_name("prosody-worker")
            .enable_all()
            .build()
            .unwrap_or_else(|error| panic!("prosody: cannot start the tokio runtime: {error}"))
    })
}
