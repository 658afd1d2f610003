//! Choosing the next token from logits, in llama.cpp's and vLLM's order: logit bias, then
//! repetition / presence / frequency penalties, then greedy (temperature 0) or top-k,
//! temperature, top-p and min-p before a seeded draw. Log-probabilities for `logprobs` are the
//! model's own (log-softmax of the raw logits), as OpenAI's API reports them.

use crate::error::{Error, Result};
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplerConfig {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 keeps all.
    pub min_p: f32,
    /// Divides positive logits (multiplies negative ones) of every token already in the
    /// sequence, prompt included (the CTRL paper's rule, as transformers); 1 is off.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token generated so far (OpenAI's rule).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated (OpenAI's rule).
    pub frequency_penalty: f32,
    /// Added to the logits of these tokens before anything else.
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: u64,
}

impl Default for SamplerConfig {
    /// Greedy, nothing else.
    fn default() -> Self {
        SamplerConfig { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0, presence_penalty: 0.0, frequency_penalty: 0.0, logit_bias: Vec::new(), seed: 0 }
    }
}

impl SamplerConfig {
    /// Checks each setting; `vocab` bounds the logit-bias ids. Errors name the settings as
    /// OpenAI's API does (`top_p`, `logit_bias`).
    pub fn validate(&self, vocab: usize) -> Result<()> {
        self.validate_named(vocab, &|field| field.to_string())
    }

    /// As `validate`, naming each setting by `name(field)` (the CLI's flags).
    pub fn validate_named(&self, vocab: usize, name: &dyn Fn(&str) -> String) -> Result<()> {
        let bad = |field: &str, rule: &str, value: f32| Err(Error::Invalid(format!("{} must be {rule}, got {value}", name(field))));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature", "a number >= 0", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "in (0, 1]", self.top_p);
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", "in [0, 1]", self.min_p);
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad("repetition_penalty", "a positive number", self.repetition_penalty);
        }
        for (field, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(field, "in [-2, 2]", v);
            }
        }
        for &(id, bias) in &self.logit_bias {
            if id as usize >= vocab {
                return Err(Error::Invalid(format!("{}: token {id} is outside the vocabulary of {vocab} tokens", name("logit_bias"))));
            }
            if !(bias.is_finite() || bias == f32::NEG_INFINITY) {
                return bad("logit_bias", "a number", bias);
            }
        }
        Ok(())
    }

    fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || !self.logit_bias.is_empty()
    }
}

/// A token's log-probability and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// The `n` most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// `token`'s log-probability under `logits` and the `top` most likely tokens'.
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_total = max + logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32;
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if best.len() < top || l > best[best.len() - 1].1 {
                let at = best.partition_point(|&(_, b)| b >= l);
                best.insert(at, (i as u32, l));
                best.truncate(top);
            }
        }
    }
    TokenLogprob { token, logprob: logits.get(token as usize).map_or(f32::NEG_INFINITY, |&l| l - log_total), top: best.into_iter().map(|(i, l)| (i, l - log_total)).collect() }
}

pub struct Sampler {
    config: SamplerConfig,
    rng: SplitMix64,
    /// Tokens of the prompt (repetition penalty) and counts of generated ones.
    prompt: std::collections::HashSet<u32>,
    generated: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(config: SamplerConfig, vocab: usize) -> Result<Sampler> {
        config.validate(vocab)?;
        let rng = SplitMix64(config.seed);
        Ok(Sampler { config, rng, prompt: Default::default(), generated: HashMap::new() })
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    /// Notes the prompt (for the repetition penalty).
    pub fn start(&mut self, prompt: &[u32]) {
        self.prompt = prompt.iter().copied().collect();
        self.generated.clear();
    }

    /// Notes a generated token (for the penalties).
    pub fn accept(&mut self, token: u32) {
        *self.generated.entry(token).or_insert(0) += 1;
    }

    /// Greedy with nothing to adjust: engines can return the argmax without sending logits back.
    pub fn is_plain_greedy(&self) -> bool {
        self.config.temperature == 0.0 && !self.config.has_penalties()
    }

    /// The next token from the last position's logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let dist = self.distribution(logits, &[]);
        self.draw_from(&dist)
    }

