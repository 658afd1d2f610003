//! The CPU backend's kernels (`backend::cpu`, being built): every op it lowers so far held to
//! the CPU reference by the conformance harness (tests/common/conformance.rs), every weight
//! format, odd shapes; the ops it does not lower yet are refused with an error naming the op.

mod common;
use dsrun::backend::cpu::CpuBackend;
use dsrun::runtime::Lab;

fn lab() -> Lab<CpuBackend> {
    Lab::new(CpuBackend::new()).unwrap()
}

#[test]
fn conformance_of_the_ops_the_cpu_backend_lowers() {
    common::conformance::dense_and_moe(&mut lab(), "cpu backend");
}

/// MLA's attention layer in every cache format (V3.2's indexer is still to come).
#[test]
fn conformance_of_attention_on_the_cpu_backend() {
    common::conformance::attention_of(&mut lab(), &["v3_noaux", "v2_lite", "v3_fp8", "v3_yarn"]);
}

/// The indexer is not lowered yet: a plan holding it is refused naming the op, never run wrong.
#[test]
fn ops_not_lowered_yet_are_refused_by_name() {
    let lab = &mut lab();
    let (scores, positions, selected) = (lab.zeros(64).unwrap(), lab.zeros(64).unwrap(), lab.zeros(64).unwrap());
    let shape = dsrun::plan::IndexerShape { heads: 1, dim: 4, rope: 2, topk: 2, ctx: 8, rope_scale: 1.0, cache: Default::default() };
    let op = dsrun::plan::Op::IndexerTopK { scores, positions, selected, shape };
    let err = lab.lower(&[op]).expect_err("the indexer is not lowered yet").to_string();
    assert!(err.contains("`indexer_top_k`"), "{err}");
}
