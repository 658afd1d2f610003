//! The CPU backend's matmul: `y = W x` with W read in its stored format (f32, bf16, f16, FP8
//! with block scales, q8, q4), rows split over the pool's threads. One token (decode) takes a
//! fused dot per row straight from the stored bytes, so each weight byte is read once and
//! nothing is written back; several tokens decode a row once into a per-task scratch row and
//! dot it with each token. Sums are f32 (exact decoding; only the order of the sums differs
//! from the reference's).
//!
//! The kernels are written once, generic over how a multiply-add is done, and compiled for
//! each SIMD level with `#[target_feature]` (LLVM vectorises the 16-lane loops): AVX-512 and
//! AVX2+FMA on x86-64, chosen at run time (`Simd::detect`; `DSRUN_CPU_SIMD` forces a lower
//! level); the portable build elsewhere (NEON on aarch64, where FMA is baseline).

use crate::model::weights::Matrix;
use crate::quant::{fp8_table, DType};
use super::vector::Simd;

/// Lanes of the dot products' accumulators: one AVX-512 register, two AVX2 ones.
const LANES: usize = 16;

/// How a multiply-add is done: fused where the level has FMA, else a multiply and an add (a
/// software `fma` would be far slower).
trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

#[allow(dead_code)] // x86-64's portable level does not fuse
struct Fused;
impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

