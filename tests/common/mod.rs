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
