//! Expert streaming (`--gpu-mem`): with routed experts in a GPU slot cache smaller than the
//! model, logits must equal the all-resident path's bit for bit. The expert kernel is the same,
//! reading the same weights from a slot instead of the stack, so every sum runs in the same
//! order: no tolerance is needed, and any difference is a streaming bug (a stale slot, a wrong
//! slot table, a lost round).

mod common;
use common::*;
use dsrun::backend::wgpu::context;
use dsrun::device::GpuChoice;
use dsrun::model::Model;
use dsrun::plan::budget::Eviction;
use dsrun::plan::budget::{ExpertPlacement, GpuMem, GpuOptions, Prefetch};
use dsrun::runtime::GpuModel;

fn ctx() -> dsrun::backend::wgpu::GpuContext {
    context::open(GpuChoice::Auto).expect("a wgpu adapter (on Debian: apt-get install mesa-vulkan-drivers)")
}

fn assert_bitwise(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: logits count");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a.to_bits() != b.to_bits()) {
        panic!("{what}: logit {i} is {} streamed, {} all-resident", got[i], want[i]);
    }
}

#[test]
fn streamed_logits_equal_all_resident_logits_on_every_family() {
    for family in FAMILIES {
        let dir = fixture(family);
        let g = golden(&dir);
        let model = Model::load(&dir).unwrap();
        let mut resident = GpuModel::new(ctx(), &model, g.tokens.len(), Default::default()).unwrap();
        assert_eq!(resident.expert_slots(), None, "{family}: auto budget keeps every expert resident");
        let want = prefill_then_decode_twice(&mut resident, &g.tokens);
        assert_logits_match(family, &want[..g.logits.len()], &g.logits, g.vocab, 1e-3);

        let plan = resident.memory_plan();
        let budgets = [("50%", GpuMem::ExpertShare(0.5)), ("25%", GpuMem::ExpertShare(0.25)), ("minimum", GpuMem::Bytes(plan.minimum()))];
        for (name, gpu_mem) in budgets {
            for (eviction, prefetch) in [(Eviction::Lru, Prefetch::On), (Eviction::Lfu, Prefetch::Off)] {
                let options = GpuOptions { gpu_mem, eviction, prefetch, placement: ExpertPlacement::Stream, ..Default::default() };
                let mut streamed = GpuModel::with_options(ctx(), &model, g.tokens.len(), &options).unwrap();
                let slots = streamed.expert_slots().expect("a budget below all-resident streams");
                assert!(slots < plan.experts as usize);
                let got = prefill_then_decode_twice(&mut streamed, &g.tokens);
                let what = format!("{family} at {name} ({slots} slots, {eviction:?}, prefetch {prefetch:?})");
                assert_bitwise(&what, &got, &want);
                let c = streamed.stream_counters().unwrap();
                assert!(c.misses > 0 && c.hits + c.misses > 0, "{what}: {c:?}");
                if name == "minimum" {
                    assert_eq!(slots as u64, plan.top_k);
                    // A prefill chunk wants more distinct experts than k slots: several rounds.
                    assert!(c.rounds > c.syncs, "{what}: prefill ran in one round per layer: {c:?}");
                }
                if prefetch == Prefetch::On {
                    assert!(c.predicted > 0, "{what}: no guesses made: {c:?}");
                }
            }
        }
    }
}

#[test]
fn streamed_logits_equal_all_resident_with_slots_split_over_many_pools() {
    // Tiny bindings force every matrix into row chunks and the expert cache into pools of a
    // few slots each, as V3's 44 MB FP8 experts are against a 128 MiB binding.
    for family in ["v3_noaux", "v3_fp8", "v2_glg"] {
        let dir = fixture(family);
        let g = golden(&dir);
        let model = Model::load(&dir).unwrap();
        let largest = model
            .weights
            .layers
            .iter()
            .filter_map(|l| match &l.ffn {
                dsrun::model::weights::FeedForward::Moe(moe) => Some(moe.experts[0].matrices().map(|m| m.stored_bytes()).into_iter().max().unwrap()),
                _ => None,
            })
            .max()
            .unwrap();
        // Three slots per pool.
        let small = || {
            let mut c = ctx();
            c.chunk_bytes = Some((3 * largest.next_multiple_of(4) + 3) as u64);
            c
        };
        let mut resident = GpuModel::new(small(), &model, g.tokens.len(), Default::default()).unwrap();
        let want = prefill_then_decode_twice(&mut resident, &g.tokens);
        let options = GpuOptions { gpu_mem: GpuMem::ExpertShare(0.3), placement: ExpertPlacement::Stream, ..Default::default() };
        let mut streamed = GpuModel::with_options(small(), &model, g.tokens.len(), &options).unwrap();
        let pools = streamed.expert_pools().unwrap();
        assert!(pools >= 2, "{family}: {pools} pool(s)");
        let got = prefill_then_decode_twice(&mut streamed, &g.tokens);
        assert_bitwise(&format!("{family} in pools"), &got, &want);
    }
}

