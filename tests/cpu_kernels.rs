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

/// Attention is not lowered yet: a plan holding it is refused naming the op, never run wrong.
#[test]
fn ops_not_lowered_yet_are_refused_by_name() {
    let lab = &mut lab();
    let (q, cache) = (lab.zeros(64).unwrap(), lab.zeros(64).unwrap());
    let mla = dsrun::plan::MlaShape { heads: 1, nope: 2, rope: 2, v: 2, lora: 2, ctx: 4, scale: 1.0, rope_scale: 1.0, cache: Default::default() };
    let op = dsrun::plan::Op::Attention { q, q_lat: q, positions: q, cache, scratch: q, o_lat: cache, mla, sparse: None };
    let err = lab.lower(&[op]).expect_err("attention is not lowered yet").to_string();
    assert!(err.contains("`attention`"), "{err}");
}
