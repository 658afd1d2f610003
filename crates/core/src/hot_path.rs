//! Marks calls into device drivers on the per-step path, so a test's counting allocator can
//! tell the host allocations dsrun's own step code makes (none, by design) from those a driver
//! makes inside its calls (wgpu allocates as it records and submits).

use std::cell::Cell;

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Runs `call` (a driver call) marked as the driver's.
pub fn driver<T>(call: impl FnOnce() -> T) -> T {
    DEPTH.with(|d| d.set(d.get() + 1));
    let out = call();
    DEPTH.with(|d| d.set(d.get() - 1));
    out
}

/// Whether this thread is inside a driver call.
pub fn in_driver() -> bool {
    DEPTH.with(|d| d.get() > 0)
}
