//! Helpers shared by the integration tests: golden fixtures and logits comparison.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub const FAMILIES: [&str; 5] = ["v3_noaux", "v3_yarn", "v3_fp8", "v2_lite", "v2_glg"];

/// A fixture directory. `DSRUN_FIXTURES=DIR` points the tests at fixtures made elsewhere, e.g.
/// `tools/make_fixtures.py --out DIR --seed 7 --scale 1.5`, to check nothing is tuned to these.
pub fn fixture(name: &str) -> PathBuf {
    match std::env::var_os("DSRUN_FIXTURES") {
        Some(dir) => PathBuf::from(dir).join(name),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name),
    }
}

/// transformers' float32 logits for a fixture: `(tokens, logits [n, vocab])`.
pub struct Golden {
    pub tokens: Vec<u32>,
    pub logits: Vec<f32>,
    pub vocab: usize,
}

pub fn golden(dir: &Path) -> Golden {
    let bytes = std::fs::read(dir.join("golden.safetensors")).expect("golden.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("golden parses");
    let tokens = st.tensor("tokens").unwrap();
    let tokens = tokens.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect();
    let logits = st.tensor("logits").unwrap();
    let vocab = logits.shape()[1];
    let logits = logits.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    Golden { tokens, logits, vocab }
}

/// `max |a - b| / max |b|`: the error relative to the reference's scale.
pub fn relative_error(a: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(a.len(), reference.len());
    let scale = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = a.iter().zip(reference).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

pub fn argmax(x: &[f32]) -> usize {
    dsrun::backend::cpu::argmax(x)
}

/// Asserts the stated tolerance and the same argmax at every position.
pub fn assert_logits_match(what: &str, got: &[f32], reference: &[f32], vocab: usize, tolerance: f32) {
    let err = relative_error(got, reference);
    assert!(err <= tolerance, "{what}: relative error {err:e} exceeds {tolerance:e}");
    for (pos, (g, r)) in got.chunks(vocab).zip(reference.chunks(vocab)).enumerate() {
        assert_eq!(argmax(g), argmax(r), "{what}: argmax differs at position {pos}");
    }
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn random(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Router cases for GPU kernel tests: every scoring function and top-k method, with and without
/// a correction bias, and a token whose logits all tie.
pub struct RouterCase {
    pub params: dsrun::model::router::RouterParams,
    pub experts: usize,
    pub tokens: usize,
    pub logits: Vec<f32>,
    pub bias: Option<Vec<f32>>,
}

#[allow(dead_code)]
pub fn router_cases() -> Vec<RouterCase> {
    use dsrun::config::{ScoringFunc, TopkMethod};
    use dsrun::model::router::RouterParams;
    let configs = [
        (ScoringFunc::Sigmoid, TopkMethod::NoauxTc, 8, 4, 8, true, 2.5, 256),
        (ScoringFunc::Sigmoid, TopkMethod::NoauxTc, 4, 2, 4, true, 1.0, 20),
        (ScoringFunc::Softmax, TopkMethod::Greedy, 1, 1, 6, false, 1.0, 64),
        (ScoringFunc::Softmax, TopkMethod::GroupLimitedGreedy, 4, 2, 3, false, 16.0, 36),
    ];
    configs
        .iter()
        .enumerate()
        .map(|(i, &(scoring, method, n_group, topk_group, top_k, normalize, scaling, experts))| {
            let tokens = 5;
            let mut logits: Vec<f32> = random(40 + i as u64, tokens * experts).iter().map(|v| v * 4.0).collect();
            // The last token: all logits equal, so every choice is a tie broken by index.
            logits[4 * experts..].iter_mut().for_each(|v| *v = 0.25);
            let bias = (method == TopkMethod::NoauxTc).then(|| random(50 + i as u64, experts).iter().map(|v| v * 0.6).collect());
            RouterCase { params: RouterParams { scoring, method, n_group, topk_group, top_k, normalize, scaling }, experts, tokens, logits, bias }
        })
        .collect()
}

impl RouterCase {
    /// Asserts a GPU's ids and weights (`[tokens, top_k]`) are the CPU reference's choice.
    #[allow(dead_code)]
    pub fn check(&self, what: &str, ids: &[u32], weights: &[f32]) {
        let k = self.params.top_k;
        for t in 0..self.tokens {
            let want = dsrun::model::router::route(&self.logits[t * self.experts..][..self.experts], self.bias.as_deref(), &self.params);
            let want_ids: Vec<u32> = want.iter().map(|w| w.0 as u32).collect();
            assert_eq!(&ids[t * k..][..k], &want_ids[..], "{what} token {t}: expert ids");
            for (j, w) in want.iter().enumerate() {
                assert!((weights[t * k + j] - w.1).abs() <= 1e-5 * w.1.abs().max(1.0), "{what} token {t}: weight {j}");
            }
        }
    }
}

/// Prefill of the first half of `tokens`, then decode of the rest one by one, twice (the second
/// time with warm caches), all logits concatenated: the expert-streaming tests' workload.
#[allow(dead_code)]
pub fn prefill_then_decode_twice(engine: &mut dyn dsrun::engine::Engine, tokens: &[u32]) -> Vec<f32> {
    use dsrun::model::Logits;
    let half = tokens.len() / 2;
    let mut out = Vec::new();
    for _ in 0..2 {
        engine.reset();
        out.extend(engine.forward(&tokens[..half], Logits::All).unwrap());
        for &t in &tokens[half..] {
            out.extend(engine.forward(&[t], Logits::Last).unwrap());
        }
    }
    out
}
