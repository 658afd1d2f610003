//! The CPU backend's one-token matmul (decode): `y = W x` with W read in its stored format
//! (f32, bf16, f16, FP8 with block scales, q8, q4), each row a dot fused with its stored bytes,
//! so each weight byte is read once and nothing is written back. Several tokens take the
//! blocked kernel in `gemm`. Sums are f32 (exact decoding; only the order of the sums differs
//! from the reference's).
//!
//! Written once over the level's [`Vector`] and compiled per level by [`dispatch`]. A row's
//! dot keeps four accumulators: one chain of multiply-adds would wait on the FMA's latency,
//! not on memory.

use super::bf16;
use super::gguf_dot;
use super::input::{Input, Int8, GROUP};
use super::vector::{dispatch, AtLevel, Simd, Vector, LANES};
use super::vector::{prefetch_line, PREFETCH_AHEAD};
use crate::model::weights::Matrix;
use crate::plan::budget::Math;
use crate::quant::{fp8_table, DType};

/// How stored values become f32 lanes (the mat-vecs' fused dots; the blocked matmul's
/// panel decode).
pub(super) trait Decode {
    const BYTES: usize;
    /// One value.
    fn decode(b: &[u8], table: &[f32; 256]) -> f32;
    /// `LANES` values from `p`.
    ///
    /// # Safety
    /// The CPU runs `V`'s level; `p` points at `LANES * BYTES` readable bytes.
    #[inline(always)]
    unsafe fn load<V: Vector>(p: *const u8, table: &[f32; 256]) -> V {
        // SAFETY: the caller's contract.
        let bytes = unsafe { std::slice::from_raw_parts(p, LANES * Self::BYTES) };
        let lanes: [f32; LANES] = std::array::from_fn(|i| Self::decode(&bytes[i * Self::BYTES..], table));
        // SAFETY: as above; `lanes` holds `LANES` values.
        unsafe { V::load(lanes.as_ptr()) }
    }
}

pub(super) struct F32s;
impl Decode for F32s {
    const BYTES: usize = 4;
    #[inline(always)]
    fn decode(b: &[u8], _: &[f32; 256]) -> f32 {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    #[inline(always)]
    unsafe fn load<V: Vector>(p: *const u8, _: &[f32; 256]) -> V {
        // SAFETY: the caller's contract (unaligned loads).
        unsafe { V::load(p as *const f32) }
    }
}

pub(super) struct Bf16s;
impl Decode for Bf16s {
    const BYTES: usize = 2;
    #[inline(always)]
    fn decode(b: &[u8], _: &[f32; 256]) -> f32 {
        f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)
    }
    #[inline(always)]
    unsafe fn load<V: Vector>(p: *const u8, _: &[f32; 256]) -> V {
        // SAFETY: the caller's contract.
        unsafe { V::load_bf16(p) }
    }
}

/// FP8 e4m3 through its 256-entry table.
pub(super) struct Fp8s;
impl Decode for Fp8s {
    const BYTES: usize = 1;
    #[inline(always)]
    fn decode(b: &[u8], table: &[f32; 256]) -> f32 {
        table[b[0] as usize]
    }
    #[inline(always)]
    unsafe fn load<V: Vector>(p: *const u8, table: &[f32; 256]) -> V {
        // SAFETY: the caller's contract.
        unsafe { V::load_e4m3(p, table) }
    }
}

pub(super) struct Q8s;
impl Decode for Q8s {
    const BYTES: usize = 1;
    #[inline(always)]
    fn decode(b: &[u8], _: &[f32; 256]) -> f32 {
        b[0] as i8 as f32
    }
    #[inline(always)]
    unsafe fn load<V: Vector>(p: *const u8, _: &[f32; 256]) -> V {
        // SAFETY: the caller's contract.
        unsafe { V::load_i8(p) }
    }
}

