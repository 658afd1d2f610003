//! Multi-head Latent Attention over a latent cache of `c_kv` (kv_lora) and `k_pe` (rope) per token.

use super::rope::Rope;
use super::weights::{Attention, Indexer, QueryProjection};
use super::AttentionMode;
use crate::config::ModelConfig;
use crate::model::math::{axpy, dot, layer_norm, matmul, rms_norm, rotate_half_split, softmax};
use crate::quant::CacheFormat;
use rayon::prelude::*;

/// transformers hard-codes this epsilon for `q_a_layernorm` and `kv_a_layernorm`.
const LATENT_NORM_EPS: f64 = 1e-6;

pub struct AttentionCtx<'a> {
    pub config: &'a ModelConfig,
    pub rope: &'a Rope,
    pub softmax_scale: f32,
    pub mode: AttentionMode,
    /// The format the latent cache (and the indexer's key cache) holds: values are rounded to
    /// it as they are stored, as the GPU kernels store them.
    pub cache: CacheFormat,
}

/// Attention for `n` normalised hidden states `x` at positions `start..start + n`.
/// Appends their cache rows to `cache` (one layer, `[start, cache_row]` on entry: the latent,
/// then V3.2's indexer key) and returns `[n, hidden]`.
pub fn forward(ctx: &AttentionCtx, w: &Attention, x: &[f32], n: usize, start: usize, cache: &mut Vec<f32>) -> Vec<f32> {
    let c = ctx.config;
    let (heads, nope, rope_dim, v_dim) = (c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim);
    let (qk, lora, latent, row_len) = (c.qk_head_dim(), c.kv_lora_rank, c.latent_dim(), c.cache_row());

    let (mut q, q_lora) = match &w.q {
        QueryProjection::LowRank { a, norm, b } => {
            let mut cq = matmul(a, x, n);
            rms_norm(&mut cq, norm, LATENT_NORM_EPS);
            (matmul(b, &cq, n), Some(cq))
        }
        QueryProjection::Direct(proj) => (matmul(proj, x, n), None),
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
    debug_assert_eq!(cache.len(), start * row_len);
    let index = match (&w.indexer, c.indexer, &q_lora) {
        (Some(ix), Some(shape), Some(cq)) => Some(IndexerStep::new(ctx, ix, shape, x, cq, n, start)),
        _ => None,
    };
    let stored = |values: &[f32]| values.iter().map(|&x| ctx.cache.round(x)).collect::<Vec<f32>>();
    for t in 0..n {
        cache.extend(stored(&kv[t * latent..(t + 1) * latent]));
        if let Some(ix) = &index {
            cache.extend(stored(&ix.keys[t * ix.dim..(t + 1) * ix.dim]));
        }
    }
    let cache = &cache[..];
    // V3.2: the positions each token attends to, chosen by the indexer.
    let selected: Option<Vec<Vec<usize>>> = index.as_ref().map(|ix| (0..n).map(|t| ix.select(cache, row_len, latent, t, start + t + 1)).collect());

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
            let head = HeadWeights { w_uk: &w_uk, w_uv: &w_uv, nope, v_dim, lora, rope_dim, row_len, selected: selected.as_deref() };
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

/// The indexer's work for one step's tokens (DeepSeek Sparse Attention, transformers'
/// `DeepseekV32Indexer`): each token's key (LayerNorm of `wk x`, the first `rope` values
/// rotated half-split, unlike MLA's interleaved pairs), its heads' queries (`wq_b` of the query
/// LoRA, rotated alike) and their weights (`weights_proj x / sqrt(heads)`).
struct IndexerStep {
    keys: Vec<f32>,
    queries: Vec<f32>,
    weights: Vec<f32>,
    heads: usize,
    dim: usize,
    topk: usize,
}

impl IndexerStep {
    fn new(ctx: &AttentionCtx, w: &Indexer, shape: crate::config::IndexerConfig, x: &[f32], q_lora: &[f32], n: usize, start: usize) -> IndexerStep {
        let (heads, dim, rope) = (shape.heads, shape.head_dim, ctx.config.qk_rope_head_dim);
        let mut keys = matmul(&w.wk, x, n);
        let mut queries = matmul(&w.wq_b, q_lora, n);
        let mut weights = matmul(&w.weights_proj, x, n);
        weights.iter_mut().for_each(|v| *v /= (heads as f32).sqrt());
        for t in 0..n {
            let key = &mut keys[t * dim..(t + 1) * dim];
            layer_norm(key, &w.k_norm, &w.k_norm_bias, 1e-6);
            let (cos, sin) = ctx.rope.angles(start + t);
            rotate_half_split(&mut key[..rope], &cos, &sin);
            for h in 0..heads {
                rotate_half_split(&mut queries[(t * heads + h) * dim..][..rope], &cos, &sin);
            }
        }
        IndexerStep { keys, queries, weights, heads, dim, topk: shape.topk }
    }

    /// The `topk` most relevant of positions `0..visible` for token `t` of the step, by
    /// `Σ_h weight_h · relu(q_h · k_j / sqrt(dim))` (ties to the earlier position), in order.
    fn select(&self, cache: &[f32], row_len: usize, latent: usize, t: usize, visible: usize) -> Vec<usize> {
        if visible <= self.topk {
            return (0..visible).collect();
        }
        let scale = 1.0 / (self.dim as f32).sqrt();
        let mut scored: Vec<(f32, usize)> = (0..visible)
            .map(|j| {
                let key = &cache[j * row_len + latent..][..self.dim];
                let score = (0..self.heads).map(|h| self.weights[t * self.heads + h] * (dot(&self.queries[(t * self.heads + h) * self.dim..][..self.dim], key) * scale).max(0.0)).sum::<f32>();
                (score, j)
            })
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut chosen: Vec<usize> = scored[..self.topk].iter().map(|&(_, j)| j).collect();
        chosen.sort_unstable();
        chosen
    }
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
    /// Values per cached position (the latent, then V3.2's indexer key).
    row_len: usize,
    /// V3.2: the positions each of the step's tokens attends to (all visible ones otherwise).
    selected: Option<&'a [Vec<usize>]>,
}

impl HeadWeights<'_> {
    fn latent<'c>(&self, cache: &'c [f32], j: usize) -> (&'c [f32], &'c [f32]) {
        let row = &cache[j * self.row_len..][..self.lora + self.rope_dim];
        row.split_at(self.lora)
    }

    /// The cached positions token `t` of the step (at `visible - 1`) attends to.
    fn positions(&self, t: usize, visible: usize) -> Vec<usize> {
        match self.selected {
            Some(s) => s[t].clone(),
            None => (0..visible).collect(),
        }
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
            let positions = self.positions(t, start + t + 1);
            let mut scores: Vec<f32> = positions
                .iter()
                .map(|&j| {
                    let (c_kv, k_pe) = self.latent(cache, j);
                    (dot(&q_lat, c_kv) + dot(q_pe, k_pe)) * scale
                })
                .collect();
            softmax(&mut scores);
            let mut o_lat = vec![0.0f32; self.lora];
            for (&j, &p) in positions.iter().zip(&scores) {
                axpy(p, self.latent(cache, j).0, &mut o_lat);
            }
            out.extend(self.w_uv.chunks(self.lora).map(|row| dot(row, &o_lat)));
        }
        out
    }

    /// Expands every cached latent to full keys and values first, as plain multi-head attention.
    fn naive<'q>(&self, queries: impl Iterator<Item = &'q [f32]>, start: usize, n: usize, cache: &[f32], scale: f32) -> Vec<f32> {
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
            let positions = self.positions(t, start + t + 1);
            let mut scores: Vec<f32> = positions.iter().map(|&j| (dot(q_nope, &keys[j * self.nope..][..self.nope]) + dot(q_pe, self.latent(cache, j).1)) * scale).collect();
            softmax(&mut scores);
            let mut o = vec![0.0f32; self.v_dim];
            for (&j, &p) in positions.iter().zip(&scores) {
                axpy(p, &values[j * self.v_dim..][..self.v_dim], &mut o);
            }
            out.extend(o);
        }
        out
    }
}
