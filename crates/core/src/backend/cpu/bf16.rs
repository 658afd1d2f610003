//! bf16 dot products for `--math fast` where the CPU has AVX512-BF16. `vdpbf16ps` multiplies
//! 32 pairs of bf16 values and adds them into 16 f32 lanes: twice an f32 FMA's multiply-adds
//! for one instruction (on this Zen 4 both issue one a cycle: 234 against 117 GFLOP/s a core).
//! As llama.cpp's BF16 kernels: the activations are rounded to bf16 (nearest, ties to even),
//! the weights are bf16 as stored or, in a multi-token panel of another format, rounded from
//! their decoded f32 values; each product is exact in f32 and the sums are f32. Not exact: held
//! to quality floors (tests/quant_quality.rs).
//!
//! - [`rows`]: one token's mat-vec over bf16 weights (decode).
//! - [`block`]: a panel of weight rows times several tokens, four rows by four tokens at a time
//!   (prefill, experts grouped by expert), after [`panel`] and [`round_into`].
//!
//! Written with the level's intrinsics rather than over `vector::Vector`: one level runs them,
//! and a level of its own would compile every other kernel once more.

use super::blocks::{Disjoint, Slots};
use super::vector::Simd;
use crate::model::weights::Matrix;
use crate::plan::budget::Math;
use crate::quant::DType;

/// Whether this CPU has the bf16 dot instructions (cached by the standard library).
pub fn detected() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512bf16") && std::arch::is_x86_feature_detected!("avx512bw");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether kernels at `simd` under `math` take bf16 dots: `--math fast` at the AVX-512 level of
/// a CPU with AVX512-BF16 (`DSRUN_CPU_SIMD` forcing a lower level turns them off too).
pub fn applies(simd: Simd, math: Math) -> bool {
    math == Math::Fast && simd == Simd::Avx512 && detected()
}

/// `x` rounded to bf16 (nearest, ties to even) into `out` (resized), as 16-bit words.
pub fn round_into(x: &[f32], out: &mut Vec<u16>) {
    out.clear();
    out.resize(x.len(), 0);
    round(x, out);
}

/// `x` rounded to bf16 into `out` (as long): by the vector instruction where the CPU has it
/// (it flushes subnormals to zero), else one at a time.
fn round(x: &[f32], out: &mut [u16]) {
    assert_eq!(x.len(), out.len(), "as many words as values");
    if detected() {
        // SAFETY: the CPU runs AVX512-BF16 (detected).
        #[cfg(target_arch = "x86_64")]
        return unsafe { x86::round(x, out) };
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = half::bf16::from_f32(v).to_bits();
    }
}

/// Rows `first..first + count` of `m` as bf16, `m.cols` values a row, in bytes: a bf16
/// matrix's stored rows as they are; any other format's rows decoded by `decode` (row, out)
/// into `decoded` and rounded into `rounded`.
pub fn panel<'p>(m: &'p Matrix, first: usize, count: usize, decode: &dyn Fn(usize, &mut [f32]), decoded: &'p mut Vec<f32>, rounded: &'p mut Vec<u16>) -> &'p [u8] {
    let cols = m.cols;
    if m.dtype == DType::BF16 {
        return &m.data.as_slice()[first * cols * 2..(first + count) * cols * 2];
    }
    // A row at a time, rounded while its decoded values are in L1.
    decoded.resize(cols, 0.0);
    rounded.resize(count * cols, 0);
    for (r, out) in rounded.chunks_exact_mut(cols).enumerate() {
        decode(first + r, decoded);
        round(decoded, out);
    }
    bytemuck::cast_slice(rounded)
}

/// Rows `first..first + dst.len()` of `m` (bf16) dotted with one token's `x` (bf16, `m.cols`
/// values), into `dst`.
pub fn rows(simd: Simd, m: &Matrix, first: usize, x: &[u16], dst: &mut [f32]) {
    let width = m.cols * 2;
    assert!(applies(simd, Math::Fast), "bf16 dots at {simd:?} on this CPU");
    assert!(m.dtype == DType::BF16 && x.len() == m.cols, "bf16 weights and an input of their width");
    let rows = &m.data.as_slice()[first * width..(first + dst.len()) * width];
    // SAFETY: the CPU runs AVX512-BF16 (asserted); the rows are `dst.len()` of `x.len()` values.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        x86::rows(rows, x, dst)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = rows;
        unreachable!("no bf16 dots off x86-64 (`applies` is false there)")
    }
}