/// `Σ decode(w_c) x_c` over one run of stored values.
///
/// # Safety
/// The CPU runs `V`'s level.
#[inline(always)]
unsafe fn dot_run<V: Vector, D: Decode>(w: &[u8], x: &[f32], table: &[f32; 256]) -> f32 {
    let len = x.len();
    assert_eq!(w.len(), len * D::BYTES, "a row of the run's width");
    // SAFETY (every block): the level is the caller's contract; each load reads `LANES`
    // values at `k + LANES <= len` (asserted widths).
    let load = |k: usize| unsafe { (D::load::<V>(w.as_ptr().add(k * D::BYTES), table), V::load(x.as_ptr().add(k))) };
    let mut acc = [unsafe { V::zero() }; 4];
    let mut k = 0;
    while k + 4 * LANES <= len {
        prefetch::<D>(w, k);
        for (i, acc) in acc.iter_mut().enumerate() {
            let (w, x) = load(k + i * LANES);
            *acc = unsafe { V::mul_add(w, x, *acc) };
        }
        k += 4 * LANES;
    }
    while k + LANES <= len {
        let (w, x) = load(k);
        acc[0] = unsafe { V::mul_add(w, x, acc[0]) };
        k += LANES;
    }
    let mut sum: f32 = unsafe { V::sum4(acc) }.iter().sum();
    for c in k..len {
        sum += D::decode(&w[c * D::BYTES..], table) * x[c];
    }
    sum
}

/// A row in format `D` dotted with `x`, each block of `scales` (FP8 blocks, q8 groups)
/// scaled. Blocks of whole vectors are summed in vectors and added scaled into four
/// accumulators (a horizontal sum per block would cost more than a q8 group's products).
///
/// # Safety
/// The CPU runs `V`'s level.
#[inline(always)]
unsafe fn dot_scaled<V: Vector, D: Decode>(row: &[u8], x: &[f32], scales: Option<(&[f32], usize)>, table: &[f32; 256]) -> f32 {
    // SAFETY (every block): the caller's contract.
    let Some((grid_row, block)) = scales else { return unsafe { dot_run::<V, D>(row, x, table) } };
    let len = x.len();
    assert_eq!(row.len(), len * D::BYTES, "a row of the input's width");
    if block % LANES != 0 {
        let mut sum = 0f32;
        for (b, &scale) in grid_row.iter().enumerate() {
            let cols = b * block..len.min((b + 1) * block);
            sum += unsafe { dot_run::<V, D>(&row[cols.start * D::BYTES..cols.end * D::BYTES], &x[cols], table) } * scale;
        }
        return sum;
    }
    let full = len / LANES * LANES;
    // Two accumulators, even and odd blocks (a q8 group is two vectors: one chain would wait
    // on the FMA's latency), named rather than indexed so they stay in registers.
    let (mut even, mut odd) = (unsafe { V::zero() }, unsafe { V::zero() });
    for (b, &scale) in grid_row.iter().enumerate().take(full.div_ceil(block)) {
        let (start, end) = (b * block, full.min((b + 1) * block));
        let mut part = unsafe { V::zero() };
        for v in 0..(end - start) / LANES {
            let k = start + v * LANES;
            if k.is_multiple_of(4 * LANES) {
                prefetch::<D>(row, k);
            }
            // SAFETY: `k + LANES <= full <= len` (asserted width).
            part = unsafe { V::mul_add(D::load::<V>(row.as_ptr().add(k * D::BYTES), table), V::load(x.as_ptr().add(k)), part) };
        }
        if b % 2 == 0 {
            even = unsafe { V::mul_add(V::splat(scale), part, even) };
        } else {
            odd = unsafe { V::mul_add(V::splat(scale), part, odd) };
        }
    }
    let zero = unsafe { V::zero() };
    let sum: f32 = unsafe { V::sum4([even, odd, zero, zero]) }[..2].iter().sum();
    let tail: f32 = (full..len).map(|c| D::decode(&row[c * D::BYTES..], table) * x[c]).sum();
    sum + if full < len { tail * grid_row[full / block] } else { 0.0 }
}