    /// The distribution `sample` draws from for `logits`, with `extra` tokens counted as
    /// generated beyond those accepted so far (drafts not yet accepted, whose penalties the
    /// target model's later positions see).
    pub fn distribution(&self, logits: &[f32], extra: &[u32]) -> Dist {
        let c = &self.config;
        if !c.has_penalties() && c.temperature == 0.0 {
            return Dist::Point(crate::model::math::argmax(logits) as u32);
        }
        let mut adjusted = logits.to_vec();
        for &(id, bias) in &c.logit_bias {
            if let Some(l) = adjusted.get_mut(id as usize) {
                *l += bias;
            }
        }
        let mut generated = std::borrow::Cow::Borrowed(&self.generated);
        if !extra.is_empty() {
            let counts = generated.to_mut();
            for &t in extra {
                *counts.entry(t).or_insert(0) += 1;
            }
        }
        if c.repetition_penalty != 1.0 {
            let seen: std::collections::HashSet<u32> = self.prompt.iter().chain(generated.keys()).copied().collect();
            for id in seen {
                if let Some(l) = adjusted.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l / c.repetition_penalty } else { *l * c.repetition_penalty };
                }
            }
        }
        for (&id, &count) in generated.iter() {
            if let Some(l) = adjusted.get_mut(id as usize) {
                *l -= c.presence_penalty + c.frequency_penalty * count as f32;
            }
        }
        if c.temperature == 0.0 {
            return Dist::Point(crate::model::math::argmax(&adjusted) as u32);
        }
        self.truncated(&adjusted)
    }

    /// Top-k, temperature, top-p and min-p: the candidates and their probabilities.
    fn truncated(&self, logits: &[f32]) -> Dist {
        let c = &self.config;
        let mut candidates: Vec<(u32, f32)> = logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i as u32, l)).collect();
        if candidates.is_empty() {
            return Dist::Point(crate::model::math::argmax(logits) as u32);
        }
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if c.top_k > 0 {
            candidates.truncate(c.top_k);
        }
        // Softmax at the temperature over what is left, highest first.
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates.iter().map(|x| ((x.1 - max) / c.temperature).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if c.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cumulative += p;
                    cumulative >= c.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        if c.min_p > 0.0 {
            let floor = probs[0] * c.min_p;
            let keep = probs.iter().position(|&p| p < floor).unwrap_or(probs.len()).max(1);
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        Dist::Probs(candidates.iter().zip(&probs).map(|(&(id, _), &p)| (id, p / total)).collect())
    }

    /// A draw from `dist` with this sampler's generator.
    pub fn draw_from(&mut self, dist: &Dist) -> u32 {
        match dist {
            Dist::Point(t) => *t,
            Dist::Probs(probs) => {
                let mut target = self.rng.next_f32();
                for &(id, p) in probs {
                    target -= p;
                    if target < 0.0 {
                        return id;
                    }
                }
                probs[probs.len() - 1].0
            }
        }
    }

    /// Speculative sampling (Leviathan et al. 2023, Chen et al. 2023): draft j, drawn from
    /// `q[j]`, is accepted with probability min(1, p_j(d) / q_j(d)), where p_j is this
    /// sampler's distribution for the target's logits `rows[j]` (penalties seeing the drafts
    /// before it); the first rejected draft is replaced by a draw from the normalised residual
    /// max(0, p_j - q_j); when all are accepted, a bonus token is drawn from `rows[k]`. The
    /// tokens come out distributed exactly as sampling the target alone would give them; for
    /// greedy settings (point masses) this accepts exactly the drafts equal to the target's
    /// argmax. Returns (drafts accepted, the token after them).
    pub fn accept_drafts(&mut self, drafts: &[u32], q: &[Dist], rows: &[&[f32]]) -> (usize, u32) {
        debug_assert!(drafts.len() == q.len() && rows.len() == drafts.len() + 1);
        for (j, (&d, q)) in drafts.iter().zip(q).enumerate() {
            let p = self.distribution(rows[j], &drafts[..j]);
            let (pd, qd) = (p.prob(d), q.prob(d));
            // u < p/q, written without the division (q(d) > 0: d was drawn from q).
            if pd >= qd || self.rng.next_f32() * qd < pd {
                continue;
            }
            return (j, self.draw_from(&p.residual(q)));
        }
        let p = self.distribution(rows[drafts.len()], drafts);
        (drafts.len(), self.draw_from(&p))
    }
}

/// What the next token is drawn from: one certain token (greedy), or candidates with their
/// probabilities (summing to 1).
#[derive(Debug, Clone, PartialEq)]
pub enum Dist {
    Point(u32),
    Probs(Vec<(u32, f32)>),
}