/// `panel` (`count` rows of bf16, `cols` values each) times every slot's bf16 row, into
/// `out[slot * out_rows + first + r]` (or added to it): [`super::gemm`]'s block with bf16 dots.
#[allow(clippy::too_many_arguments)] // one block's whole description, as gemm::block_at's
pub fn block(simd: Simd, panel: &[u8], count: usize, slots: Slots<u16>, out: &Disjoint, out_rows: usize, first: usize, accumulate: bool) {
    assert!(applies(simd, Math::Fast), "bf16 dots at {simd:?} on this CPU");
    assert!(count > 0 && panel.len().is_multiple_of(2 * count), "a panel of {count} whole rows");
    let cols = panel.len() / 2 / count;
    assert!(slots.x.len().is_multiple_of(cols), "tokens of the panel's width");
    // SAFETY: the CPU runs AVX512-BF16 (asserted).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        x86::block(panel, count, cols, slots, out, out_rows, first, accumulate)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (slots, out, out_rows, first, accumulate);
        unreachable!("no bf16 dots off x86-64 (`applies` is false there)")
    }
}

/// FLOP a task of [`chains`] computes: 12 chains of 32 multiply-adds an instruction.
pub fn chain_flops(iterations: usize) -> f64 {
    (iterations * 12 * 32 * 2) as f64
}