/// A q4 row (two codes a byte, the low nibble first) dotted with `x`: per group of `block`
/// columns `scale Σ q x + min Σ x`, both sums in vectors.
///
/// # Safety
/// The CPU runs `V`'s level.
#[inline(always)]
unsafe fn dot_q4<V: Vector>(row: &[u8], x: &[f32], groups: &[f32], block: usize) -> f32 {
    let len = x.len();
    assert!(row.len() * 2 == len && groups.len() == 2 * len.div_ceil(block) && block.is_multiple_of(LANES), "a q4 row of the input's width");
    let full = len / LANES * LANES;
    // SAFETY (every block): the level is the caller's contract; loads read `LANES` values (and
    // `LANES / 2` bytes) at `k + LANES <= full <= len`.
    // Fixed accumulators (scaled sums, minima's sums), so they stay in registers.
    let (mut scaled, mut shifted, one) = (unsafe { V::zero() }, unsafe { V::zero() }, unsafe { V::splat(1.0) });
    for (g, group) in groups.chunks_exact(2).enumerate().take(full.div_ceil(block)) {
        let (start, end) = (g * block, full.min((g + 1) * block));
        let (mut part, mut sum) = (unsafe { V::zero() }, unsafe { V::zero() });
        for v in 0..(end - start) / LANES {
            let k = start + v * LANES;
            if k.is_multiple_of(4 * LANES) {
                prefetch::<Q8s>(row, k / 2);
            }
            let xv = unsafe { V::load(x.as_ptr().add(k)) };
            part = unsafe { V::mul_add(V::load_u4(row.as_ptr().add(k / 2)), xv, part) };
            sum = unsafe { V::mul_add(one, xv, sum) };
        }
        scaled = unsafe { V::mul_add(V::splat(group[0]), part, scaled) };
        shifted = unsafe { V::mul_add(V::splat(group[1]), sum, shifted) };
    }
    let zero = unsafe { V::zero() };
    let mut total: f32 = unsafe { V::sum4([scaled, shifted, zero, zero]) }[..2].iter().sum();
    for c in full..len {
        let (q, group) = ((row[c / 2] >> (4 * (c % 2))) & 0xf, &groups[2 * (c / block)..]);
        total += (q as f32 * group[0] + group[1]) * x[c];
    }
    total
}

/// A bf16 row dotted with `pairs` (the input, each full 32 values evens then odds: see
/// [`Vector::load_bf16_pairs`]). Exact, as [`dot_run`].
///
/// # Safety
/// The CPU runs `V`'s level.
#[inline(always)]
unsafe fn dot_bf16_pairs<V: Vector>(row: &[u8], pairs: &[f32]) -> f32 {
    let len = pairs.len();
    assert_eq!(row.len(), 2 * len, "a bf16 row of the input's width");
    let full = len / GROUP * GROUP;
    // SAFETY (every block): the level is the caller's contract; each block reads 32 values
    // (64 bytes) at `k + 32 <= full <= len` (asserted widths).
    let block = |k: usize| unsafe {
        let (even, odd) = V::load_bf16_pairs(row.as_ptr().add(2 * k));
        (even, odd, V::load(pairs.as_ptr().add(k)), V::load(pairs.as_ptr().add(k + LANES)))
    };
    let mut acc = [unsafe { V::zero() }; 4];
    let mut k = 0;
    while k + 2 * GROUP <= full {
        prefetch::<Bf16s>(row, k);
        for half in 0..2 {
            let (even, odd, x_even, x_odd) = block(k + half * GROUP);
            acc[2 * half] = unsafe { V::mul_add(even, x_even, acc[2 * half]) };
            acc[2 * half + 1] = unsafe { V::mul_add(odd, x_odd, acc[2 * half + 1]) };
        }
        k += 2 * GROUP;
    }
    if k < full {
        let (even, odd, x_even, x_odd) = block(k);
        acc[0] = unsafe { V::mul_add(even, x_even, acc[0]) };
        acc[1] = unsafe { V::mul_add(odd, x_odd, acc[1]) };
    }
    let mut sum: f32 = unsafe { V::sum4(acc) }.iter().sum();
    for c in full..len {
        sum += Bf16s::decode(&row[2 * c..], &[0.0; 256]) * pairs[c];
    }
    sum
}

