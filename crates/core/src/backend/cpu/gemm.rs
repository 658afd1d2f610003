//! The CPU backend's matmul for several tokens (prefill, experts grouped by token, batched
//! decode): a block of weight rows is decoded once into f32 (any stored format) and multiplied
//! with the tokens by a register-blocked micro-kernel, `MR` rows by `NR` tokens at a time.
//! Each loaded weight vector is used `NR` times and each token vector `MR` times, so the
//! kernel runs at the FMA units' rate instead of the loads' (a dot per row and token does two
//! loads per multiply-add). Accumulation is f32 and each sum runs over the columns in the
//! same lane order as the one-token kernel's: the decoded weights are exact, only the order
//! of the sums differs from the reference's.
//!
//! Rows and tokens past a block's end are padded by repeating the last one (computed, never
//! stored), so every call runs the full-size kernel.

use super::blocks::{Disjoint, Slots};
use super::matmul::{Bf16s, Decode, Fp8s, Q8s};
use super::vector::{dispatch, AtLevel, Simd, Vector, LANES};
use crate::model::weights::{BlockScales, Matrix};
use crate::quant::{fp8_table, DType};

/// Weight rows one task decodes and computes (a multiple of every level's `MR`).
pub const PANEL_ROWS: usize = 16;

/// `MR` weight rows times `NR` token rows, each a dot over the columns.
///
/// # Safety
/// The CPU runs `V`'s level.
#[inline(always)]
pub(super) unsafe fn micro<V: Vector, const MR: usize, const NR: usize>(w: [&[f32]; MR], x: [&[f32]; NR]) -> [[f32; NR]; MR] {
    let cols = w[0].len();
    assert!(w.iter().all(|r| r.len() == cols) && x.iter().all(|r| r.len() == cols), "rows of one width");
    let full = cols / LANES * LANES;
    // SAFETY (every block below): the level is the caller's contract; loads read `LANES`
    // values at `k < full <= cols`, inside every row (asserted above).
    let mut acc = [[unsafe { V::zero() }; NR]; MR];
    for k in (0..full).step_by(LANES) {
        let wk: [V; MR] = std::array::from_fn(|i| unsafe { V::load(w[i].as_ptr().add(k)) });
        for j in 0..NR {
            let xk = unsafe { V::load(x[j].as_ptr().add(k)) };
            for i in 0..MR {
                acc[i][j] = unsafe { V::mul_add(wk[i], xk, acc[i][j]) };
            }
        }
    }
    let mut sums = [[0f32; NR]; MR];
    for i in 0..MR {
        for j in (0..NR).step_by(4) {
            let four: [V; 4] = std::array::from_fn(|q| if j + q < NR { acc[i][j + q] } else { unsafe { V::zero() } });
            let four = unsafe { V::sum4(four) };
            let take = 4.min(NR - j);
            sums[i][j..j + take].copy_from_slice(&four[..take]);
        }
        for j in 0..NR {
            for c in full..cols {
                sums[i][j] += w[i][c] * x[j][c];
            }
        }
    }
    sums
}

/// Rows `first..first + count` of `m` (`count` ≤ [`PANEL_ROWS`]) for every slot of `slots`,
/// into `out[slot * m.rows + r]`. `panel`: `count * cols` values of working space.
///
/// # Safety
/// The CPU runs `V`'s level.
#[inline(always)]
unsafe fn block<V: Vector, const MR: usize, const NR: usize>(m: &Matrix, first: usize, count: usize, slots: Slots, out: &Disjoint, accumulate: bool, panel: &mut [f32]) {
    let cols = m.cols;
    // SAFETY: the caller's contract.
    unsafe { decode_panel::<V>(m, first, count, panel) };
    let n = slots.slots.len();
    for t in (0..n).step_by(NR) {
        let x: [&[f32]; NR] = std::array::from_fn(|j| slots.row((t + j).min(n - 1), cols));
        for r in (0..count).step_by(MR) {
            let w: [&[f32]; MR] = std::array::from_fn(|i| {
                let i = (r + i).min(count - 1);
                &panel[i * cols..(i + 1) * cols]
            });
            // SAFETY: the caller's contract.
            let y = unsafe { micro::<V, MR, NR>(w, x) };
            for (j, &slot) in slots.slots[t..n.min(t + NR)].iter().enumerate() {
                for (i, row) in y.iter().enumerate().take(count - r) {
                    // SAFETY: this task owns rows `first..first + count` for these slots.
                    unsafe { out.store(slot as usize * m.rows + first + r + i, row[j], accumulate) };
                }
            }
        }
    }
}

