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
        SamplerConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: 0,
        }
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
    TokenLogprob {
        token,
        logprob: logits.get(token as usize).map_or(f32::NEG_INFINITY, |&l| l - log_total),
        top: best.into_iter().map(|(i, l)| (i, l - log_total)).collect(),
    }
}

pub struct Sampler {
    config: SamplerConfig,
    rng: SplitMix64,
    /// Tokens of the prompt (repetition penalty) and counts of generated ones.
    prompt: std::collections::HashSet<u32>,
    generated: HashMap<u32, u32>,
    /// Reused between draws.
    scratch: Vec<f32>,
}

impl Sampler {
    pub fn new(config: SamplerConfig, vocab: usize) -> Result<Sampler> {
        config.validate(vocab)?;
        let rng = SplitMix64(config.seed);
        Ok(Sampler { config, rng, prompt: Default::default(), generated: HashMap::new(), scratch: Vec::new() })
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
        let c = &self.config;
        if !c.has_penalties() && c.temperature == 0.0 {
            return crate::backend::cpu::argmax(logits) as u32;
        }
        let mut adjusted = std::mem::take(&mut self.scratch);
        adjusted.clear();
        adjusted.extend_from_slice(logits);
        for &(id, bias) in &c.logit_bias {
            if let Some(l) = adjusted.get_mut(id as usize) {
                *l += bias;
            }
        }
        if c.repetition_penalty != 1.0 {
            for &id in self.prompt.iter().chain(self.generated.keys()) {
                if let Some(l) = adjusted.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l / c.repetition_penalty } else { *l * c.repetition_penalty };
                }
            }
        }
        for (&id, &count) in &self.generated {
            if let Some(l) = adjusted.get_mut(id as usize) {
                *l -= c.presence_penalty + c.frequency_penalty * count as f32;
            }
        }
        let token = if c.temperature == 0.0 { crate::backend::cpu::argmax(&adjusted) as u32 } else { self.draw(&adjusted) };
        self.scratch = adjusted;
        token
    }

    /// Top-k, temperature, top-p and min-p, then a draw.
    fn draw(&mut self, logits: &[f32]) -> u32 {
        let c = &self.config;
        let mut candidates: Vec<(u32, f32)> = logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i as u32, l)).collect();
        if candidates.is_empty() {
            return crate::backend::cpu::argmax(logits) as u32;
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
        let mut target = self.rng.next_f32() * total;
        for (i, p) in probs.iter().enumerate() {
            target -= p;
            if target < 0.0 {
                return candidates[i].0;
            }
        }
        candidates[probs.len() - 1].0
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
