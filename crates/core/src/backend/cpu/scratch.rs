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
    /// Decoded weight rows of a multi-token matmul's block (and rounded to bf16 for bf16 dots).
    pub panel: Vec<f32>,
    pub panel16: Vec<u16>,
    /// A multi-token matmul's tokens rounded to bf16 for bf16 dots.
    pub tokens16: Vec<u16>,
    /// A multi-token matmul's slots; experts' slots ordered by expert, and where each starts.
    pub slots: Vec<u32>,
    pub starts: Vec<u32>,
    /// Attention's partial results, per unit of work.
    pub parts: Vec<f32>,
    /// A one-token matmul's input, laid out for its weights' kernel.
    pub layouts: super::input::Layouts,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch.
pub fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|s| f(&mut s.borrow_mut()))
}

/// `v` resized to `len` (growing only), as a slice.
pub fn sized<T: Default + Clone>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    if v.len() < len {
        v.resize(len, T::default());
    }
    &mut v[..len]
}