/// With GPUs' kernel shapes (one 64-lane group per row set, 16-byte weight loads where rows
/// allow) the slots' matmuls still sum each row in the stack's order.
#[test]
fn streamed_logits_equal_all_resident_with_gpu_kernel_shapes() {
    for family in ["v3_noaux", "v3_fp8"] {
        let dir = fixture(family);
        let g = golden(&dir);
        let model = Model::load(&dir).unwrap();
        let gpu_shapes = || {
            let mut c = ctx();
            c.cpu_shapes = false;
            c
        };
        let mut resident = GpuModel::new(gpu_shapes(), &model, g.tokens.len(), Default::default()).unwrap();
        let want = prefill_then_decode_twice(&mut resident, &g.tokens);
        let options = GpuOptions { gpu_mem: GpuMem::ExpertShare(0.3), placement: ExpertPlacement::Stream, ..Default::default() };
        let mut streamed = GpuModel::with_options(gpu_shapes(), &model, g.tokens.len(), &options).unwrap();
        let got = prefill_then_decode_twice(&mut streamed, &g.tokens);
        assert_bitwise(&format!("{family} with GPU shapes"), &got, &want);
    }
}

#[test]
fn a_budget_below_the_minimum_names_the_minimum() {
    let dir = fixture("v3_noaux");
    let model = Model::load(&dir).unwrap();
    let resident = GpuModel::new(ctx(), &model, 16, Default::default()).unwrap();
    let minimum = resident.memory_plan().minimum();
    let options = GpuOptions { gpu_mem: GpuMem::Bytes(minimum - 1), placement: ExpertPlacement::Stream, ..Default::default() };
    let err = GpuModel::with_options(ctx(), &model, 16, &options).err().expect("refused").to_string();
    assert!(err.contains(&format!("minimum of {minimum} bytes")), "{err}");
    let options = GpuOptions { gpu_mem: GpuMem::Bytes(minimum), placement: ExpertPlacement::Stream, ..Default::default() };
    assert!(GpuModel::with_options(ctx(), &model, 16, &options).is_ok());
}

/// Batched decoding with streamed experts: one step's tokens of several sequences route to
/// more experts than one token does (rounds when they outnumber the slots); each sequence's
/// logits still equal what it computes alone, all-resident, bit for bit.
#[test]
fn batched_decode_with_streamed_experts_matches_each_sequence_alone() {
    for family in ["v3_noaux", "v2_lite"] {
        let model = Model::load(&fixture(family)).unwrap();
        let capacity = 9 + BATCH_STEPS + 1;
        let options = GpuOptions { gpu_mem: GpuMem::ExpertShare(0.3), prefetch: Prefetch::On, sequences: BATCH_ORDER.len(), placement: ExpertPlacement::Stream, ..Default::default() };
        let mut batched = GpuModel::with_options(ctx(), &model, capacity, &options).unwrap();
        assert!(batched.expert_slots().is_some(), "{family}: 30% of the experts streams");
        let mut alone = GpuModel::new(ctx(), &model, capacity, Default::default()).unwrap();
        let mut cpu = dsrun::engine::CpuEngine::new(Model::load(&fixture(family)).unwrap(), capacity);
        batched_decode_matches_alone(&format!("{family} streamed"), &mut batched, &mut alone, &mut cpu);
        let c = batched.stream_counters().unwrap();
        assert!(c.rounds > c.syncs, "{family}: a batch of 8 needs more than the slots in one round: {c:?}");
    }
}
