//! The router on the CPU backend: the reference's rule (`model::router::route`: sigmoid or
//! softmax scores, the correction bias for the choice only, group-limited top-k, normalised and
//! scaled weights; ties to the lower index) computed in per-thread scratch, so a step allocates
//! nothing.

use super::scratch::{sized, with_scratch};
use crate::config::{ScoringFunc, TopkMethod};
use crate::model::math::{sigmoid, softmax};
use crate::model::router::RouterParams;

/// The index of the largest value not yet taken (by `total_cmp`, ties to the lower index).
fn best(values: &[f32], taken: &[bool]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, v) in values.iter().enumerate() {
        if !taken[i] && best.is_none_or(|b| v.total_cmp(&values[b]).is_gt()) {
            best = Some(i);
        }
    }
    best
}

/// One token's `k` experts and weights into `ids` and `weights`.
pub fn route(logits: &[f32], bias: Option<&[f32]>, p: &RouterParams, ids: &mut [u32], weights: &mut [f32]) {
    with_scratch(|s| {
        let experts = logits.len();
        let scores = sized(&mut s.scores, experts);
        scores.copy_from_slice(logits);
        match p.scoring {
            ScoringFunc::Sigmoid => scores.iter_mut().for_each(|v| *v = sigmoid(*v)),
            ScoringFunc::Softmax => softmax(scores),
        }
        let choice = sized(&mut s.choice, experts);
        match bias {
            Some(b) => choice.iter_mut().zip(scores.iter().zip(b)).for_each(|(c, (s, b))| *c = s + b),
            None => choice.copy_from_slice(scores),
        }
        s.taken.clear();
        s.taken.resize(experts.max(p.n_group), false);
        if p.method != TopkMethod::Greedy && p.n_group > 1 {
            let size = experts / p.n_group;
            let groups = sized(&mut s.rows, p.n_group);
            for (g, score) in groups.iter_mut().enumerate() {
                let group = &choice[g * size..(g + 1) * size];
                *score = match p.method {
                    TopkMethod::NoauxTc => {
                        let taken = &mut s.taken[..size];
                        let first = best(group, taken).expect("a group has experts");
                        taken[first] = true;
                        let second = best(group, taken).map_or(0.0, |i| group[i]);
                        taken.fill(false);
                        group[first] + second
                    }
                    _ => group.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                };
            }
            // Groups outside the best `topk_group` take no expert.
            let kept = &mut s.taken[..p.n_group];
            for _ in 0..p.topk_group.min(p.n_group) {
                let g = best(groups, kept).expect("groups remain");
                kept[g] = true;
            }
            for g in 0..p.n_group {
                if !s.taken[g] {
                    choice[g * size..(g + 1) * size].fill(f32::NEG_INFINITY);
                }
            }
            s.taken.fill(false);
        }
        let taken = &mut s.taken[..experts];
        for id in ids.iter_mut() {
            let e = best(choice, taken).expect("experts remain");
            taken[e] = true;
            *id = e as u32;
        }
        for (w, &e) in weights.iter_mut().zip(ids.iter()) {
            *w = scores[e as usize];
        }
        if p.normalize {
            let sum: f32 = weights.iter().sum::<f32>() + 1e-20;
            weights.iter_mut().for_each(|w| *w /= sum);
        }
        weights.iter_mut().for_each(|w| *w *= p.scaling);
    })
}