/// Independent chains of bf16 dots held in registers, `iterations` times (the prefill's
/// arithmetic ceiling under bf16 dots, as `FmaChains` is the FMA's).
pub fn chains(iterations: usize) -> f32 {
    assert!(detected(), "bf16 dots on this CPU");
    // SAFETY: the CPU runs AVX512-BF16 (asserted).
    #[cfg(target_arch = "x86_64")]
    return unsafe { x86::chains(iterations) };
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("no bf16 dots off x86-64: {iterations}")
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::blocks::{Disjoint, Slots};
    use super::super::vector::{Avx512, Vector};
    use std::arch::x86_64::*;

    /// `x` rounded to bf16 into `out` (as long), 32 values an instruction.
    ///
    /// # Safety
    /// The CPU runs AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn round(x: &[f32], out: &mut [u16]) {
        assert_eq!(x.len(), out.len(), "as many words as values");
        let full = x.len() / STEP * STEP;
        for k in (0..full).step_by(STEP) {
            // SAFETY: 32 values at `k + 32 <= full` of both (asserted lengths).
            unsafe {
                let (lo, hi) = (_mm512_loadu_ps(x.as_ptr().add(k)), _mm512_loadu_ps(x.as_ptr().add(k + 16)));
                _mm512_storeu_si512(out.as_mut_ptr().add(k).cast(), std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
            }
        }
        for (o, &v) in out[full..].iter_mut().zip(&x[full..]) {
            *o = half::bf16::from_f32(v).to_bits();
        }
    }

    /// # Safety
    /// The CPU runs AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn chains(iterations: usize) -> f32 {
        let (a, b) = (_mm512_set1_epi16(0x3f80), _mm512_set1_epi16(0x3380));
        let (a, b) = unsafe { (std::mem::transmute::<__m512i, __m512bh>(a), std::mem::transmute::<__m512i, __m512bh>(b)) };
        let mut acc = [_mm512_setzero_ps(); 12];
        for _ in 0..iterations {
            for x in acc.iter_mut() {
                *x = _mm512_dpbf16_ps(*x, a, b);
            }
        }
        // Every chain feeds the result: an unused one would not be computed.
        let mut total = _mm512_setzero_ps();
        for x in acc {
            total = _mm512_add_ps(total, x);
        }
        // SAFETY: the level is the caller's contract.
        let sums = unsafe { sum4(total, _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()) };
        sums[0]
    }

    /// bf16 values a vector holds.
    const STEP: usize = 32;

    /// 32 bf16 values at `p`.
    ///
    /// # Safety
    /// The CPU runs AVX512-BF16; `p` points at 32 readable values.
    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m512bh {
        // SAFETY: the caller's contract.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p.cast())) }
    }

    /// The first `valid` (< 32) bf16 values at `p`, the rest zero.
    ///
    /// # Safety
    /// The CPU runs AVX512-BF16; `p` points at `valid` readable values.
    #[inline(always)]
    unsafe fn load_part(p: *const u8, valid: usize) -> __m512bh {
        // SAFETY: the caller's contract; a masked load reads only the `valid` values.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(((1u64 << valid) - 1) as u32, p.cast())) }
    }

    /// The sums of four vectors' lanes (loops and calls, no closures: a closure does not take
    /// the level's features, and its intrinsics would become calls).
    ///
    /// # Safety
    /// The CPU runs AVX-512.
    #[inline(always)]
    unsafe fn sum4(a: __m512, b: __m512, c: __m512, d: __m512) -> [f32; 4] {
        // SAFETY: the caller's contract.
        unsafe { Avx512::sum4([Avx512(a), Avx512(b), Avx512(c), Avx512(d)]) }
    }

    /// Bytes ahead of a row's loads that its dot prefetches (as the exact kernels').
    const PREFETCH_AHEAD: usize = 256;

    /// A row of `w` dotted with `x`. A row at a time, fetching ahead in the row: four rows
    /// at once, each fetching the next four's lines as the int8 mat-vec does, ran at 102
    /// tok/s on the 0.58B synth against this one's 139-151 (the exact kernel: 112-121).
    ///
    /// # Safety
    /// The CPU runs AVX512-BF16; `w` is `2 * x.len()` bytes.
    #[inline(always)]
    unsafe fn dot(w: &[u8], x: &[u16]) -> f32 {
        let cols = x.len();
        assert_eq!(w.len(), 2 * cols, "a row of the input's width");
        let (full, w, x) = (cols / STEP * STEP, w.as_ptr(), x.as_ptr().cast::<u8>());
        // SAFETY (every block): the level is the caller's contract; loads read values at
        // `k + 32 <= full` (or the `cols - full` of the tail) of the row and of `x`
        // (asserted lengths); a prefetch reads nothing. Two accumulators: one chain would
        // wait on the instruction's latency.
        let (mut even, mut odd) = unsafe { (_mm512_setzero_ps(), _mm512_setzero_ps()) };
        let mut k = 0;
        while k + 2 * STEP <= full {
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(2 * k + PREFETCH_AHEAD).cast());
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(2 * k + 64 + PREFETCH_AHEAD).cast());
                even = _mm512_dpbf16_ps(even, load(w.add(2 * k)), load(x.add(2 * k)));
                odd = _mm512_dpbf16_ps(odd, load(w.add(2 * k + 64)), load(x.add(2 * k + 64)));
            }
            k += 2 * STEP;
        }
        if k < full {
            even = unsafe { _mm512_dpbf16_ps(even, load(w.add(2 * k)), load(x.add(2 * k))) };
        }
        if full < cols {
            odd = unsafe { _mm512_dpbf16_ps(odd, load_part(w.add(2 * full), cols - full), load_part(x.add(2 * full), cols - full)) };
        }
        let sums = unsafe { sum4(even, odd, _mm512_setzero_ps(), _mm512_setzero_ps()) };
        sums[0] + sums[1]
    }

    /// # Safety
    /// The CPU runs AVX512-BF16; `w` holds `dst.len()` rows of `x.len()` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn rows(w: &[u8], x: &[u16], dst: &mut [f32]) {
        let width = 2 * x.len();
        for (out, row) in dst.iter_mut().zip(w.chunks_exact(width)) {
            // SAFETY: the caller's contract.
            *out = unsafe { dot(row, x) };
        }
    }

    /// Four panel rows times four tokens, each a dot over the `cols` columns.
    ///
    /// # Safety
    /// The CPU runs AVX512-BF16; every row holds `cols` values (`2 * cols` bytes).
    #[inline(always)]
    unsafe fn micro(w: [*const u8; 4], x: [*const u8; 4], cols: usize) -> [[f32; 4]; 4] {
        let full = cols / STEP * STEP;
        // SAFETY (every block): the caller's contract; loads read values at `k + 32 <= full`
        // or the `cols - full` of the tail.
        let mut acc = [[unsafe { _mm512_setzero_ps() }; 4]; 4];
        let mut ws = [unsafe { load_part(w[0], 0) }; 4];
        let mut k = 0;
        while k < cols {
            let valid = STEP.min(cols - k);
            let part = valid < STEP;
            for i in 0..4 {
                ws[i] = unsafe {
                    if part {
                        load_part(w[i].add(2 * k), valid)
                    } else {
                        load(w[i].add(2 * k))
                    }
                };
            }
            for j in 0..4 {
                let xs = unsafe {
                    if part {
                        load_part(x[j].add(2 * k), valid)
                    } else {
                        load(x[j].add(2 * k))
                    }
                };
                for i in 0..4 {
                    acc[i][j] = unsafe { _mm512_dpbf16_ps(acc[i][j], ws[i], xs) };
                }
            }
            k += if part { valid } else { STEP };
            debug_assert!(k <= full || k == cols);
        }
        let mut out = [[0f32; 4]; 4];
        for i in 0..4 {
            out[i] = unsafe { sum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]) };
        }
        out
    }

    /// # Safety
    /// The CPU runs AVX512-BF16; `panel` holds `count` rows of `cols` values; no other
    /// thread writes these rows of these slots' outputs.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[allow(clippy::too_many_arguments)] // as the safe wrapper's
    pub unsafe fn block(panel: &[u8], count: usize, cols: usize, slots: Slots<u16>, out: &Disjoint, out_rows: usize, first: usize, accumulate: bool) {
        let n = slots.slots.len();
        // Rows and tokens past the block's end repeat the last one (computed, never stored).
        let mut x = [std::ptr::null::<u8>(); 4];
        let mut w = [std::ptr::null::<u8>(); 4];
        for t in (0..n).step_by(4) {
            for (j, x) in x.iter_mut().enumerate() {
                *x = slots.row((t + j).min(n - 1), cols).as_ptr().cast();
            }
            for r in (0..count).step_by(4) {
                for (i, w) in w.iter_mut().enumerate() {
                    *w = panel[(r + i).min(count - 1) * cols * 2..].as_ptr();
                }
                // SAFETY: the caller's contract; every pointer starts a row of `cols` values.
                let y = unsafe { micro(w, x, cols) };
                for (j, &slot) in slots.slots[t..n.min(t + 4)].iter().enumerate() {
                    for (i, row) in y.iter().enumerate().take(count - r) {
                        // SAFETY: the caller's contract (these rows of these slots).
                        unsafe { out.store(slot as usize * out_rows + first + r + i, row[j], accumulate) };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::blocks::{Disjoint, Slots};
    use super::*;
    use crate::model::weights::Matrix;

    /// Deterministic values in about [-1, 1].
    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32).map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed.wrapping_mul(40503)) >> 8) as f32 / (1 << 24) as f32) * 2.0 - 1.0).collect()
    }

    fn rounded(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect()
    }

    /// The panel block against f64 sums of the bf16-rounded decoded weights and tokens, for
    /// every stored format (bf16 read as stored, the rest decoded and rounded), panels of one
    /// to sixteen rows, widths with and without a tail past 32, tokens read once (`x_div` 1)
    /// and by several slots (2), set and added. Tolerance: 1e-5 of each dot's Σ|w x| (f32
    /// sums of exact products; a kernel that skipped the rounding or a tail fails it).
    #[test]
    fn panel_blocks_match_rounded_dots() {
        let simd = Simd::detect();
        if !applies(simd, Math::Fast) {
            // tests/cpu_backend.rs reports this machine's lack of bf16 dots to CI.
            eprintln!("no bf16 dots at {simd:?} on this CPU: not run");
            return;
        }
        for dtype in [DType::BF16, DType::F32, DType::F8E4M3, DType::Q8, DType::Q4] {
            for (count, cols) in [(16, 352), (5, 1031), (1, 64), (9, 150)] {
                let rows = count + 3;
                let m = Matrix::from_values("w", rows, cols, dtype, &values(rows * cols, cols as u32), (128, 128));
                let (mut decoded, mut words) = (Vec::new(), Vec::new());
                let panel = super::panel(&m, 2, count, &|r, out| m.decode_row(r, out), &mut decoded, &mut words).to_vec();
                let mut row = vec![0f32; cols];
                let weights: Vec<Vec<f32>> = (0..count)
                    .map(|r| {
                        m.decode_row(2 + r, &mut row);
                        rounded(&row)
                    })
                    .collect();
                for (tokens, x_div) in [(1usize, 1usize), (3, 1), (7, 2)] {
                    let x: Vec<f32> = values(tokens.div_ceil(x_div) * cols, 9).iter().map(|v| v * 4.0).collect();
                    let mut x16 = Vec::new();
                    round_into(&x, &mut x16);
                    let xr = rounded(&x);
                    let slots: Vec<u32> = (0..tokens as u32).rev().collect();
                    for accumulate in [false, true] {
                        let base = values(tokens * rows, 5);
                        let mut out = base.clone();
                        block(simd, &panel, count, Slots { x: &x16, x_div, slots: &slots }, &Disjoint::new(&mut out), rows, 2, accumulate);
                        for s in 0..tokens {
                            let xs = &xr[(s / x_div) * cols..][..cols];
                            for (r, w) in weights.iter().enumerate() {
                                let want = w.iter().zip(xs).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() as f32 + if accumulate { base[s * rows + 2 + r] } else { 0.0 };
                                let size: f32 = w.iter().zip(xs).map(|(a, b)| (a * b).abs()).sum();
                                let got = out[s * rows + 2 + r];
                                assert!((got - want).abs() <= 1e-5 * size.max(1.0), "{dtype:?} {count}x{cols}, slot {s} of {tokens} (x_div {x_div}), row {r}: {got} against {want}");
                            }
                            // Rows outside the block are untouched.
                            assert_eq!(out[s * rows], base[s * rows], "{dtype:?}: row 0 of slot {s}");
                        }
                    }
                }
            }
        }
    }
}
