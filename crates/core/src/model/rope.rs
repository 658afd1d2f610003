//! Rotary position embedding on the `qk_rope_head_dim` dims, in interleaved pairs
//! `(x[2j], x[2j+1])` as the published weights are laid out, with optional YaRN scaling.

pub use crate::config::Rope;

impl Rope {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    fn v3() -> ModelConfig {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/deepseek_v3_config.json");
        ModelConfig::from_file(&path).unwrap()
    }

    /// Values from transformers' `_compute_yarn_parameters` for the published V3 config.
    #[test]
    fn yarn_frequencies_match_transformers_for_v3() {
        let rope = Rope::new(&v3());
        let expected = [
            (0, 1.0),
            (9, 0.07498941570520401),
            (10, 0.05623412877321243),
            (11, 0.039006926119327545),
            (15, 0.0083345090970397),
            (20, 0.0007905694073997438),
            (23, 3.333803397254087e-05),
            (24, 2.499999936844688e-05),
            (31, 3.3338035336782923e-06),
        ];
        for (j, want) in expected {
            let got = rope.inv_freq[j] as f64;
            assert!((got - want).abs() <= want * 2e-7, "inv_freq[{j}] = {got}, transformers {want}");
        }
        assert_eq!(rope.scale, 1.0, "V3's mscale == mscale_all_dim gives an attention factor of 1");
    }

    #[test]
    fn yarn_ramp_interpolates_between_extrapolation_and_interpolation() {
        let c = v3();
        let rope = Rope::new(&c);
        // low = floor(corr(32)) = 10, high = ceil(corr(1)) = 23 for V3: below low frequencies are
        // untouched, above high they are divided by the factor, in between a linear blend.
        for j in 0..32 {
            let base = 10000f64.powf(-(2.0 * j as f64) / 64.0);
            let ratio = base / rope.inv_freq[j] as f64;
            if j <= 10 {
                assert!((ratio - 1.0).abs() < 1e-6, "pair {j} should keep its frequency");
            } else if j >= 23 {
                assert!((ratio - 40.0).abs() < 1e-4, "pair {j} should be divided by 40");
            } else {
                assert!(ratio > 1.0 && ratio < 40.0, "pair {j} should be blended");
            }
        }
    }

    #[test]
    fn plain_rope_without_scaling() {
        let mut c = v3();
        c.yarn = None;
        let rope = Rope::new(&c);
        assert_eq!(rope.inv_freq.len(), 32);
        assert!((rope.inv_freq[1] as f64 - 10000f64.powf(-2.0 / 64.0)).abs() < 1e-7);
        assert_eq!(rope.scale, 1.0);
    }

    #[test]
    fn rotation_is_interleaved_pairs() {
        let mut x = [1.0, 0.0, 0.0, 2.0];
        let (cos, sin) = (vec![0.0, 1.0], vec![1.0, 0.0]);
        Rope::apply(&mut x, &cos, &sin);
        // Pair 0 rotated by 90 degrees: (1, 0) -> (0, 1); pair 1 by 0: unchanged.
        assert_eq!(x, [0.0, 1.0, 0.0, 2.0]);
    }
}