#[allow(dead_code)] // aarch64 always fuses
struct Separate;
impl MulAdd for Separate {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

#[inline(always)]
fn reduce(acc: [f32; LANES]) -> f32 {
    let mut half = [0f32; LANES / 2];
    for i in 0..LANES / 2 {
        half[i] = acc[i] + acc[i + LANES / 2];
    }
    half.iter().sum()
}

/// How a stored value becomes f32 (every call inlined: the kernels are compiled per SIMD level,
/// and anything left out of line would be compiled for the baseline instead).
trait Decode {
    const BYTES: usize;
    fn decode(b: &[u8], table: &[f32; 256]) -> f32;
}

struct F32s;
impl Decode for F32s {
    const BYTES: usize = 4;
    #[inline(always)]
    fn decode(b: &[u8], _: &[f32; 256]) -> f32 {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

struct Bf16s;
impl Decode for Bf16s {
    const BYTES: usize = 2;
    #[inline(always)]
    fn decode(b: &[u8], _: &[f32; 256]) -> f32 {
        f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)
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
}

struct Q8s;
impl Decode for Q8s {
    const BYTES: usize = 1;
    #[inline(always)]
    fn decode(b: &[u8], _: &[f32; 256]) -> f32 {
        b[0] as i8 as f32
    }
}

/// `Σ decode(w_c) x_c` over one run of stored values.
#[inline(always)]
fn dot_run<M: MulAdd, D: Decode>(w: &[u8], x: &[f32], table: &[f32; 256]) -> f32 {
    let mut acc = [0f32; LANES];
    let (wc, xc) = (w.chunks_exact(LANES * D::BYTES), x.chunks_exact(LANES));
    let (wr, xr) = (wc.remainder(), xc.remainder());
    for (w, x) in wc.zip(xc) {
        for i in 0..LANES {
            acc[i] = M::mul_add(D::decode(&w[i * D::BYTES..(i + 1) * D::BYTES], table), x[i], acc[i]);
        }
    }
    let mut sum = reduce(acc);
    for (w, &x) in wr.chunks_exact(D::BYTES).zip(xr) {
        sum = M::mul_add(D::decode(w, table), x, sum);
    }
    sum
}

/// A row in format `D` dotted with `x`, each block of `s`'s scales (FP8 blocks, q8 groups)
/// summed and scaled.
#[inline(always)]
fn dot_scaled<M: MulAdd, D: Decode>(row: &[u8], x: &[f32], scales: Option<(&[f32], usize)>, table: &[f32; 256]) -> f32 {
    let Some((grid_row, block)) = scales else { return dot_run::<M, D>(row, x, table) };
    let mut sum = 0f32;
    let (mut w, mut x) = (row, x);
    for &scale in grid_row {
        let cols = block.min(x.len());
        sum += dot_run::<M, D>(&w[..cols * D::BYTES], &x[..cols], table) * scale;
        (w, x) = (&w[cols * D::BYTES..], &x[cols..]);
    }
    sum
}

/// Row `r` of `m` dotted with `x`, fused from the stored bytes, for the formats that decode
/// value by value; None for the others (f16, q4: decoded into a row first).
#[inline(always)]
fn fused_row<M: MulAdd>(m: &Matrix, r: usize, x: &[f32]) -> Option<f32> {
    let width = m.cols * m.dtype.size_bytes();
    let row = m.data.as_slice().get(r * width..(r + 1) * width)?;
    let scales = m.scales.as_ref().map(|s| (&s.values[(r / s.block_rows) * s.grid_cols..][..s.grid_cols], s.block_cols));
    let table = fp8_table();
    Some(match m.dtype {
        DType::F32 => dot_scaled::<M, F32s>(row, x, scales, table),
        DType::BF16 => dot_scaled::<M, Bf16s>(row, x, scales, table),
        DType::F8E4M3 => dot_scaled::<M, Fp8s>(row, x, scales, table),
        DType::Q8 => dot_scaled::<M, Q8s>(row, x, scales, table),
        DType::F16 | DType::Q4 => return None,
    })
}

#[inline(always)]
fn dot<M: MulAdd>(w: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (wc, xc) = (w.chunks_exact(LANES), x.chunks_exact(LANES));
    let (wr, xr) = (wc.remainder(), xc.remainder());
    for (w, x) in wc.zip(xc) {
        for i in 0..LANES {
            acc[i] = M::mul_add(w[i], x[i], acc[i]);
        }
    }
    let mut sum = reduce(acc);
    for (&w, &x) in wr.iter().zip(xr) {
        sum = M::mul_add(w, x, sum);
    }
    sum
}

/// Rows `first..first + count` of `m` for `n` tokens of `x` (`[n, cols]`) into `dst`
/// (`[count, n]`, row-major by weight row). `scratch`: a row of `cols` values.
#[inline(always)]
fn rows<M: MulAdd>(m: &Matrix, first: usize, x: &[f32], n: usize, dst: &mut [f32], scratch: &mut [f32]) {
    let cols = m.cols;
    for (i, out) in dst.chunks_mut(n).enumerate() {
        let r = first + i;
        if n == 1 {
            if let Some(v) = fused_row::<M>(m, r, x) {
                out[0] = v;
                continue;
            }
        }
        m.decode_row(r, scratch);
        for (t, o) in out.iter_mut().enumerate() {
            *o = dot::<M>(scratch, &x[t * cols..(t + 1) * cols]);
        }
    }
}

/// The kernels compiled for one level.
#[cfg(target_arch = "x86_64")]
macro_rules! level {
    ($name:ident, $features:literal, $muladd:ty) => {
        mod $name {
            use super::*;
            /// # Safety
            /// The CPU runs the level's instructions (`Simd::available`).
            #[target_feature(enable = $features)]
            pub unsafe fn rows(m: &Matrix, first: usize, x: &[f32], n: usize, dst: &mut [f32], scratch: &mut [f32]) {
                super::rows::<$muladd>(m, first, x, n, dst, scratch)
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
level!(avx512, "avx512f,avx512bw,avx512vl,avx2,fma", Fused);
#[cfg(target_arch = "x86_64")]
level!(avx2, "avx2,fma", Fused);

mod portable {
    use super::*;
    #[cfg(target_arch = "aarch64")]
    type Native = Fused;
    #[cfg(not(target_arch = "aarch64"))]
    type Native = Separate;
    pub fn rows(m: &Matrix, first: usize, x: &[f32], n: usize, dst: &mut [f32], scratch: &mut [f32]) {
        super::rows::<Native>(m, first, x, n, dst, scratch)
    }
}

/// [`rows`] at `simd`'s level.
pub fn rows_at(simd: Simd, m: &Matrix, first: usize, x: &[f32], n: usize, dst: &mut [f32], scratch: &mut [f32]) {
    match simd {
        // SAFETY: `simd` comes from `Simd::detect` or `Simd::available`: the CPU runs it.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { avx512::rows(m, first, x, n, dst, scratch) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { avx2::rows(m, first, x, n, dst, scratch) },
        _ => portable::rows(m, first, x, n, dst, scratch),
    }
}
