//! Expert selection for one token: scoring (sigmoid or softmax), optional correction bias
//! (selection only), group-limited top-k, normalisation and scaling. See SPEC.md "Router and experts".

use crate::backend::cpu::{sigmoid, softmax};
use crate::config::{ModelConfig, ScoringFunc, TopkMethod};

#[derive(Debug, Clone)]
pub struct RouterParams {
    pub scoring: ScoringFunc,
    pub method: TopkMethod,
    pub n_group: usize,
    pub topk_group: usize,
    pub top_k: usize,
    pub normalize: bool,
    pub scaling: f32,
}

impl RouterParams {
    pub fn from_config(c: &ModelConfig) -> Self {
        RouterParams {
            scoring: c.scoring_func,
            method: c.topk_method,
            n_group: c.n_group,
            topk_group: c.topk_group,
            top_k: c.num_experts_per_tok,
            normalize: c.norm_topk_prob,
            scaling: c.routed_scaling_factor as f32,
        }
    }
}

/// Indices of the `k` largest values, largest first; ties go to the lower index.
pub fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

/// Chooses experts for one token from its router logits. Returns `(expert, weight)` pairs.
pub fn route(logits: &[f32], correction_bias: Option<&[f32]>, p: &RouterParams) -> Vec<(usize, f32)> {
    let experts = logits.len();
    let mut scores = logits.to_vec();
    match p.scoring {
        ScoringFunc::Sigmoid => scores.iter_mut().for_each(|s| *s = sigmoid(*s)),
        ScoringFunc::Softmax => softmax(&mut scores),
    }
    // What experts are chosen by; the weights always come from the unbiased scores.
    let mut choice: Vec<f32> = match correction_bias {
        Some(bias) => scores.iter().zip(bias).map(|(s, b)| s + b).collect(),
        None => scores.clone(),
    };

    if p.method != TopkMethod::Greedy && p.n_group > 1 {
        let group_size = experts / p.n_group;
        let group_scores: Vec<f32> = choice
            .chunks(group_size)
            .map(|g| match p.method {
                TopkMethod::NoauxTc => top_k(g, 2).iter().map(|&i| g[i]).sum(),
                _ => g.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            })
            .collect();
        let kept = top_k(&group_scores, p.topk_group);
        for (g, chunk) in choice.chunks_mut(group_size).enumerate() {
            if !kept.contains(&g) {
                chunk.iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
            }
        }
    }

    let chosen = top_k(&choice, p.top_k);
    let mut weights: Vec<f32> = chosen.iter().map(|&e| scores[e]).collect();
    if p.normalize {
        let sum: f32 = weights.iter().sum::<f32>() + 1e-20;
        weights.iter_mut().for_each(|w| *w /= sum);
    }
    weights.iter_mut().for_each(|w| *w *= p.scaling);
    chosen.into_iter().zip(weights).collect()
}
