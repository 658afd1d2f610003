//! MLA's two per-head products with kv_b around attention over the latent cache: the query's
//! no-rotary part absorbed into latent space (`q_lat = W_UKᵀ q_nope`, a transposed product: a
//! head's rows decoded once, then scaled and summed per token) and the attended latents expanded to values
//! (`o = W_UV o_lat`, the one-token mat-vec kernels, so `--math fast` applies to it too).

use super::blocks::Disjoint;
use super::gemm::decode_panel;
use super::matmul;
use super::pool::{for_each_chunk, pool};
use super::scratch::{sized, with_scratch};
use super::vector::{dispatch, AtLevel, Simd, Vector, LANES};
use crate::model::weights::Matrix;
use crate::plan::budget::Math;
use crate::plan::layout::MlaShape;

/// Tokens per task of [`q_absorb`]: a head's key rows are decoded once per task.
const TOKENS: usize = 32;

/// `q_lat[t, h] = W_UK[h]ᵀ q_nope[t, h]`: a task per (head, run of tokens), the head's key rows
/// decoded once into a panel for all its tokens (a prompt's tokens would otherwise decode them
/// once each).
pub fn q_absorb(simd: Simd, q_lat: &mut [f32], kv_b: &Matrix, q: &[f32], s: &MlaShape, n: usize) {
    let chunks = n.div_ceil(TOKENS);
    let out = Disjoint::new(&mut q_lat[..n * s.heads * s.lora]);
    pool().run(s.heads * chunks, &|task| {
        let (h, chunk) = (task % s.heads, task / s.heads);
        let tokens = chunk * TOKENS..n.min((chunk + 1) * TOKENS);
        with_scratch(|scratch| dispatch(simd, Absorb { kv_b, h, tokens, q, s, out: &out, panel: sized(&mut scratch.panel, s.nope * s.lora) }));
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

/// One head's absorbed queries for a run of tokens: `out[t, h] = Σ_d q_nope[t, h, d] W_UK[h, d]`.
struct Absorb<'a, 'b> {
    kv_b: &'a Matrix,
    h: usize,
    tokens: std::ops::Range<usize>,
    q: &'a [f32],
    s: &'a MlaShape,
    out: &'a Disjoint<'b>,
    panel: &'a mut [f32],
}

impl AtLevel for Absorb<'_, '_> {
    type Output = ();
    #[inline(always)]
    unsafe fn run<V: Vector>(self) {
        let Absorb { kv_b, h, tokens, q, s, out, panel } = self;
        let (lora, qk) = (s.lora, s.nope + s.rope);
        assert!(kv_b.cols == lora && panel.len() == s.nope * lora, "a panel of the head's key rows");
        // SAFETY: the caller's contract.
        unsafe { decode_panel::<V>(kv_b, h * (s.nope + s.v), s.nope, panel) };
        let full = lora / (4 * LANES) * (4 * LANES);
        for t in tokens {
            let q_nope = &q[(t * s.heads + h) * qk..][..s.nope];
            // SAFETY: this task alone owns token t's row for head h.
            let dst = unsafe { out.slice_mut((t * s.heads + h) * lora, lora) };
            // Four vectors of the latent at a time, summed over the head's rows in registers.
            for b in (0..full).step_by(4 * LANES) {
                // SAFETY (all): the level is the caller's contract; `b + 4 * LANES <= full <=
                // lora`, the panel's rows and `dst` are `lora` long (asserted).
                let mut acc = [unsafe { V::zero() }; 4];
                for (d, &qd) in q_nope.iter().enumerate() {
                    let (scale, row) = (unsafe { V::splat(qd) }, &panel[d * lora + b..]);
                    for (v, acc) in acc.iter_mut().enumerate() {
                        *acc = unsafe { V::mul_add(scale, V::load(row.as_ptr().add(v * LANES)), *acc) };
                    }
                }
                for (v, acc) in acc.iter().enumerate() {
                    unsafe { acc.store(dst.as_mut_ptr().add(b + v * LANES)) };
                }
            }
            for (c, y) in dst.iter_mut().enumerate().skip(full) {
                *y = q_nope.iter().enumerate().map(|(d, qd)| qd * panel[d * lora + c]).sum();
            }
        }
    }
}