/// Row `r` of a q8 or q4 matrix (groups of 32) dotted with int8 activations: per pair of
/// groups an integer dot, scaled by the weights' and the activations' group scales; for q4
/// `Σ_g min_g Σ x` added from the activations' group sums.
///
/// # Safety
/// The CPU runs `V`'s level; `x` was laid out for `m` ([`super::input::takes_int8`]).
#[inline(always)]
unsafe fn int8_row<V: Vector>(m: &Matrix, r: usize, x: Int8) -> f32 {
    // The format a constant of the loops (a run-time flag stayed in them as branches).
    // SAFETY: the caller's contract.
    match m.dtype {
        DType::Q4 => unsafe { int8_row_of::<V, true>(m, r, x) },
        DType::Q8_0 | DType::Q4_K | DType::Q5_K | DType::Q5_0 | DType::Q6_K => {
            let width = m.dtype.format().bytes(m.cols);
            unsafe { gguf_dot::dot_int8::<V>(m.dtype, &m.data.as_slice()[r * width..(r + 1) * width], x) }
        }
        _ => unsafe { int8_row_of::<V, false>(m, r, x) },
    }
}

/// [`int8_row`] for q4 (`Q4`) or q8 weights. A row at a time, fetching `PREFETCH_AHEAD`
/// bytes ahead in it: four rows at once sharing the activations' loads, each fetching the
/// next four's lines, decoded the 0.58B synth's q8 at 140-156 tok/s against this one's
/// 173-201 (q4 the same, 191-250), once the rows were 64-byte aligned.
///
/// # Safety
/// As [`int8_row`].
#[inline(always)]
unsafe fn int8_row_of<V: Vector, const Q4: bool>(m: &Matrix, r: usize, x: Int8) -> f32 {
    let (len, groups) = (x.codes.len(), x.codes.len() / GROUP);
    assert_eq!(Q4, m.dtype == DType::Q4, "the matrix's format");
    // Bytes of a row, and of the scales (q4: interleaved (scale, min) pairs) per group.
    let (width, per_group) = if Q4 { (len / 2, 2) } else { (len, 1) };
    let params = &m.scales.as_ref().expect("q8 and q4 carry group scales").values;
    assert!(m.cols == len && len.is_multiple_of(GROUP) && x.lane_scales.len() == groups.div_ceil(2) * LANES && x.sums.len() == 2 * groups, "int8 activations of the matrix's width");
    let (row, scales) = (&m.data.as_slice()[r * width..][..width], &params[r * groups * per_group..][..groups * per_group]);
    // SAFETY (every block): the level is the caller's contract; reads stay inside the row,
    // the codes, the scales (sliced and asserted lengths): a pair `p` reads weight bytes
    // `[p * 64 / per_byte, +64 / per_byte)`, codes `[64p, 64p + 64)`, lane scales
    // `[16p, 16p + 16)` and group scales `2p` and `2p + 1` (times `per_group`).
    let mut acc = unsafe { V::zero() };
    let pairs = groups / 2;
    for pair in 0..pairs {
        let k = pair * 2 * GROUP;
        // A cache line of weights per pair (q8) or per two pairs (q4).
        if !Q4 || pair % 2 == 0 {
            prefetch_line(row.as_ptr().wrapping_add(PREFETCH_AHEAD + if Q4 { k / 2 } else { k }));
        }
        let lane_scales = unsafe { V::load(x.lane_scales.as_ptr().add(LANES * pair)) };
        let scale = unsafe { V::mul(V::expand_pair(scales.as_ptr().add(2 * pair * per_group), per_group), lane_scales) };
        acc = unsafe { V::mul_add(int8_dot::<V, Q4, false>(row, k, x.codes), scale, acc) };
    }
    if !groups.is_multiple_of(2) {
        // The last group alone: its lanes 8..16 are zero.
        let k = pairs * 2 * GROUP;
        let lane_scales = unsafe { V::load(x.lane_scales.as_ptr().add(LANES * pairs)) };
        let scale = unsafe { V::mul(V::splat(scales[2 * pairs * per_group]), lane_scales) };
        acc = unsafe { V::mul_add(int8_dot::<V, Q4, true>(row, k, x.codes), scale, acc) };
    }
    let mut tail = 0f32;
    if Q4 {
        // The minima: (scale, min) pairs against (0, Σ x) pairs.
        let whole = 2 * groups / LANES * LANES;
        for c in (0..whole).step_by(LANES) {
            acc = unsafe { V::mul_add(V::load(scales.as_ptr().add(c)), V::load(x.sums.as_ptr().add(c)), acc) };
        }
        tail = scales[whole..].iter().zip(&x.sums[whole..]).map(|(g, s)| g * s).sum();
    }
    unsafe { acc.sum() + tail }
}

