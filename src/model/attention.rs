//! Multi-head Latent Attention over a latent cache of `c_kv` (kv_lora) and `k_pe` (rope) per token.

use super::rope::Rope;
use super::weights::{Attention, QueryProjection};
use super::AttentionMode;
use crate::backend::cpu::{axpy, dot, matmul, rms_norm, softmax};
use crate::config::ModelConfig;
use rayon::prelude::*;

/// transformers hard-codes this epsilon for `q_a_layernorm` and `kv_a_layernorm`.
const LATENT_NORM_EPS: f64 = 1e-6;

pub struct AttentionCtx<'a> {
    pub config: &'a ModelConfig,
    pub rope: &'a Rope,
    pub softmax_scale: f32,
    pub mode: AttentionMode,
}

/// Attention for `n` normalised hidden states `x` at positions `start..start + n`.
/// Appends their latents to `cache` (one layer, `[start, latent_dim]` on entry) and returns `[n, hidden]`.
pub fn forward(ctx: &AttentionCtx, w: &Attention, x: &[f32], n: usize, start: usize, cache: &mut Vec<f32>) -> Vec<f32> {
    let c = ctx.config;
    let (heads, nope, rope_dim, v_dim) = (c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim);
    let (qk, lora, latent) = (c.qk_head_dim(), c.kv_lora_rank, c.latent_dim());

    let mut q = match &w.q {
        QueryProjection::LowRank { a, norm, b } => {
            let mut cq = matmul(a, x, n);
            rms_norm(&mut cq, norm, LATENT_NORM_EPS);
            matmul(b, &cq, n)
        }
        QueryProjection::Direct(proj) => matmul(proj, x, n),
    };
    let mut kv = matmul(&w.kv_a, x, n);
    for t in 0..n {
        let (cos, sin) = ctx.rope.angles(start + t);
        let row = &mut kv[t * latent..(t + 1) * latent];
        rms_norm(&mut row[..lora], &w.kv_norm, LATENT_NORM_EPS);
        Rope::apply(&mut row[lora..], &cos, &sin);
        for h in 0..heads {
            let head = &mut q[(t * heads + h) * qk..][..qk];
            Rope::apply(&mut head[nope..], &cos, &sin);
        }
    }
    debug_assert_eq!(cache.len(), start * latent);
    cache.extend_from_slice(&kv);
    let cache = &cache[..];

    // Each head is independent: decode its slice of kv_b once, then serve every token.
    let per_head: Vec<Vec<f32>> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let mut w_uk = vec![0.0f32; nope * lora];
            let mut w_uv = vec![0.0f32; v_dim * lora];
            let first = h * (nope + v_dim);
            for (d, row) in w_uk.chunks_mut(lora).enumerate() {
                w.kv_b.decode_row(first + d, row);
            }
            for (d, row) in w_uv.chunks_mut(lora).enumerate() {
                w.kv_b.decode_row(first + nope + d, row);
            }
            let queries = (0..n).map(|t| &q[(t * heads + h) * qk..][..qk]);
            let head = HeadWeights { w_uk: &w_uk, w_uv: &w_uv, nope, v_dim, lora, rope_dim };
            match ctx.mode {
                AttentionMode::Absorbed => head.absorbed(queries, start, cache, ctx.softmax_scale),
                AttentionMode::Naive => head.naive(queries, start, n, cache, ctx.softmax_scale),
            }
        })
        .collect();

    let mut o = vec![0.0f32; n * heads * v_dim];
    for (h, out) in per_head.iter().enumerate() {
        for t in 0..n {
            o[(t * heads + h) * v_dim..][..v_dim].copy_from_slice(&out[t * v_dim..][..v_dim]);
        }
    }
    matmul(&w.o, &o, n)
}

struct HeadWeights<'a> {
    /// `[nope, lora]`: maps a latent to this head's non-rotary key.
    w_uk: &'a [f32],
    /// `[v_dim, lora]`: maps a latent to this head's value.
    w_uv: &'a [f32],
    nope: usize,
    v_dim: usize,
    lora: usize,
    rope_dim: usize,
}

impl HeadWeights<'_> {
    fn latent<'c>(&self, cache: &'c [f32], j: usize) -> (&'c [f32], &'c [f32]) {
        let row = &cache[j * (self.lora + self.rope_dim)..][..self.lora + self.rope_dim];
        row.split_at(self.lora)
    }

    /// Scores against `c_kv` directly: `q_lat = W_UKᵀ q_nope`, output `W_UV · Σ P c_kv`.
    fn absorbed<'q>(&self, queries: impl Iterator<Item = &'q [f32]>, start: usize, cache: &[f32], scale: f32) -> Vec<f32> {
        let mut out = Vec::new();
        for (t, query) in queries.enumerate() {
            let (q_nope, q_pe) = query.split_at(self.nope);
            let mut q_lat = vec![0.0f32; self.lora];
            for (d, &qd) in q_nope.iter().enumerate() {
                axpy(qd, &self.w_uk[d * self.lora..][..self.lora], &mut q_lat);
            }
            let visible = start + t + 1;
            let mut scores: Vec<f32> = (0..visible)
                .map(|j| {
                    let (c_kv, k_pe) = self.latent(cache, j);
                    (dot(&q_lat, c_kv) + dot(q_pe, k_pe)) * scale
                })
                .collect();
            softmax(&mut scores);
            let mut o_lat = vec![0.0f32; self.lora];
            for (j, &p) in scores.iter().enumerate() {
                axpy(p, self.latent(cache, j).0, &mut o_lat);
            }
            out.extend(self.w_uv.chunks(self.lora).map(|row| dot(row, &o_lat)));
        }
        out
    }

    /// Expands every cached latent to full keys and values first, as plain multi-head attention.
    fn naive<'q>(
        &self,
        queries: impl Iterator<Item = &'q [f32]>,
        start: usize,
        n: usize,
        cache: &[f32],
        scale: f32,
    ) -> Vec<f32> {
        let total = start + n;
        let mut keys = Vec::with_capacity(total * self.nope);
        let mut values = Vec::with_capacity(total * self.v_dim);
        for j in 0..total {
            let c_kv = self.latent(cache, j).0;
            keys.extend(self.w_uk.chunks(self.lora).map(|row| dot(row, c_kv)));
            values.extend(self.w_uv.chunks(self.lora).map(|row| dot(row, c_kv)));
        }
        let mut out = Vec::new();
        for (t, query) in queries.enumerate() {
            let (q_nope, q_pe) = query.split_at(self.nope);
            let visible = start + t + 1;
            let mut scores: Vec<f32> = (0..visible)
                .map(|j| (dot(q_nope, &keys[j * self.nope..][..self.nope]) + dot(q_pe, self.latent(cache, j).1)) * scale)
                .collect();
            softmax(&mut scores);
            let mut o = vec![0.0f32; self.v_dim];
            for (j, &p) in scores.iter().enumerate() {
                axpy(p, &values[j * self.v_dim..][..self.v_dim], &mut o);
            }
            out.extend(o);
        }
        out
    }
}
