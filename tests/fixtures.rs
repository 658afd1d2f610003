//! Whole-model logits against transformers' float32 reference on every fixture family, plus
//! self-consistency: prefill vs token-by-token decode, absorbed vs naive attention.
//!
//! Tolerance: 1e-3 of the largest reference logit. An f32 forward pass differs from PyTorch's
//! only in summation order (~1e-6 relative per op); 1e-3 leaves room for that through every layer
//! while any wrong formula (a norm, a scale, a routing choice) moves logits by far more.

mod common;
use common::*;
use dsrun::model::{AttentionMode, Logits, Model};

const TOLERANCE: f32 = 1e-3;

#[test]
fn prefill_matches_transformers_on_every_family() {
    for family in FAMILIES {
        let dir = fixture(family);
        let g = golden(&dir);
        let model = Model::load(&dir).unwrap_or_else(|e| panic!("{family}: {e}"));
        let mut cache = model.new_cache(g.tokens.len());
        let logits = model.forward(&mut cache, &g.tokens, Logits::All).unwrap();
        let err = relative_error(&logits, &g.logits);
        eprintln!("{family}: relative error {err:e}");
        assert_logits_match(family, &logits, &g.logits, g.vocab, TOLERANCE);
    }
}

#[test]
fn decode_token_by_token_equals_prefill() {
    for family in FAMILIES {
        let dir = fixture(family);
        let g = golden(&dir);
        let model = Model::load(&dir).unwrap();
        let mut cache = model.new_cache(g.tokens.len());
        let prefill = model.forward(&mut cache, &g.tokens, Logits::All).unwrap();

        let mut cache = model.new_cache(g.tokens.len());
        let mut decoded = Vec::new();
        // A prompt chunk first, then single tokens, as generation does.
        decoded.extend(model.forward(&mut cache, &g.tokens[..5], Logits::All).unwrap());
        for &t in &g.tokens[5..] {
            decoded.extend(model.forward(&mut cache, &[t], Logits::All).unwrap());
        }
        assert_eq!(cache.len(), g.tokens.len());
        // Same math, different matmul batch shapes: only summation order may differ.
        assert_logits_match(&format!("{family} decode"), &decoded, &prefill, g.vocab, 1e-5);
        assert_logits_match(&format!("{family} decode vs transformers"), &decoded, &g.logits, g.vocab, TOLERANCE);
    }
}

#[test]
fn absorbed_attention_equals_naive_attention() {
    for family in FAMILIES {
        let dir = fixture(family);
        let g = golden(&dir);
        let mut model = Model::load(&dir).unwrap();
        let mut cache = model.new_cache(g.tokens.len());
        let absorbed = model.forward(&mut cache, &g.tokens, Logits::All).unwrap();
        model.attention_mode = AttentionMode::Naive;
        let mut cache = model.new_cache(g.tokens.len());
        let naive = model.forward(&mut cache, &g.tokens, Logits::All).unwrap();
        assert_logits_match(&format!("{family} naive"), &naive, &absorbed, g.vocab, 1e-5);
        assert_logits_match(&format!("{family} naive vs transformers"), &naive, &g.logits, g.vocab, TOLERANCE);
    }
}

#[test]
fn last_logits_equal_the_last_row_of_all() {
    let dir = fixture("v3_noaux");
    let g = golden(&dir);
    let model = Model::load(&dir).unwrap();
    let mut cache = model.new_cache(g.tokens.len());
    let last = model.forward(&mut cache, &g.tokens, Logits::Last).unwrap();
    assert_eq!(last.len(), g.vocab);
    let tail = &g.logits[(g.tokens.len() - 1) * g.vocab..];
    assert_logits_match("last", &last, tail, g.vocab, TOLERANCE);
}
