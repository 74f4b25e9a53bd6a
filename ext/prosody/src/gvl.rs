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

/// What the GVL-free side works on: only `run` touches it, through its own pointer.
struct Call<F, R> {
    work: Option<F>,
    result: Option<std::thread::Result<R>>,
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
    unsafe extern "C" fn run<F: FnOnce() -> R, R>(data: *mut c_void) -> *mut c_void {
        // SAFETY: `data` points to the `Call` on `without_gvl`'s stack, alive for the
        // whole blocking call. Ruby runs `run` exactly once, and nothing else
        // touches the `Call` meanwhile (`unblock_fn` gets a different pointer), so
        // this exclusive reference is the only one.
        let call = unsafe { &mut *data.cast::<Call<F, R>>() };
        if let Some(work) = call.work.take() {
            RELEASED.with(|released| released.set(true));
            call.result = Some(catch_unwind(AssertUnwindSafe(work)));
            RELEASED.with(|released| released.set(false));
        }
        std::ptr::null_mut()
    }

    unsafe extern "C" fn unblock_fn<U: Fn()>(data: *mut c_void) {
        // SAFETY: `data` points to `unblock` on `without_gvl`'s stack, alive for the
        // whole blocking call and only ever read through shared references (`U: Fn`),
        // possibly while `run` works on the separate `Call`.
        let unblock = unsafe { &*data.cast::<U>().cast_const() };
        // A panic must not unwind into Ruby; the worst case is a missed wake-up.
        let _ = catch_unwind(AssertUnwindSafe(unblock));
    }

    let mut call = Call {
        work: Some(work),
        result: None,
    };
    let call_data = std::ptr::addr_of_mut!(call).cast::<c_void>();
    let unblock_data = std::ptr::addr_of!(unblock).cast_mut().cast::<c_void>();
    // SAFETY: both callbacks match the signatures Ruby expects; `run` only uses
    // `call_data` and `unblock_fn` only `unblock_data`, two distinct locals that
    // outlive this blocking call. The `2` variant neither raises nor checks
    // interrupts, so Ruby never longjmps out of here.
    unsafe {
        rb_sys::rb_thread_call_without_gvl2(
            Some(run::<F, R>),
            call_data,
            Some(unblock_fn::<U>),
            unblock_data,
        );
    }
    match call.result {
        Some(Ok(result)) => Some(result),
        Some(Err(panic)) => std::panic::resume_unwind(panic),
        None => None,
    }
}
