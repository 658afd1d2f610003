//! DeepSeek-V3.2's lightning indexer on the CPU backend, as the plan's indexer ops state it:
//! each token's key normalised, rotated (half-split) and cached with its queries rotated alike;
//! each visible position scored; the `topk` best kept for sparse attention.

use super::attention::{angles, put, Cache};
use crate::model::math::{layer_norm, rotate_half_split};
use crate::plan::IndexerShape;

/// Keys into the index cache (normed, rotated, in its format) and queries rotated in place.
#[allow(clippy::too_many_arguments)]
pub fn prepare(cache: &mut [u32], queries: &mut [f32], keys: &[f32], norm: &[f32], bias: &[f32], inv_freq: &[f32], positions: &[u32], s: &IndexerShape, n: usize) {
    let mut key = vec![0f32; s.dim];
    for t in 0..n {
        let (position, first_row) = (positions[2 * t], positions[2 * t + 1]);
        let (cos, sin) = angles(&inv_freq[..s.rope / 2], position, s.rope_scale);
        key.copy_from_slice(&keys[t * s.dim..(t + 1) * s.dim]);
        layer_norm(&mut key, norm, bias, 1e-6);
        rotate_half_split(&mut key[..s.rope], &cos, &sin);
        let base = (first_row + position) as usize * s.dim;
        for (i, &x) in key.iter().enumerate() {
            put(cache, s.cache, base + i, x);
        }
        for head in queries[t * s.heads * s.dim..(t + 1) * s.heads * s.dim].chunks_mut(s.dim) {
            rotate_half_split(&mut head[..s.rope], &cos, &sin);
        }
    }
}

/// `scores[t, j] = Σ_h (weights[t, h] / sqrt(heads)) · relu(queries[t, h] · k_j / sqrt(dim))`
/// for each position j the token sees.
pub fn scores(scores: &mut [f32], queries: &[f32], weights: &[f32], positions: &[u32], cache: &Cache, s: &IndexerShape, n: usize) {
    let (scale, sqrt_heads) = s.scales();
    let mut key = vec![0f32; s.dim];
    for t in 0..n {
        let (position, first_row) = (positions[2 * t] as usize, positions[2 * t + 1] as usize);
        for j in 0..=position {
            cache.row(first_row + j, &mut key);
            scores[t * s.ctx + j] =
                (0..s.heads).map(|h| (weights[t * s.heads + h] / sqrt_heads) * (crate::model::math::dot(&queries[(t * s.heads + h) * s.dim..][..s.dim], &key) * scale).max(0.0)).sum();
        }
    }
}

/// `selected[t]`: the `topk` highest-scoring positions the token sees (ties to the earlier),
/// ascending; every position while it sees at most `topk`.
pub fn top_k(selected: &mut [u32], scores: &[f32], positions: &[u32], s: &IndexerShape, n: usize) {
    for t in 0..n {
        let visible = positions[2 * t] as usize + 1;
        let out = &mut selected[t * s.topk..(t + 1) * s.topk];
        if visible <= s.topk {
            out.iter_mut().zip(0..visible as u32).for_each(|(o, j)| *o = j);
            continue;
        }
        let row = &scores[t * s.ctx..t * s.ctx + visible];
        let mut order: Vec<usize> = (0..visible).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        let mut chosen: Vec<u32> = order[..s.topk].iter().map(|&j| j as u32).collect();
        chosen.sort_unstable();
        out.copy_from_slice(&chosen);
    }
}
