//! The CPU backend's one-token matmul (decode): `y = W x` with W read in its stored format
//! (f32, bf16, f16, FP8 with block scales, q8, q4), each row a dot fused with its stored bytes,
//! so each weight byte is read once and nothing is written back. Several tokens take the
//! blocked kernel in `gemm`. Sums are f32 (exact decoding; only the order of the sums differs
//! from the reference's).
//!
//! Written once over the level's [`Vector`] and compiled per level by [`dispatch`]. A row's
//! dot keeps four accumulators: one chain of multiply-adds would wait on the FMA's latency,
//! not on memory.

use super::vector::{dispatch, AtLevel, Simd, Vector, LANES};
use crate::model::weights::Matrix;
use crate::quant::{fp8_table, DType};

/// How stored values become f32 lanes.
trait Decode {
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

struct F32s;
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

struct Bf16s;
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
struct Fp8s;
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

struct Q8s;
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

/// Bytes ahead of the loads a row's dot prefetches. The hardware prefetcher alone left decode
/// at ~115 tok/s on the 0.58B synth (2 threads); 256 bytes ahead reached ~135, while 640 and
/// more fell below 120 (rows are 0.7-2 KiB: far prefetches land in rows another thread reads).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const PREFETCH_AHEAD: usize = 256;

/// Prefetches the cache lines `PREFETCH_AHEAD` bytes past the `4 * LANES` values from `k` on
/// (x86-64; a hint elsewhere left to the hardware).
#[inline(always)]
fn prefetch<D: Decode>(w: &[u8], k: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in 0..D::BYTES {
        let ahead = w.as_ptr().wrapping_add(k * D::BYTES + PREFETCH_AHEAD + 64 * line) as *const i8;
        // SAFETY: a prefetch is a hint: it never faults, whatever the address.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(ahead) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (w, k);
}

/// Row `r` of `m` dotted with `x`, fused from the stored bytes; or decoded into `scratch`
/// first for the formats that do not decode value by value (f16, q4).
///
/// # Safety
/// The CPU runs `V`'s level.
#[inline(always)]
unsafe fn row_dot<V: Vector>(m: &Matrix, r: usize, x: &[f32], scratch: &mut [f32]) -> f32 {
    let table = fp8_table();
    if m.dtype == DType::Q4 {
        if let Some(groups) = m.scales.as_ref().filter(|g| g.block_cols % LANES == 0 && m.cols.is_multiple_of(2)) {
            let row = &m.data.as_slice()[r * m.cols / 2..(r + 1) * m.cols / 2];
            // SAFETY: the caller's contract.
            return unsafe { dot_q4::<V>(row, x, &groups.values[r * groups.grid_cols * 2..][..groups.grid_cols * 2], groups.block_cols) };
        }
    }
    if matches!(m.dtype, DType::F16 | DType::Q4) {
        m.decode_row(r, scratch);
        // SAFETY: the caller's contract.
        return unsafe { dot_run::<V, F32s>(bytemuck::cast_slice(scratch), x, table) };
    }
    let width = m.cols * m.dtype.size_bytes();
    let row = &m.data.as_slice()[r * width..(r + 1) * width];
    let scales = m.scales.as_ref().map(|s| (&s.values[(r / s.block_rows) * s.grid_cols..][..s.grid_cols], s.block_cols));
    // SAFETY (every arm): the caller's contract.
    unsafe {
        match m.dtype {
            DType::F32 => dot_scaled::<V, F32s>(row, x, scales, table),
            DType::BF16 => dot_scaled::<V, Bf16s>(row, x, scales, table),
            DType::F8E4M3 => dot_scaled::<V, Fp8s>(row, x, scales, table),
            DType::Q8 => dot_scaled::<V, Q8s>(row, x, scales, table),
            DType::F16 | DType::Q4 => unreachable!("decoded above"),
        }
    }
}

/// Rows `first..first + dst.len()` of `m` dotted with one token's `x`, into `dst`. `scratch`:
/// a row of `m.cols` values.
pub fn rows_at(simd: Simd, m: &Matrix, first: usize, x: &[f32], dst: &mut [f32], scratch: &mut [f32]) {
    dispatch(simd, Rows { m, first, x, dst, scratch })
}

struct Rows<'a> {
    m: &'a Matrix,
    first: usize,
    x: &'a [f32],
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
