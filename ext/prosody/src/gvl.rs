//! The only place that releases and reacquires Ruby's GVL.
//!
//! magnus caches "this thread holds the GVL" per thread, so while the GVL is
//! released here a thread-local flag records it; [`gvl_released`] lets drop code
//! (see `bridge::owned`) avoid touching Ruby in that window.

use std::cell::Cell;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

thread_local! {
    static RELEASED: Cell<bool> = const { Cell::new(false) };
}

/// True while this thread runs inside [`without_gvl`].
pub(crate) fn gvl_released() -> bool {
    RELEASED.with(Cell::get)
}

struct Call<F, R, U> {
    work: Option<F>,
    result: Option<std::thread::Result<R>>,
    unblock: Option<U>,
}

/// Runs `work` with the GVL released so other Ruby threads can run.
///
/// `unblock` is called by Ruby (from another thread, with the GVL) when this
/// thread must be interrupted (Thread#kill, process exit); it must make `work`
/// return promptly. `work` must not touch Ruby. A panic in `work` is caught and
/// resumed after the GVL is back, so it never unwinds through Ruby's C frames.
///
/// Returns `None` without running `work` when an interrupt was already pending;
/// the caller then checks interrupts (`Ruby::thread_check_ints`), which never
/// happens implicitly here, so no Ruby exception can jump over Rust frames.
pub(crate) fn without_gvl<F, R, U>(work: F, unblock: U) -> Option<R>
where
    F: FnOnce() -> R,
    U: Fn(),
{
    unsafe extern "C" fn run<F: FnOnce() -> R, R, U>(data: *mut c_void) -> *mut c_void {
        // SAFETY: `data` is the `Call` on `without_gvl`'s stack, alive for the whole
        // call; Ruby runs `run` exactly once and not concurrently with `unblock_fn`'s
        // access to `unblock`, which is a different field.
        let call = unsafe { &mut *data.cast::<Call<F, R, U>>() };
        if let Some(work) = call.work.take() {
            RELEASED.with(|released| released.set(true));
            call.result = Some(catch_unwind(AssertUnwindSafe(work)));
            RELEASED.with(|released| released.set(false));
        }
        std::ptr::null_mut()
    }

    unsafe extern "C" fn unblock_fn<F, R, U: Fn()>(data: *mut c_void) {
        // SAFETY: as above; only the `unblock` field is read here, through a shared reference.
        let call = unsafe { &*data.cast::<Call<F, R, U>>() };
        if let Some(unblock) = call.unblock.as_ref() {
            // A panic must not unwind into Ruby; the worst case is a missed wake-up.
            let _ = catch_unwind(AssertUnwindSafe(unblock));
        }
    }

    let mut call = Call {
        work: Some(work),
        result: None,
        unblock: Some(unblock),
    };
    let data = std::ptr::addr_of_mut!(call).cast::<c_void>();
    // SAFETY: both callbacks match the signatures Ruby expects and only use `data`
    // as described above; `call` outlives this blocking call. The `2` variant
    // neither raises nor checks interrupts, so Ruby never longjmps out of here.
    unsafe {
        rb_sys::rb_thread_call_without_gvl2(
            Some(run::<F, R, U>),
            data,
            Some(unblock_fn::<F, R, U>),
            data,
        );
    }
    match call.result {
        Some(Ok(result)) => Some(result),
        Some(Err(panic)) => std::panic::resume_unwind(panic),
        None => None,
    }
}
