//! Expert selection for one token: scoring (sigmoid or softmax), optional correction bias
//! (selection only), group-limited top-k, normalisation and scaling. See docs/forward-pass.md, "Router and experts".

use crate::config::{ModelConfig, ScoringFunc, TopkMethod};
use crate::model::math::{sigmoid, softmax};

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

    /// The GPU kernels' METHOD constant: 0 greedy, 1 group_limited_greedy, 2 noaux_tc.
    pub fn method_code(&self) -> u32 {
        match self.method {
            TopkMethod::Greedy => 0,
            TopkMethod::GroupLimitedGreedy => 1,
            TopkMethod::NoauxTc => 2,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn params(scoring: ScoringFunc, method: TopkMethod, n_group: usize, topk_group: usize, top_k: usize) -> RouterParams {
        RouterParams { scoring, method, n_group, topk_group, top_k, normalize: false, scaling: 1.0 }
    }

    fn logit(p: f32) -> f32 {
        (p / (1.0 - p)).ln()
    }

    fn experts(chosen: &[(usize, f32)]) -> Vec<usize> {
        chosen.iter().map(|c| c.0).collect()
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        assert_eq!(top_k(&[1.0, 2.0, 2.0, 0.5, 2.0], 2), vec![1, 2]);
        let p = params(ScoringFunc::Sigmoid, TopkMethod::Greedy, 1, 1, 2);
        assert_eq!(experts(&route(&[0.0; 6], None, &p)), vec![0, 1]);
    }

    #[test]
    fn bias_chooses_but_does_not_weigh() {
        let scores = [0.9, 0.8, 0.7, 0.6];
        let logits: Vec<f32> = scores.iter().map(|&s| logit(s)).collect();
        let bias = [0.0, 0.0, 0.0, 0.5];
        let p = params(ScoringFunc::Sigmoid, TopkMethod::NoauxTc, 1, 1, 2);
        let chosen = route(&logits, Some(&bias), &p);
        assert_eq!(experts(&chosen), vec![3, 0]);
        assert!((chosen[0].1 - 0.6).abs() < 1e-6, "weight is the unbiased score");
    }

    #[test]
    fn negative_biased_scores_in_kept_groups_beat_excluded_groups() {
        // Two groups of two. Group 1 wins on its top-2 sum; its second expert's biased score is
        // negative, yet it must still be chosen over group 0's excluded experts (-inf, not 0).
        let logits: Vec<f32> = [0.5, 0.5, 0.9, 0.2].iter().map(|&s| logit(s)).collect();
        let bias = [0.0, 0.0, 0.6, -0.5];
        let p = params(ScoringFunc::Sigmoid, TopkMethod::NoauxTc, 2, 1, 2);
        let chosen = route(&logits, Some(&bias), &p);
        assert_eq!(experts(&chosen), vec![2, 3]);
        assert!((chosen[1].1 - 0.2).abs() < 1e-6);
    }

    #[test]
    fn noaux_tc_ranks_groups_by_top_two_sum_and_greedy_groups_by_max() {
        // Group 0: one strong expert (0.95) and a weak one; group 1: two good experts.
        let scores = [0.95, 0.05, 0.7, 0.7];
        let logits: Vec<f32> = scores.iter().map(|&s| logit(s)).collect();
        let noaux = params(ScoringFunc::Sigmoid, TopkMethod::NoauxTc, 2, 1, 1);
        assert_eq!(experts(&route(&logits, Some(&[0.0; 4]), &noaux)), vec![2], "sum 1.4 beats 1.0");
        let glg = params(ScoringFunc::Sigmoid, TopkMethod::GroupLimitedGreedy, 2, 1, 1);
        assert_eq!(experts(&route(&logits, None, &glg)), vec![0], "max 0.95 beats 0.7");
        let greedy = params(ScoringFunc::Sigmoid, TopkMethod::Greedy, 2, 1, 3);
        assert_eq!(experts(&route(&logits, None, &greedy)), vec![0, 2, 3], "greedy ignores groups");
    }

    #[test]
    fn group_limited_greedy_keeps_only_the_best_groups() {
        let logits = [5.0, 4.9, 0.0, 0.1, 4.8, 0.0, 0.0, 0.0];
        let p = params(ScoringFunc::Softmax, TopkMethod::GroupLimitedGreedy, 4, 2, 3);
        // Groups (max): 0 -> 5.0, 1 -> 0.1, 2 -> 4.8, 3 -> 0.0; keep 0 and 2.
        assert_eq!(experts(&route(&logits, None, &p)), vec![0, 1, 4]);
    }

    #[test]
    fn softmax_weights_normalisation_and_scaling() {
        let logits = [1.0f32, 2.0, 3.0, 0.0];
        let total: f32 = logits.iter().map(|l| l.exp()).sum();
        let mut p = params(ScoringFunc::Softmax, TopkMethod::Greedy, 1, 1, 2);
        p.scaling = 3.0;
        let chosen = route(&logits, None, &p);
        assert_eq!(experts(&chosen), vec![2, 1]);
        assert!((chosen[0].1 - 3.0 * 3f32.exp() / total).abs() < 1e-5, "unnormalised, scaled");

        p.normalize = true;
        let chosen = route(&logits, None, &p);
        let sum: f32 = chosen.iter().map(|c| c.1).sum();
        assert!((sum - 3.0).abs() < 1e-5, "normalised weights sum to the scaling factor");
        assert!((chosen[0].1 / chosen[1].1 - 1f32.exp()).abs() < 1e-4);
    }
}