/// The integer dot of a pair of groups from value `k` on (or of one group: `HALF`), q8 or q4.
/// A function, not a closure: closures do not take the level's target features, and their
/// intrinsics would become calls.
///
/// # Safety
/// The CPU runs `V`'s level; the row and the codes hold the values read.
#[inline(always)]
unsafe fn int8_dot<V: Vector, const Q4: bool, const HALF: bool>(row: &[u8], k: usize, codes: &[i8]) -> V {
    // SAFETY: the caller's contract.
    unsafe {
        match (Q4, HALF) {
            (false, false) => V::dot_i8(row.as_ptr().add(k), codes.as_ptr().add(k)),
            (false, true) => V::dot_i8_half(row.as_ptr().add(k), codes.as_ptr().add(k)),
            (true, false) => V::dot_u4(row.as_ptr().add(k / 2), codes.as_ptr().add(k)),
            (true, true) => V::dot_u4_half(row.as_ptr().add(k / 2), codes.as_ptr().add(k)),
        }
    }
}

/// Prefetches the cache lines `PREFETCH_AHEAD` bytes past the `4 * LANES` values from `k` on.
#[inline(always)]
fn prefetch<D: Decode>(w: &[u8], k: usize) {
    for line in 0..D::BYTES {
        prefetch_line(w.as_ptr().wrapping_add(k * D::BYTES + PREFETCH_AHEAD + 64 * line));
    }
}

/// Row `r` of `m` dotted with the input, fused from the stored bytes (in the input's layout for
/// the format where it has one); or decoded into `scratch` first for the formats that do not
/// decode value by value (f16, q4 with odd groups).
///
/// # Safety
/// The CPU runs `V`'s level.
#[inline(always)]
unsafe fn row_dot<V: Vector>(m: &Matrix, r: usize, input: Input, scratch: &mut [f32]) -> f32 {
    let (table, x) = (fp8_table(), input.x);
    // SAFETY (the fast layouts): the caller's contract; `Layouts::prepare` laid them out for `m`.
    if let (DType::BF16, Some(pairs)) = (m.dtype, input.pairs) {
        return unsafe { dot_bf16_pairs::<V>(&m.data.as_slice()[r * m.cols * 2..(r + 1) * m.cols * 2], pairs) };
    }
    if let Some(int8) = input.int8 {
        return unsafe { int8_row::<V>(m, r, int8) };
    }
    if m.dtype == DType::Q4 {
        if let Some(groups) = m.scales.as_ref().filter(|g| g.block_cols % LANES == 0 && m.cols.is_multiple_of(2)) {
            let row = &m.data.as_slice()[r * m.cols / 2..(r + 1) * m.cols / 2];
            // SAFETY: the caller's contract.
            return unsafe { dot_q4::<V>(row, x, &groups.values[r * groups.grid_cols * 2..][..groups.grid_cols * 2], groups.block_cols) };
        }
    }
    if gguf_dot::takes(m.dtype) {
        let width = m.dtype.format().bytes(m.cols);
        // SAFETY: the caller's contract.
        return unsafe { gguf_dot::dot::<V>(m.dtype, &m.data.as_slice()[r * width..(r + 1) * width], x) };
    }
    if matches!(m.dtype, DType::F16 | DType::Q4) {
        m.decode_row(r, scratch);
        // SAFETY: the caller's contract.
        return unsafe { dot_run::<V, F32s>(bytemuck::cast_slice(scratch), x, table) };
    }
    let width = m.dtype.format().bytes(m.cols);
    let row = &m.data.as_slice()[r * width..(r + 1) * width];
    let scales = m.scales.as_ref().map(|s| (&s.values[(r / s.block_rows) * s.grid_cols..][..s.grid_cols], s.block_cols));
    // SAFETY (every arm): the caller's contract.
    unsafe {
        match m.dtype {
            DType::F32 => dot_scaled::<V, F32s>(row, x, scales, table),
            DType::BF16 => dot_scaled::<V, Bf16s>(row, x, scales, table),
            DType::F8E4M3 => dot_scaled::<V, Fp8s>(row, x, scales, table),
            DType::Q8 => dot_scaled::<V, Q8s>(row, x, scales, table),
            _ => unreachable!("decoded above"),
        }
    }
}

