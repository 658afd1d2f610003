//! MLA's two per-head products with kv_b around attention over the latent cache: the query's
//! no-rotary part absorbed into latent space (`q_lat = W_UKᵀ q_nope`, a transposed mat-vec:
//! rows decoded and added, scaled) and the attended latents expanded to values
//! (`o = W_UV o_lat`, the one-token mat-vec kernels, so `--math fast` applies to it too).

use super::gemm::decode_row;
use super::matmul;
use super::pool::for_each_chunk;
use super::scratch::{sized, with_scratch};
use super::vector::{dispatch, AtLevel, Simd, Vector, LANES};
use crate::model::weights::Matrix;
use crate::plan::budget::Math;
use crate::plan::layout::MlaShape;

/// `q_lat[t, h] = W_UK[h]ᵀ q_nope[t, h]`, a (token, head) a task.
pub fn q_absorb(simd: Simd, q_lat: &mut [f32], kv_b: &Matrix, q: &[f32], s: &MlaShape, n: usize) {
    let qk = s.nope + s.rope;
    for_each_chunk(&mut q_lat[..n * s.heads * s.lora], s.lora, |th, out| {
        let (h, q_nope) = (th % s.heads, &q[th * qk..][..s.nope]);
        with_scratch(|scratch| dispatch(simd, Absorb { kv_b, first: h * (s.nope + s.v), q_nope, out, row: sized(&mut scratch.row, s.lora) }));
    });
}

/// `o[t, h] = W_UV[h] o_lat[t, h]`, a (token, head) a task.
pub fn v_up(simd: Simd, math: Math, o: &mut [f32], kv_b: &Matrix, o_lat: &[f32], s: &MlaShape, n: usize) {
    for_each_chunk(&mut o[..n * s.heads * s.v], s.v, |th, out| {
        let (h, latent) = (th % s.heads, &o_lat[th * s.lora..(th + 1) * s.lora]);
        with_scratch(|scratch| {
            let row = sized(&mut scratch.row, s.lora);
            matmul::rows_at(simd, kv_b, h * (s.nope + s.v) + s.nope, scratch.layouts.prepare(latent, kv_b, math), out, row)
        });
    });
}

/// `out = Σ_d q_nope[d] kv_b[first + d]`, rows decoded at the level.
struct Absorb<'a> {
    kv_b: &'a Matrix,
    first: usize,
    q_nope: &'a [f32],
    out: &'a mut [f32],
    row: &'a mut [f32],
}

impl AtLevel for Absorb<'_> {
    type Output = ();
    #[inline(always)]
    unsafe fn run<V: Vector>(self) {
        let Absorb { kv_b, first, q_nope, out, row } = self;
        assert!(out.len() == kv_b.cols && row.len() == kv_b.cols, "rows of the latent's width");
        out.fill(0.0);
        let full = out.len() / LANES * LANES;
        for (d, &qd) in q_nope.iter().enumerate() {
            // SAFETY (both): the level is the caller's contract; `k + LANES <= full <=` the
            // rows' length (asserted).
            unsafe { decode_row::<V>(kv_b, first + d, row) };
            let scale = unsafe { V::splat(qd) };
            for k in (0..full).step_by(LANES) {
                unsafe { V::mul_add(scale, V::load(row.as_ptr().add(k)), V::load(out.as_ptr().add(k))).store(out.as_mut_ptr().add(k)) };
            }
            for c in full..out.len() {
                out[c] += qd * row[c];
            }
        }
    }
}
