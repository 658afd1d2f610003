//! Feed-forward blocks: the dense SwiGLU MLP and the routed mixture of experts.

use super::router::{route, RouterParams};
use super::weights::{Mlp, Moe};
use crate::model::math::{add_in_place, axpy, matmul, silu_mul};
use std::collections::BTreeMap;

/// `down · (silu(gate · x) ⊙ (up · x))` for `n` tokens.
pub fn mlp(w: &Mlp, x: &[f32], n: usize) -> Vec<f32> {
    let mut gate = matmul(&w.gate, x, n);
    let up = matmul(&w.up, x, n);
    silu_mul(&mut gate, &up);
    matmul(&w.down, &gate, n)
}

/// `Σ_k w_k · Expert_k(x) + Shared(x)`. Tokens are grouped by expert so each expert's
/// weights are read once per call, whatever the number of tokens that chose it.
pub fn moe(w: &Moe, params: &RouterParams, x: &[f32], n: usize) -> Vec<f32> {
    let hidden = x.len() / n;
    let logits = matmul(&w.router, x, n);
    let experts = w.router.rows;
    let mut by_expert: BTreeMap<usize, Vec<(usize, f32)>> = BTreeMap::new();
    for t in 0..n {
        for (e, weight) in route(&logits[t * experts..][..experts], w.correction_bias.as_deref(), params) {
            by_expert.entry(e).or_default().push((t, weight));
        }
    }

    let mut out = vec![0.0f32; n * hidden];
    for (e, tokens) in by_expert {
        let batch: Vec<f32> = tokens.iter().flat_map(|&(t, _)| &x[t * hidden..][..hidden]).copied().collect();
        let y = mlp(&w.experts[e], &batch, tokens.len());
        for (i, &(t, weight)) in tokens.iter().enumerate() {
            axpy(weight, &y[i * hidden..][..hidden], &mut out[t * hidden..][..hidden]);
        }
    }
    if let Some(shared) = &w.shared {
        add_in_place(&mut out, &mlp(shared, x, n));
    }
    out
}
