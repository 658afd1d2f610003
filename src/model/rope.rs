//! Rotary position embedding on the `qk_rope_head_dim` dims, in interleaved pairs
//! `(x[2j], x[2j+1])` as the published weights are laid out, with optional YaRN scaling.

use crate::config::{yarn_mscale, ModelConfig};

#[derive(Debug, Clone)]
pub struct Rope {
    /// One frequency per rotated pair, rounded to f32 as transformers stores them.
    pub inv_freq: Vec<f32>,
    /// Multiplier on cos and sin (YaRN's attention factor; 1 without YaRN or for V3's mscales).
    pub scale: f32,
}

impl Rope {
    pub fn new(config: &ModelConfig) -> Rope {
        let dim = config.qk_rope_head_dim;
        let theta = config.rope_theta;
        let base: Vec<f64> = (0..dim / 2).map(|j| theta.powf(-(2.0 * j as f64) / dim as f64)).collect();
        let Some(y) = &config.yarn else {
            return Rope { inv_freq: base.iter().map(|&f| f as f32).collect(), scale: 1.0 };
        };
        let correction = |rotations: f64| {
            dim as f64 * (y.original_max_position_embeddings as f64 / (2.0 * std::f64::consts::PI * rotations)).ln()
                / (2.0 * theta.ln())
        };
        let low = correction(y.beta_fast).floor().max(0.0);
        let mut high = correction(y.beta_slow).ceil().min(dim as f64 - 1.0);
        if high == low {
            high += 0.001;
        }
        let inv_freq = base
            .iter()
            .enumerate()
            .map(|(j, &f)| {
                let ramp = ((j as f64 - low) / (high - low)).clamp(0.0, 1.0);
                (f / y.factor * ramp + f * (1.0 - ramp)) as f32
            })
            .collect();
        let scale = y
            .attention_factor
            .unwrap_or_else(|| yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim));
        Rope { inv_freq, scale: scale as f32 }
    }

    /// `(cos, sin)` of every pair's angle at `position`, scaled.
    pub fn angles(&self, position: usize) -> (Vec<f32>, Vec<f32>) {
        self.inv_freq
            .iter()
            .map(|&f| {
                let angle = position as f32 * f;
                (angle.cos() * self.scale, angle.sin() * self.scale)
            })
            .unzip()
    }

    /// Rotates one head's rope slice in place with angles from [`Rope::angles`].
    pub fn apply(x: &mut [f32], cos: &[f32], sin: &[f32]) {
        for (pair, (&c, &s)) in x.chunks_exact_mut(2).zip(cos.iter().zip(sin)) {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * c - b * s;
            pair[1] = a * s + b * c;
        }
    }
}
