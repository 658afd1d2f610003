//! Marks calls into device drivers on the per-step path, so a test's counting allocator can
//! tell the host allocations dsrun's own step code makes (none, by design) from those a driver
//! makes inside its calls (wgpu allocates as it records and submits), and the CPU backend's
//! pool threads (whose work is the step's too) from other threads.

use std::cell::Cell;

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    static POOL_WORKER: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as one of the CPU backend's pool workers (for the whole thread's life).
pub fn mark_pool_worker() {
    POOL_WORKER.with(|w| w.set(true));
}

/// Whether this thread is a CPU pool worker.
pub fn is_pool_worker() -> bool {
    POOL_WORKER.with(Cell::get)
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