impl Dist {
    pub fn prob(&self, token: u32) -> f32 {
        match self {
            Dist::Point(t) => (*t == token) as u32 as f32,
            Dist::Probs(p) => p.iter().find(|(id, _)| *id == token).map_or(0.0, |&(_, p)| p),
        }
    }

    fn support(&self) -> Vec<(u32, f32)> {
        match self {
            Dist::Point(t) => vec![(*t, 1.0)],
            Dist::Probs(p) => p.clone(),
        }
    }

    /// max(0, self - q), normalised (self itself where that is zero everywhere).
    fn residual(&self, q: &Dist) -> Dist {
        let q: HashMap<u32, f32> = q.support().into_iter().collect();
        let rest: Vec<(u32, f32)> = self.support().into_iter().map(|(id, p)| (id, (p - q.get(&id).copied().unwrap_or(0.0)).max(0.0))).filter(|&(_, r)| r > 0.0).collect();
        let total: f32 = rest.iter().map(|(_, r)| r).sum();
        if total <= 0.0 {
            return self.clone();
        }
        match rest.as_slice() {
            [(id, _)] => Dist::Point(*id),
            _ => Dist::Probs(rest.into_iter().map(|(id, r)| (id, r / total)).collect()),
        }
    }
}

/// A seed from the clock (sampling without --seed).
pub fn clock_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// A small, fast, seedable generator (Steele, Lea, Flood 2014); plenty for sampling.
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(crate) fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> Sampler {
        Sampler::new(SamplerConfig { temperature, top_k, top_p, seed, ..Default::default() }, 100).unwrap()
    }

    fn with(config: SamplerConfig) -> Sampler {
        Sampler::new(config, 100).unwrap()
    }

    #[test]
    fn greedy_takes_the_argmax() {
        assert_eq!(sampler(0.0, 0, 1.0, 1).sample(&[0.1, 3.0, -2.0, 2.9]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_k_limits_choices() {
        let logits = [0.0, 1.0, 0.5, 0.9];
        let mut s = sampler(1.0, 1, 1.0, 7);
        assert!((0..100).all(|_| s.sample(&logits) == 1));
        let mut s = sampler(5.0, 2, 1.0, 7);
        assert!((0..500).all(|_| matches!(s.sample(&logits), 1 | 3)));
    }

    #[test]
    fn top_p_keeps_the_smallest_sufficient_set() {
        // Probabilities ~0.64, 0.24, 0.09, 0.03: top_p 0.7 keeps the first two.
        let logits = [3.0, 2.0, 1.0, 0.0];
        let mut s = sampler(1.0, 0, 0.7, 3);
        let draws: Vec<u32> = (0..1000).map(|_| s.sample(&logits)).collect();
        assert!(draws.iter().all(|&t| t <= 1));
        assert!(draws.contains(&1), "the second token must still be drawn sometimes");
    }

    #[test]
    fn min_p_drops_tokens_far_below_the_best() {
        // Probabilities ~0.64, 0.24, 0.09, 0.03: min_p 0.2 keeps p >= 0.128, the first two.
        let logits = [3.0, 2.0, 1.0, 0.0];
        let mut s = with(SamplerConfig { temperature: 1.0, min_p: 0.2, seed: 5, ..Default::default() });
        let draws: Vec<u32> = (0..1000).map(|_| s.sample(&logits)).collect();
        assert!(draws.iter().all(|&t| t <= 1) && draws.contains(&1));
    }

    #[test]
    fn penalties_and_bias_move_greedy_choices() {
        let logits = [2.0, 1.9, -1.0, 0.0];
        // Presence: token 0 already generated loses 0.5 and 1 wins.
        let mut s = with(SamplerConfig { presence_penalty: 0.5, ..Default::default() });
        assert_eq!(s.sample(&logits), 0);
        s.accept(0);
        assert_eq!(s.sample(&logits), 1);
        // Frequency grows with the count.
        let mut s = with(SamplerConfig { frequency_penalty: 0.06, ..Default::default() });
        s.accept(0);
        assert_eq!(s.sample(&logits), 0);
        s.accept(0);
        assert_eq!(s.sample(&logits), 1);
        // Repetition covers the prompt: 2.0 / 1.1 < 1.9.
        let mut s = with(SamplerConfig { repetition_penalty: 1.1, ..Default::default() });
        s.start(&[0]);
        assert_eq!(s.sample(&logits), 1);
        // A bias of -inf bans a token; +10 forces one.
        let mut s = with(SamplerConfig { logit_bias: vec![(0, f32::NEG_INFINITY), (1, f32::NEG_INFINITY)], ..Default::default() });
        assert_eq!(s.sample(&logits), 3);
        let mut s = with(SamplerConfig { temperature: 1.0, logit_bias: vec![(2, 100.0)], ..Default::default() });
        assert!((0..50).all(|_| s.sample(&logits) == 2));
    }

    #[test]
    fn logprobs_are_the_models_log_softmax() {
        let logits = [1.0f32, 3.0, 2.0];
        let lp = logprobs(&logits, 2, 2);
        let total: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        assert!((lp.logprob as f64 - (2.0f64.exp() / total).ln()).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((lp.top.iter().map(|t| (t.1 as f64).exp()).sum::<f64>() - (3f64.exp() + 2f64.exp()) / total).abs() < 1e-6);
    }

    /// Speculative sampling's output against the target distribution on a tiny vocabulary:
    /// each trial draws a draft from q, runs the acceptance rule against the target, and counts
    /// the first emitted token. Pearson's chi-squared of the counts against N·p must stay below
    /// 16.27 (3 degrees of freedom: a right rule exceeds it one run in a thousand; the seed is
    /// fixed, so the test is deterministic). The naive rule (keep every draft) is shown to
    /// fail the same bound by far, so the test can fail.
    #[test]
    fn speculative_sampling_gives_the_target_distribution() {
        const N: usize = 40_000;
        let chi2 = |counts: &[usize], p: &Dist| -> f64 {
            (0..4u32)
                .map(|t| {
                    let expected = N as f64 * p.prob(t) as f64;
                    if expected == 0.0 {
                        // A token the target never gives: any count is a failure.
                        return if counts[t as usize] == 0 { 0.0 } else { f64::INFINITY };
                    }
                    (counts[t as usize] as f64 - expected).powi(2) / expected
                })
                .sum()
        };
        let target = [2.0f32, 1.0, 0.5, -1.0];
        let draft = [0.0f32, 1.5, 0.2, 0.8];
        let bonus = [0.0f32; 4];
        // Plain temperature sampling, and one whose top-k drops a token the draft favours.
        for (temperature, top_k) in [(1.0, 0), (0.7, 3)] {
            let mut s = sampler(temperature, top_k, 1.0, 7);
            let p = s.distribution(&target, &[]);
            let q = s.distribution(&draft, &[]);
            let mut counts = [0usize; 4];
            let mut naive = [0usize; 4];
            for _ in 0..N {
                let d = s.draw_from(&q);
                naive[d as usize] += 1;
                let (accepted, next) = s.accept_drafts(&[d], std::slice::from_ref(&q), &[&target, &bonus]);
                counts[if accepted == 1 { d } else { next } as usize] += 1;
            }
            let (got, wrong) = (chi2(&counts, &p), chi2(&naive, &p));
            eprintln!("T={temperature} top-k {top_k}: chi-squared {got:.2} (naive rule {wrong:.0}) for {counts:?}");
            assert!(got < 16.27, "T={temperature} top-k {top_k}: chi-squared {got:.2} for {counts:?} against {p:?}");
            assert!(wrong > 1000.0, "T={temperature} top-k {top_k}: the naive rule's chi-squared is only {wrong:.2}");
        }
        // Greedy: drafts equal to the argmax are kept, others replaced by it.
        let mut s = sampler(0.0, 0, 1.0, 7);
        assert_eq!(s.accept_drafts(&[0], &[Dist::Point(0)], &[&target, &bonus]), (1, 0));
        assert_eq!(s.accept_drafts(&[1], &[Dist::Point(1)], &[&target, &bonus]), (0, 0));
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let a: Vec<u32> = {
            let mut s = sampler(0.8, 0, 1.0, 42);
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = sampler(0.8, 0, 1.0, 42);
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn bad_settings_are_errors() {
        let bad = |c: SamplerConfig| Sampler::new(c, 100).is_err();
        assert!(bad(SamplerConfig { temperature: -1.0, ..Default::default() }));
        assert!(bad(SamplerConfig { temperature: f32::NAN, ..Default::default() }));
        assert!(bad(SamplerConfig { top_p: 0.0, ..Default::default() }));
        assert!(bad(SamplerConfig { min_p: 1.5, ..Default::default() }));
        assert!(bad(SamplerConfig { repetition_penalty: 0.0, ..Default::default() }));
        assert!(bad(SamplerConfig { presence_penalty: 3.0, ..Default::default() }));
        assert!(bad(SamplerConfig { logit_bias: vec![(100, 1.0)], ..Default::default() }));
    }
}