/// Rows `first..first + dst.len()` of `m` dotted with one token's input (laid out for `m` by
/// [`super::input::Layouts::prepare`], or plain), into `dst`. `scratch`: a row of `m.cols`
/// values.
pub fn rows_at(simd: Simd, m: &Matrix, first: usize, x: Input, dst: &mut [f32], scratch: &mut [f32]) {
    if let Some(x) = x.bf16.filter(|_| bf16::applies(simd, Math::Fast)) {
        return bf16::rows(simd, m, first, x, dst);
    }
    dispatch(simd, Rows { m, first, x, dst, scratch })
}

struct Rows<'a> {
    m: &'a Matrix,
    first: usize,
    x: Input<'a>,
    dst: &'a mut [f32],
    scratch: &'a mut [f32],
}

impl AtLevel for Rows<'_> {
    type Output = ();
    #[inline(always)]
    unsafe fn run<V: Vector>(self) {
        let Rows { m, first, x, dst, scratch } = self;
        for (i, out) in dst.iter_mut().enumerate() {
            // SAFETY: the caller's contract.
            *out = unsafe { row_dot::<V>(m, first + i, x, scratch) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::input::Layouts;
    use super::*;
    use crate::plan::budget::Math;

    /// Deterministic values in about [-1, 1].
    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32).map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed.wrapping_mul(40503)) >> 8) as f32 / (1 << 24) as f32) * 2.0 - 1.0).collect()
    }

    /// `x` as `--math fast` quantises it (llama.cpp's Q8_0 rule, restated here): per group of
    /// 32, `round(x / d) * d` with `d = max |x| / 127`, ties to even.
    fn dequantised(x: &[f32]) -> Vec<f32> {
        x.chunks(GROUP)
            .flat_map(|g| {
                let d = g.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                g.iter().map(move |v| if d == 0.0 { 0.0 } else { (v * (1.0 / d)).round_ties_even() * d })
            })
            .collect()
    }

    /// Every row of `m` through `rows_at` with `x` laid out for `math`, at `simd`: the first
    /// alone, the rest in one call (a run not starting at row 0).
    fn all_rows(simd: Simd, m: &Matrix, x: &[f32], math: Math) -> Vec<f32> {
        let (mut layouts, mut out, mut scratch) = (Layouts::default(), vec![0f32; m.rows], vec![0f32; m.cols]);
        let input = layouts.prepare(x, m, math);
        let (first, rest) = out.split_at_mut(1);
        rows_at(simd, m, 0, input, first, &mut scratch);
        rows_at(simd, m, 1, input, rest, &mut scratch);
        out
    }

    /// The rows' f32 dots with `x` (decoded rows, sums in f64).
    fn reference(m: &Matrix, x: &[f32]) -> Vec<f32> {
        let mut row = vec![0f32; m.cols];
        (0..m.rows)
            .map(|r| {
                m.decode_row(r, &mut row);
                row.iter().zip(x).map(|(w, x)| *w as f64 * *x as f64).sum::<f64>() as f32
            })
            .collect()
    }

    /// The layouts' kernels at every level against decoded rows: bf16 pairs exactly (up to the
    /// order of f32 sums), int8 activations against the same dot of the dequantised
    /// activations (so the integer kernels' only error is f32 rounding: 1e-5 of the row's
    /// Σ|w x|). Widths: one group, pairs, an odd group count (V2-Lite's experts are 1408 = 44
    /// groups, the 0.58B synth's 352 = 11), and a tail past the groups (bf16).
    #[test]
    fn laid_out_inputs_match_decoded_rows_at_every_level() {
        for cols in [32, 64, 96, 352, 1056, 1024 + 7] {
            let rows = 5;
            let w = values(rows * cols, cols as u32);
            let x: Vec<f32> = values(cols, 7).iter().map(|v| v * 3.0).collect();
            for dtype in [DType::BF16, DType::Q8, DType::Q4] {
                if dtype != DType::BF16 && !cols.is_multiple_of(GROUP) {
                    continue;
                }
                let m = Matrix::from_values("w", rows, cols, dtype, &w, (128, 128));
                let math = if dtype == DType::BF16 { Math::Exact } else { Math::Fast };
                let mut want = reference(&m, &if math == Math::Fast { dequantised(&x) } else { x.clone() });
                // bf16 weights under `--math fast`: the activations rounded to bf16 where the
                // level has bf16 dots, else the exact kernel's.
                let bf16_dots = reference(&m, &x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect::<Vec<_>>());
                if dtype == DType::Q4 {
                    // q4's minima meet the exact activations' group sums.
                    let (exact, rounded) = (x.chunks(GROUP).map(|g| g.iter().sum::<f32>()), dequantised(&x));
                    let shift: Vec<f32> = exact.zip(rounded.chunks(GROUP)).map(|(e, r)| e - r.iter().sum::<f32>()).collect();
                    let groups = &m.scales.as_ref().unwrap().values;
                    for (r, want) in want.iter_mut().enumerate() {
                        *want += shift.iter().enumerate().map(|(g, d)| groups[2 * (r * shift.len() + g) + 1] * d).sum::<f32>();
                    }
                }
                let mut row = vec![0f32; cols];
                let magnitude: Vec<f32> = (0..rows)
                    .map(|r| {
                        m.decode_row(r, &mut row);
                        row.iter().zip(&x).map(|(w, x)| (w * x).abs()).sum()
                    })
                    .collect();
                for simd in Simd::available() {
                    let mut runs = vec![(math, &want)];
                    if dtype == DType::BF16 {
                        runs.push((Math::Fast, if bf16::applies(simd, Math::Fast) { &bf16_dots } else { &want }));
                    }
                    for (math, want) in runs {
                        let got = all_rows(simd, &m, &x, math);
                        for r in 0..rows {
                            let error = (got[r] - want[r]).abs();
                            assert!(error <= 1e-5 * magnitude[r], "{dtype:?} {math:?} {cols} columns at {}: row {r} gave {}, the reference {}", simd.name(), got[r], want[r]);
                        }
                    }
                }
            }
        }
    }

    /// `--math fast` changes the q8/q4 results, and bf16's where the CPU has bf16 dots (the
    /// test above would pass an exact kernel too).
    #[test]
    fn fast_math_quantises_the_activations() {
        let (rows, cols) = (4, 256);
        let w = values(rows * cols, 3);
        let x = values(cols, 11);
        let bf16 = bf16::applies(Simd::detect(), Math::Fast).then_some(DType::BF16);
        for dtype in [DType::Q8, DType::Q4].into_iter().chain(bf16) {
            let m = Matrix::from_values("w", rows, cols, dtype, &w, (128, 128));
            let simd = Simd::detect();
            assert_ne!(all_rows(simd, &m, &x, Math::Fast), all_rows(simd, &m, &x, Math::Exact), "{dtype:?}");
        }
    }
}
