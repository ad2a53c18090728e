//! The binary's global allocator: mimalloc, with optional live-heap accounting.
//!
//! The core's RSS says little about leaks: mimalloc keeps freed pages committed for reuse and
//! returns them only after a purge delay, on a later call into the allocator from the thread
//! that owns them. After a burst of 4 MiB bodies the RSS of a core that frees every byte
//! still wanders between 100 and 230 MB from burst to burst (`benches/burst_memory.py`).
//! Counting the bytes of live allocations answers the question exactly, so tests and
//! diagnostics can switch it on: `UNIMODEL_HEAP_ACCOUNTING=1` in the environment, read once
//! at start, makes `/metrics` report `unimodel_heap_live_bytes`. Off (the default), each
//! allocation pays one relaxed load of a flag that never changes.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};

/// The environment variable that switches accounting on (any value but `0`).
pub const ACCOUNTING_ENV: &str = "UNIMODEL_HEAP_ACCOUNTING";

static ACCOUNTING: AtomicBool = AtomicBool::new(false);

/// Bytes allocated and not yet freed since accounting started. Signed: blocks allocated
/// before it started may be freed after.
static LIVE: AtomicIsize = AtomicIsize::new(0);

/// mimalloc, counting live bytes while accounting is on.
pub struct Allocator;

// SAFETY: every call is forwarded unchanged to mimalloc, which upholds `GlobalAlloc`'s
// contract; the counters do not touch the memory.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        // SAFETY: the caller's contract, passed on.
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        // SAFETY: the caller's contract, passed on.
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        // SAFETY: the caller's contract, passed on.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let moved = unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) };
        if !moved.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        moved
    }
}

#[inline(always)]
fn count(bytes: isize) {
    if ACCOUNTING.load(Ordering::Relaxed) {
        LIVE.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Starts accounting if `UNIMODEL_HEAP_ACCOUNTING` asks for it. Call first thing in `main`,
/// before the runtime starts, so the count covers every allocation that matters.
pub fn init_from_env() {
    if std::env::var_os(ACCOUNTING_ENV).is_some_and(|v| v != "0") {
        ACCOUNTING.store(true, Ordering::Relaxed);
    }
}

/// Bytes in live allocations, or `None` when accounting is off.
pub fn live_bytes() -> Option<i64> {
    ACCOUNTING
        .load(Ordering::Relaxed)
        .then(|| LIVE.load(Ordering::Relaxed) as i64)
}
