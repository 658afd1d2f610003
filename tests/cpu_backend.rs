//! The CPU backend (`backend::cpu`, being built): every op it lowers held to the CPU reference
//! by the conformance harness (tests/common/conformance.rs), every weight and cache format, odd
//! shapes; the whole model through the runtime (the same step loop as the GPUs') against
//! transformers' logits on every fixture family, in prefill and token by token; what it does
//! not lower yet (expert slot pools) is refused with an error naming it.
//!
//! Tolerances: ops as the harness states them; whole-model logits 1e-3 of the largest reference
//! logit, as every backend's fixture tests.

mod common;
use common::*;
use dsrun::backend::cpu::{CpuBackend, Simd};
use dsrun::engine::Steps;
use dsrun::model::{Logits, Model};
use dsrun::runtime::{Lab, Runtime};

fn lab() -> Lab<CpuBackend> {
    Lab::new(CpuBackend::new()).unwrap()
}

#[test]
fn conformance_of_every_op_on_the_cpu_backend() {
    common::conformance::run_all(&mut lab(), "cpu backend");
}

/// The matmul kernels at every SIMD level this machine runs (the highest is the default; the
/// others are what a CPU without it runs): every format, shape and token count.
#[test]
fn every_simd_level_gives_the_references_results() {
    let levels = Simd::available();
    assert!(levels.contains(&Simd::Portable));
    if !cfg!(target_arch = "x86_64") || levels.len() < 3 {
        // The levels this CPU lacks need other hardware: reported, not failed.
        common::skip("every_simd_level_gives_the_references_results", &format!("this CPU runs {levels:?} only"), true);
    }
    for level in levels {
        let mut lab = Lab::new(CpuBackend::with_simd(level).unwrap()).unwrap();
        common::conformance::dense_and_moe(&mut lab, &format!("cpu backend, {}", level.name()));
    }
}

#[test]
fn whole_model_matches_transformers_on_every_family() {
    for family in FAMILIES {
        let dir = fixture(family);
        let g = golden(&dir);
        let model = Model::load(&dir).unwrap();
        let mut engine = Runtime::new(CpuBackend::new(), &model, g.tokens.len(), dsrun::quant::QuantTarget::Keep).unwrap();
        let logits = engine.forward(&g.tokens, Logits::All).unwrap();
        eprintln!("{family}: CPU backend relative error {:e}", relative_error(&logits, &g.logits));
        assert_logits_match(&format!("{family} on the CPU backend, prefill"), &logits, &g.logits, g.vocab, 1e-3);
        engine.reset();
        let mut decoded = engine.forward(&g.tokens[..3], Logits::All).unwrap();
        for &t in &g.tokens[3..] {
            decoded.extend(engine.forward(&[t], Logits::Last).unwrap());
        }
        assert_logits_match(&format!("{family} on the CPU backend, token by token"), &decoded, &g.logits, g.vocab, 1e-3);
        engine.reset();
        let greedy = engine.forward_greedy(&g.tokens).unwrap();
        assert_eq!(greedy as usize, argmax(&g.logits[(g.tokens.len() - 1) * g.vocab..]), "{family}: the greedy id");
    }
}

/// Expert slot pools are not lowered yet: a budget that streams experts is refused naming
/// them, never run wrong.
#[test]
fn what_is_not_lowered_yet_is_refused_by_name() {
    let model = Model::load(&fixture("v3_noaux")).unwrap();
    let options = dsrun::plan::budget::GpuOptions { gpu_mem: dsrun::plan::budget::GpuMem::ExpertShare(0.3), ..Default::default() };
    let err = Runtime::with_options(CpuBackend::new(), &model, 16, &options).err().expect("streamed experts are not lowered yet").to_string();
    assert!(err.contains("slot pools"), "{err}");
}
