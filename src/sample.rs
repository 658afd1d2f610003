//! Choosing the next token from logits: greedy, or temperature with top-k and top-p, seeded.

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct SamplerConfig {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f32,
    pub seed: u64,
}

impl SamplerConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Invalid(format!("--temperature must be a number >= 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Invalid(format!("--top-p must be in (0, 1], got {}", self.top_p)));
        }
        Ok(())
    }
}

pub struct Sampler {
    config: SamplerConfig,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(config: SamplerConfig) -> Result<Sampler> {
        config.validate()?;
        let rng = SplitMix64(config.seed);
        Ok(Sampler { config, rng })
    }

    /// Greedy decoding needs no logits on the host: engines can return the argmax directly.
    pub fn is_greedy(&self) -> bool {
        self.config.temperature == 0.0
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.config.temperature == 0.0 {
            return crate::backend::cpu::argmax(logits) as u32;
        }
        let mut candidates: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.config.top_k > 0 {
            candidates.truncate(self.config.top_k);
        }
        // Softmax at the temperature over what is left, highest first.
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates.iter().map(|c| ((c.1 - max) / self.config.temperature).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.config.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cumulative += p;
                    cumulative >= self.config.top_p
                })
                .map_or(probs.len(), |i| i + 1);
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
        Sampler::new(SamplerConfig { temperature, top_k, top_p, seed }).unwrap()
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
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let a: Vec<u32> = { let mut s = sampler(0.8, 0, 1.0, 42); (0..20).map(|_| s.sample(&logits)).collect() };
        let b: Vec<u32> = { let mut s = sampler(0.8, 0, 1.0, 42); (0..20).map(|_| s.sample(&logits)).collect() };
        assert_eq!(a, b);
    }

    #[test]
    fn bad_settings_are_errors() {
        assert!(Sampler::new(SamplerConfig { temperature: -1.0, top_k: 0, top_p: 1.0, seed: 0 }).is_err());
        assert!(Sampler::new(SamplerConfig { temperature: 1.0, top_k: 0, top_p: 0.0, seed: 0 }).is_err());
        assert!(Sampler::new(SamplerConfig { temperature: f32::NAN, top_k: 0, top_p: 1.0, seed: 0 }).is_err());
    }
}
