//! Counts this process's Rust heap allocations, so scenario (a) can print
//! allocations per message. Unlike time or CPU, that figure does not move with
//! the machine's load: a change in per-message cost shows in a single run.
//! (librdkafka allocates with `malloc` directly; those are not counted.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

/// The system allocator, counting.
pub(crate) struct CountingAllocator;

/// Allocations a thread counts before adding them to the total: one shared
/// counter bumped on every allocation would have the threads contend for its
/// cache line, slowing the multi-threaded core more than the plain loop.
const BATCH: u64 = 256;

static TOTAL: AtomicU64 = AtomicU64::new(0);

thread_local! {
    // A const-initialised `Cell<u64>` needs no destructor: taking it never allocates.
    static PENDING: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // `try_with`: a thread tearing down its locals allocates uncounted.
    let _ = PENDING.try_with(|pending| {
        let counted = pending.get() + 1;
        if counted >= BATCH {
            TOTAL.fetch_add(counted, Ordering::Relaxed);
            pending.set(0);
        } else {
            pending.set(counted);
        }
    });
}

/// Rust heap allocations so far, every thread together, give or take
/// [`BATCH`] per thread.
pub(crate) fn allocations_now() -> u64 {
    TOTAL.load(Ordering::Relaxed)
}

/// Allocations per message between two [`allocations_now`] readings.
pub(crate) fn per_message(first: u64, last: u64, count: usize) -> f64 {
    let made = usize::try_from(last.saturating_sub(first)).unwrap_or(usize::MAX);
    crate::report::as_f64(made) / crate::report::as_f64(count).max(1.0)
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged, so `System`'s guarantees hold; counting touches no heap memory.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded as received (see the impl's note).
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded as received.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: forwarded as received.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as received.
        unsafe { System.dealloc(ptr, layout) }
    }
}