/// Row `r` of `m` as f32 into `out`, the same values as `Matrix::decode_row`: FP8 with block
/// scales, q8, q4 and bf16 through the level's vector (decoding a value at a time was up to a
/// third of a q4 prompt's expert matmuls), any other format by `Matrix::decode_row`.
///
/// # Safety
/// The CPU runs `V`'s level.
#[inline(always)]
pub(super) unsafe fn decode_row<V: Vector>(m: &Matrix, r: usize, out: &mut [f32]) {
    let (cols, data) = (m.cols, m.data.as_slice());
    assert_eq!(out.len(), cols, "a row of the matrix's width");
    let full = cols / LANES * LANES;
    let whole_blocks = |s: &&BlockScales| s.block_cols.is_multiple_of(LANES);
    // SAFETY (every arm's loads and stores): the level is the caller's contract; each reads
    // `LANES` values at `k + LANES <= full <= cols` of a row and writes them into `out`
    // (`cols` long, asserted).
    match (m.dtype, m.scales.as_ref().filter(whole_blocks)) {
        (DType::F8E4M3, Some(s)) => {
            let grid_row = &s.values[(r / s.block_rows) * s.grid_cols..][..s.grid_cols];
            unsafe { decode_blocks::<V, Fp8s>(&data[r * cols..(r + 1) * cols], Some((grid_row, s.block_cols)), out) }
        }
        (DType::Q8, Some(s)) if s.block_rows == 1 => unsafe { decode_blocks::<V, Q8s>(&data[r * cols..(r + 1) * cols], Some((&s.values[r * s.grid_cols..][..s.grid_cols], s.block_cols)), out) },
        (DType::Q4, Some(s)) if s.block_rows == 1 && cols.is_multiple_of(2) => {
            let (row, groups) = (&data[r * cols / 2..(r + 1) * cols / 2], &s.values[r * s.grid_cols * 2..][..s.grid_cols * 2]);
            let one = unsafe { V::splat(1.0) };
            for k in (0..full).step_by(LANES) {
                let g = 2 * (k / s.block_cols);
                // `q * scale + min` rounded twice, as the scalar decode computes it.
                let scaled = unsafe { V::mul(V::load_u4(row.as_ptr().add(k / 2)), V::splat(groups[g])) };
                unsafe { V::mul_add(scaled, one, V::splat(groups[g + 1])).store(out.as_mut_ptr().add(k)) };
            }
            for c in full..cols {
                let (q, g) = ((row[c / 2] >> (4 * (c % 2))) & 0xf, 2 * (c / s.block_cols));
                out[c] = q as f32 * groups[g] + groups[g + 1];
            }
        }
        (DType::BF16, None) => unsafe { decode_blocks::<V, Bf16s>(&data[r * cols * 2..(r + 1) * cols * 2], None, out) },
        _ => m.decode_row(r, out),
    }
}

/// One row stored as `D` into `out`, each block of `scales` (FP8 blocks, q8 groups: a grid row
/// and its block width) multiplied in.
///
/// # Safety
/// The CPU runs `V`'s level.
#[inline(always)]
unsafe fn decode_blocks<V: Vector, D: Decode>(row: &[u8], scales: Option<(&[f32], usize)>, out: &mut [f32]) {
    let (cols, table) = (out.len(), fp8_table());
    assert_eq!(row.len(), cols * D::BYTES, "a row of the output's width");
    let full = cols / LANES * LANES;
    for k in (0..full).step_by(LANES) {
        // SAFETY: the level is the caller's contract; `LANES` values at `k + LANES <= cols` of
        // the row and of `out` (asserted widths).
        let values = unsafe { D::load::<V>(row.as_ptr().add(k * D::BYTES), table) };
        let values = match scales {
            Some((grid_row, block)) => unsafe { V::mul(values, V::splat(grid_row[k / block])) },
            None => values,
        };
        unsafe { values.store(out.as_mut_ptr().add(k)) };
    }
    for c in full..cols {
        let value = D::decode(&row[c * D::BYTES..], table);
        out[c] = scales.map_or(value, |(grid_row, block)| value * grid_row[c / block]);
    }
}

/// Rows `first..` of `m` decoded into `panel`, a row every `m.cols` values.
///
/// # Safety
/// The CPU runs `V`'s level.
#[inline(always)]
pub(super) unsafe fn decode_panel<V: Vector>(m: &Matrix, first: usize, count: usize, panel: &mut [f32]) {
    for (i, row) in panel.chunks_exact_mut(m.cols).take(count).enumerate() {
        // SAFETY: the caller's contract.
        unsafe { decode_row::<V>(m, first + i, row) };
    }
}

/// [`decode_panel`] at `simd`'s level.
pub fn decode_panel_at(simd: Simd, m: &Matrix, first: usize, count: usize, panel: &mut [f32]) {
    assert!(panel.len() >= count * m.cols && first + count <= m.rows, "{count} rows from {first} of {} into {} values", m.rows, panel.len());
    struct Panel<'a>(&'a Matrix, usize, usize, &'a mut [f32]);
    impl AtLevel for Panel<'_> {
        type Output = ();
        #[inline(always)]
        unsafe fn run<V: Vector>(self) {
            // SAFETY: the caller's contract.
            unsafe { decode_panel::<V>(self.0, self.1, self.2, self.3) }
        }
    }
    dispatch(simd, Panel(m, first, count, panel))
}

/// [`block`] at `simd`'s level.
#[allow(clippy::too_many_arguments)] // one block's whole description; a struct would only rename it
pub fn block_at(simd: Simd, m: &Matrix, first: usize, count: usize, slots: Slots, out: &Disjoint, accumulate: bool, panel: &mut [f32]) {
    debug_assert!(count <= PANEL_ROWS && panel.len() >= count * m.cols);
    dispatch(simd, Block { m, first, count, slots, out, accumulate, panel })
}

struct Block<'a, 'b> {
    m: &'a Matrix,
    first: usize,
    count: usize,
    slots: Slots<'a>,
    out: &'a Disjoint<'b>,
    accumulate: bool,
    panel: &'a mut [f32],
}

impl AtLevel for Block<'_, '_> {
    type Output = ();
    #[inline(always)]
    unsafe fn run<V: Vector>(self) {
        let Block { m, first, count, slots, out, accumulate, panel } = self;
        // Four by four keeps 16 accumulators, four weight vectors and a token vector in
        // AVX-512's 32 registers; AVX2 (two registers per vector, 16 of them) and the
        // fallback take two by two.
        // SAFETY: the caller's contract.
        unsafe {
            match V::REGISTERS {
                32.. => block::<V, 4, 4>(m, first, count, slots, out, accumulate, panel),
                _ => block::<V, 2, 2>(m, first, count, slots, out, accumulate, panel),
            }
        }
    }
}
