//! Process-level concerns: lazy start of the bridge, fork detection, and moving
//! heavy work off the caller's (possibly fiber) stack.

use std::sync::OnceLock;

use magnus::{Error, Ruby};

use crate::errors::{error, Kind};
use crate::gvl::without_gvl;

/// The process that started the bridge and the runtime. Threads do not survive
/// `fork`, so a child must not use what the parent started.
static STARTED_IN: OnceLock<u32> = OnceLock::new();

/// Starts the bridge on first use, and refuses to run in a forked child.
///
/// Starting lazily means a preloading server (Puma, Unicorn) may `require`
/// prosody before forking, as long as clients are created in the children.
pub(crate) fn ensure_started(ruby: &Ruby) -> Result<(), Error> {
    let started_in = *STARTED_IN.get_or_init(|| {
        crate::bridge::start(ruby);
        std::process::id()
    });
    if started_in == std::process::id() {
        Ok(())
    } else {
        Err(error(
            ruby,
            Kind::Bridge,
            "Prosody was started before this process forked; create Prosody clients after forking (e.g. in Puma's on_worker_boot)",
        ))
    }
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
