//! What a multi-token matmul's block reads and writes, shared by the f32 kernel (`gemm`) and
//! the bf16 dots (`bf16`): the slots whose token rows it multiplies, and the output its
//! parallel tasks write at disjoint places.

use std::marker::PhantomData;

/// The rows of `x` a block multiplies: slot `s` reads row `s / x_div` of `x` (`cols` wide) and
/// writes row `s` of the output. A prompt's matmul has slots `0..n` and `x_div` 1; an expert's
/// has the (token, choice) pairs that chose it and `x_div` the choices per token (gate and up
/// read the token's row) or 1 (down reads the pair's own row).
/// The rows are f32, or bf16 words for [`super::bf16`]'s block.
#[derive(Clone, Copy)]
pub struct Slots<'a, T = f32> {
    pub x: &'a [T],
    pub x_div: usize,
    pub slots: &'a [u32],
}

impl<'a, T> Slots<'a, T> {
    #[inline(always)]
    pub(super) fn row(&self, i: usize, cols: usize) -> &'a [T] {
        let s = self.slots[i] as usize / self.x_div;
        &self.x[s * cols..(s + 1) * cols]
    }
}

/// An output that parallel tasks write at disjoint indices (each task owns a block of rows
/// for a set of slots that no other task has), without splitting it into `&mut` pieces: a
/// block's outputs are strided (`slot * rows + r`), not one range.
pub struct Disjoint<'a> {
    ptr: *mut f32,
    len: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: tasks write disjoint indices (the callers' task split guarantees it); nothing reads
// the output until every task has ended.
unsafe impl Send for Disjoint<'_> {}
// SAFETY: as above.
unsafe impl Sync for Disjoint<'_> {}

impl<'a> Disjoint<'a> {
    pub fn new(out: &'a mut [f32]) -> Self {
        Disjoint { ptr: out.as_mut_ptr(), len: out.len(), _borrow: PhantomData }
    }

    /// Elements `start..start + len` as a slice.
    ///
    /// # Safety
    /// No other thread accesses them while the slice lives.
    #[allow(clippy::mut_from_ref)] // the disjointness is the caller's contract, as for `store`
    pub unsafe fn slice_mut(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(start + len <= self.len, "output range {start}..{} past {}", start + len, self.len);
        // SAFETY: in bounds (checked); exclusive per the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }

    /// Sets (or adds to) element `i`.
    ///
    /// # Safety
    /// No other thread accesses element `i` while the `Disjoint` lives.
    #[inline(always)]
    pub(super) unsafe fn store(&self, i: usize, v: f32, accumulate: bool) {
        assert!(i < self.len, "output index {i} past {}", self.len);
        // SAFETY: in bounds (checked); exclusive per the caller's contract.
        let slot = unsafe { &mut *self.ptr.add(i) };
        *slot = if accumulate { *slot + v } else { v };
    }
}
