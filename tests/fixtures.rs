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

/// The MTP layer's draft logits against the torch reference (tools/make_mtp_fixtures.py),
/// fed dsrun's own main-model hidden states (checked too), on the bf16 and the FP8 family.
#[test]
fn mtp_draft_logits_match_the_reference() {
    for family in MTP_FAMILIES {
        let dir = fixture(family);
        let g = golden_mtp(&dir).unwrap_or_else(|| panic!("{family}: golden_mtp.safetensors"));
        let model = Model::load(&dir).unwrap();
        assert!(model.weights.mtp.is_some(), "{family}: MTP layer loaded");
        assert!(model.ignored.is_empty(), "{family}: unused tensors {:?}", model.ignored);
        let n = g.tokens.len();
        let (_, hidden) = model.forward_hidden(&mut model.new_cache(n), &g.tokens).unwrap();
        let d = model.config.hidden_size;
        let hidden = &hidden[..(n - 1) * d];
        let err = relative_error(hidden, &g.hidden);
        assert!(err <= TOLERANCE, "{family}: hidden states, relative error {err:e}");
        let mut cache = model.new_mtp_cache(n).unwrap();
        let (logits, _) = model.mtp_forward(&mut cache, &g.tokens[1..], hidden).unwrap();
        eprintln!("{family}: MTP draft relative error {:e}", relative_error(&logits, &g.logits));
        assert_logits_match(&format!("{family} MTP"), &logits, &g.logits, model.config.vocab_size, TOLERANCE);
        // Position by position, as decoding drafts, gives the same.
        let mut cache = model.new_mtp_cache(n).unwrap();
        let mut stepped = Vec::new();
        for i in 0..n - 1 {
            stepped.extend(model.mtp_forward(&mut cache, &g.tokens[i + 1..i + 2], &hidden[i * d..(i + 1) * d]).unwrap().0);
        }
        assert_logits_match(&format!("{family} MTP step by step"), &stepped, &g.logits, model.config.vocab_size, TOLERANCE);
    }
}

/// DeepSeek-V3.2 (sparse attention: the indexer picks 5 of up to 24 positions per query) on
/// the CPU reference against transformers' `DeepseekV32ForCausalLM`, in prefill and token by
/// token; the selection matters (attending densely moves the logits by far more than the
/// tolerance). `v32` is in FAMILIES, so every backend's whole-model tests run it too.
#[test]
fn deepseek_v32_sparse_attention_matches_transformers_on_the_cpu() {
    let dir = fixture("v32");
    let g = golden(&dir);
    let model = Model::load(&dir).unwrap();
    assert!(model.config.indexer.is_some() && model.ignored.is_empty(), "{:?}", model.ignored);
    let n = g.tokens.len();
    let logits = model.forward(&mut model.new_cache(n), &g.tokens, Logits::All).unwrap();
    eprintln!("v32: relative error {:e}", relative_error(&logits, &g.logits));
    assert_logits_match("v32 prefill", &logits, &g.logits, g.vocab, TOLERANCE);
    let mut cache = model.new_cache(n);
    let mut decoded = model.forward(&mut cache, &g.tokens[..3], Logits::All).unwrap();
    for &t in &g.tokens[3..] {
        decoded.extend(model.forward(&mut cache, &[t], Logits::All).unwrap());
    }
    assert_logits_match("v32 decode", &decoded, &g.logits, g.vocab, TOLERANCE);

    let mut dense = model.config.clone();
    dense.indexer = dense.indexer.map(|ix| dsrun::config::IndexerConfig { topk: n, ..ix });
    let dense = Model::from_checkpoint(dense, &dsrun::checkpoint::Checkpoint::open(&dir).unwrap()).unwrap();
    let all = dense.forward(&mut dense.new_cache(n), &g.tokens, Logits::All).unwrap();
    assert!(relative_error(&all, &g.logits) > 0.1, "the indexer's selection changes nothing on this fixture");
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
