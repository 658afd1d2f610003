//! Per-thread working space for the CPU kernels, kept between calls: once each thread has grown
//! its buffers, a decode step allocates nothing. Kernels borrow it inside their per-thread work
//! only (never around a parallel call: a thread waiting on one may run another task that
//! borrows it too).

use std::cell::RefCell;

#[derive(Default)]
pub struct Scratch {
    /// A decoded weight row, a cache row.
    pub row: Vec<f32>,
    /// Rows read from a cache, scores, the router's working values.
    pub rows: Vec<f32>,
    pub scores: Vec<f32>,
    pub choice: Vec<f32>,
    pub taken: Vec<bool>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch.
pub fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|s| f(&mut s.borrow_mut()))
}

/// `v` resized to `len` (growing only), as a slice.
pub fn sized(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}
