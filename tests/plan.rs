//! The forward plan of every fixture family, built for fixed limits (no device): the ops a step
//! runs, the buffers and weights they use and their sizes, the memory plan, and what expert
//! streaming adds under a budget, all as the config says they must be.

mod common;
use dsrun::model::weights::FeedForward;
use dsrun::model::Model;
use dsrun::plan::budget::{ExpertPlacement, GpuMem, GpuOptions, Prefetch};
use dsrun::plan::{self, BufferKind, ExpertMatrix, ExpertWeights, KernelLimits, Op, Plan, Rows, Target};
use std::collections::BTreeMap;

const TARGET: Target = Target {
    max_chunk: 16,
    attention_scratch: 1234,
    binding_limit: 1 << 30,
    stack_limit: 1 << 30,
    private_bytes: 4096,
    memory: None,
    software: false,
    kernels: KernelLimits { experts: 1024, groups: 64, top_k: 16, index_dim: 1024 },
    group_experts: true,
    hybrid: true,
};
const CAPACITY: usize = 40;

/// How many ops of each name.
fn census(ops: &[Op]) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for op in ops {
        *counts.entry(op.name()).or_default() += 1;
    }
    counts
}

fn words(plan: &Plan, name: &str) -> usize {
    plan.buffers.iter().find(|b| b.name == name).unwrap_or_else(|| panic!("no buffer `{name}`")).words
}

#[test]
fn every_family_plans_the_ops_and_sizes_its_config_asks_for() {
    for family in common::FAMILIES {
        let model = Model::load(&common::fixture(family)).unwrap();
        let c = &model.config;
        let plan = plan::build(&model, CAPACITY, &GpuOptions::default(), &TARGET).unwrap();
        let layers = c.num_hidden_layers;
        let moe = model.weights.moe_layers().len();
        let dense = layers - moe;
        let shared = model.weights.moe_layers().iter().filter(|(_, m)| m.shared.is_some()).count();
        let low_rank = c.q_lora_rank.is_some() as usize;
        // V3.2: per layer the indexer's three matmuls (keys, queries, head weights) and its
        // three kernels, and an f32 index key cache beside the latent cache.
        let indexed = c.indexer.is_some() as usize;

        // Ops of a step: embedding; per layer two norms, the attention (a low-rank query adds
        // a matmul and a norm) and the feed-forward; MoE layers route, group the step's slots by
        // expert, run the experts (gate, up, SwiGLU, down) and combine.
        let want = BTreeMap::from([
            ("embed", 1),
            ("rmsnorm", 2 * layers + low_rank * layers),
            ("matmul", layers * (3 + low_rank + 3 * indexed) + 3 * dense + moe + 3 * shared),
            ("indexer_prepare", indexed * layers),
            ("indexer_scores", indexed * layers),
            ("indexer_top_k", indexed * layers),
            ("silu_mul", dense + shared + moe),
            ("latent_store", layers),
            ("rope_q", layers),
            ("q_absorb", layers),
            ("attention", layers),
            ("v_up", layers),
            ("router", moe),
            ("group_experts", moe),
            ("expert_matmul", 3 * moe),
            ("moe_combine", moe),
        ]);
        let got = census(&plan.body);
        assert_eq!(got.into_iter().filter(|&(_, n)| n > 0).collect::<BTreeMap<_, _>>(), want.into_iter().filter(|&(_, n)| n > 0).collect(), "{family}: body ops");
        assert!(matches!(plan.body[0], Op::Embed { .. }), "{family}: the step starts with the embedding");
        for (head, rows) in [(&plan.head_last, Rows::Last), (&plan.head_all, Rows::All)] {
            assert!(matches!(head[..], [Op::RmsNorm { rows: r1, .. }, Op::Matmul { rows: r2, .. }] if r1 == rows && r2 == rows), "{family}: head {rows:?}");
        }
        assert!(matches!(plan.argmax, Op::Argmax { vocab, .. } if vocab == c.vocab_size));
        let matrices: Vec<ExpertMatrix> = plan
            .body
            .iter()
            .filter_map(|op| match op {
                Op::ExpertMatmul { matrix, weights, k, grouped, .. } => {
                    assert!(matches!(weights, ExpertWeights::Stack(_)), "{family}: everything fits an unbounded budget");
                    assert!(*grouped && *k == c.num_experts_per_tok, "{family}");
                    Some(*matrix)
                }
                Op::GroupExperts { k, experts, rows, .. } => {
                    assert_eq!((*k, *experts, *rows), (c.num_experts_per_tok, c.n_routed_experts, [c.moe_intermediate_size, c.hidden_size]));
                    None
                }
                _ => None,
            })
            .collect();
        assert_eq!(matrices, [ExpertMatrix::Gate, ExpertMatrix::Up, ExpertMatrix::Down].repeat(moe), "{family}: each MoE layer's expert matmuls");

        // Buffers: activations for 16 tokens, a latent cache per layer for 40, the backend's scratch.
        let n = TARGET.max_chunk;
        assert_eq!(words(&plan, "h"), n * c.hidden_size, "{family}");
        assert_eq!(words(&plan, "tokens"), n);
        assert_eq!(words(&plan, "logits"), n * c.vocab_size);
        assert_eq!(words(&plan, "q"), n * c.num_attention_heads * c.qk_head_dim());
        assert_eq!(words(&plan, "kv"), n * c.latent_dim());
        assert_eq!(words(&plan, "attention scratch"), TARGET.attention_scratch);
        assert_eq!(words(&plan, "router logits"), n * c.n_routed_experts);
        assert_eq!(words(&plan, "expert out"), n * c.num_experts_per_tok * c.hidden_size);
        assert_eq!(plan.buffers.iter().any(|b| b.name == "qa"), low_rank == 1, "{family}: q LoRA activations");
        let caches: Vec<usize> = plan.buffers.iter().filter(|b| b.kind == BufferKind::Cache).map(|b| b.words).collect();
        let per_layer = match c.indexer {
            Some(ix) => vec![CAPACITY * c.latent_dim(), CAPACITY * ix.head_dim],
            None => vec![CAPACITY * c.latent_dim()],
        };
        assert_eq!(caches, per_layer.repeat(layers), "{family}: latent caches (and index key caches)");
        if let Some(ix) = c.indexer {
            assert_eq!(words(&plan, "indexer scores"), n * CAPACITY, "{family}");
            assert_eq!(words(&plan, "indexer selection"), n * ix.topk, "{family}");
            let sparse = plan.body.iter().filter(|op| matches!(op, Op::Attention { sparse: Some((_, k)), .. } if *k == ix.topk)).count();
            assert_eq!(sparse, layers, "{family}: every layer's attention reads the selection");
        }
        for (i, layer) in model.weights.layers.iter().enumerate() {
            let norm = plan.buffers.iter().find(|b| b.name == format!("input_layernorm {i}")).unwrap();
            assert_eq!(norm.init.as_deref(), Some(&layer.input_norm[..]), "{family}: constants hold the weights");
        }

        // Weights: each matrix once, the experts of a layer as one stack of gate/up/down each.
        let matrices = layers * (3 + 1 + low_rank + 3 * indexed) + 3 * dense + moe * (1 + 3) + 3 * shared + 2;
        assert_eq!(plan.weights.len(), matrices, "{family}: weights");
        let stacks: Vec<usize> = plan.weights.iter().filter(|w| w.routed).map(|w| w.stack.len()).collect();
        assert_eq!(stacks, vec![c.n_routed_experts; 3 * moe], "{family}: expert stacks");

        // The memory plan: resident = weights but the routed experts + buffers + the backend's own
        // + the prefetch guess's buffers; each expert as one cache slot.
        let guess = if moe >= 2 { (c.hidden_size + c.n_routed_experts + 2 * c.num_experts_per_tok) * 4 } else { 0 };
        let buffers: u64 = plan.buffers.iter().map(|b| b.words as u64 * 4).sum();
        assert_eq!(plan.memory.resident, plan.resident_weight_bytes() + buffers + TARGET.private_bytes + guess as u64, "{family}: resident bytes");
        assert_eq!(plan.memory.experts, (moe * c.n_routed_experts) as u64);
        let expert = model.weights.layers.iter().find_map(|l| if let FeedForward::Moe(m) = &l.ffn { Some(&m.experts[0]) } else { None }).unwrap();
        assert!(plan.memory.expert_bytes >= expert.matrices().iter().map(|m| m.stored_bytes() as u64).sum::<u64>());
        assert!(plan.streaming.is_none());
    }
}

#[test]
fn a_budget_streams_experts_with_a_stop_and_a_guess_per_moe_layer() {
    for family in ["v3_noaux", "v2_lite"] {
        let model = Model::load(&common::fixture(family)).unwrap();
        let c = &model.config;
        let moe = model.weights.moe_layers().len();
        for prefetch in [Prefetch::On, Prefetch::Off] {
            let options = GpuOptions { gpu_mem: GpuMem::ExpertShare(0.25), prefetch, placement: ExpertPlacement::Stream, ..Default::default() };
            // Bindings of three expert slots split the cache into pools.
            let slot = plan::build(&model, CAPACITY, &GpuOptions::default(), &TARGET).unwrap().memory.expert_bytes;
            let target = Target { binding_limit: slot, ..TARGET };
            let plan = plan::build(&model, CAPACITY, &options, &target).unwrap();
            let s = plan.streaming.as_ref().expect("a quarter of the experts streams");
            assert_eq!(s.slots, (moe * c.n_routed_experts).div_ceil(4), "{family}");
            assert!(s.pools.len() >= 2 && s.pools.iter().map(|p| p.slots).sum::<usize>() == s.slots, "{family}: {:?}", s.pools);
            assert_eq!(s.max_pairs, TARGET.max_chunk * c.num_experts_per_tok);
            assert!(plan.weights.iter().all(|w| !w.routed), "{family}: no expert stacks are uploaded");
            let stops: Vec<(usize, bool)> = plan
                .body
                .iter()
                .filter_map(|op| match op {
                    Op::Streamed { layer, predicts_next, ops } => {
                        // Over the pools, ungrouped: gate, up, SwiGLU of k slots per token, down.
                        let k = c.num_experts_per_tok;
                        let pooled = |m: Option<&Op>| matches!(m, Some(Op::ExpertMatmul { weights: ExpertWeights::Pools, grouped: false, .. }));
                        assert!(ops.len() == 4 && pooled(ops.first()) && pooled(ops.get(1)) && pooled(ops.get(3)), "{family}: {ops:?}");
                        assert!(matches!(ops[2], Op::SiluMul { width, .. } if width == k * c.moe_intermediate_size), "{family}");
                        Some((*layer, *predicts_next))
                    }
                    _ => None,
                })
                .collect();
            let guessing = prefetch == Prefetch::On;
            let want: Vec<(usize, bool)> = (0..moe).map(|j| (j, guessing && j + 1 < moe)).collect();
            assert_eq!(stops, want, "{family}: one stop per MoE layer, the next guessed but for the last");
            // The guess: the next layer's norm of the last token, its router matrix and router.
            let last_rows = census(
                &plan
                    .body
                    .iter()
                    .filter(|op| matches!(op, Op::RmsNorm { rows: Rows::Last, .. } | Op::Matmul { rows: Rows::Last, .. } | Op::Router { rows: Rows::Last, .. }))
                    .cloned()
                    .collect::<Vec<_>>(),
            );
            let guesses = if guessing { moe - 1 } else { 0 };
            assert_eq!(last_rows.values().sum::<usize>(), 3 * guesses, "{family}: {last_rows:?}");
            assert_eq!(s.guess_ids.is_some(), guessing);
            assert_eq!(plan.memory.minimum(), plan.memory.resident + c.num_experts_per_tok as u64 * plan.memory.expert_bytes);
        }
        let below = GpuOptions { gpu_mem: GpuMem::Bytes(1), placement: ExpertPlacement::Stream, ..Default::default() };
        let err = plan::build(&model, CAPACITY, &below, &TARGET).err().expect("refused").to_string();
        assert!(err.contains("below this model's minimum"), "{err}");
    }
}

#[test]
fn the_plan_reads_as_text() {
    let model = Model::load(&common::fixture("v3_fp8")).unwrap();
    let plan = plan::build(&model, CAPACITY, &GpuOptions::default(), &TARGET).unwrap();
    let text = plan.describe();
    for needle in [
        "16 tokens per step, context 40 tokens",
        "latent cache 0",
        "attention scratch",
        "expert_matmul",
        "model.layers.1.mlp.experts.{0..7}.gate_proj.weight",
        "F8_E4M3",
        "head, last token (2 ops)",
        "experts    all resident",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert_eq!(text.lines().filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit())).count(), plan.body.len() + 2 + 2 + 1);
}

/// A budget that holds every expert, on a backend that cannot bind a layer's stack of them
/// whole (Moonlight's 63 sibling experts on lavapipe), streams them through one slot per
/// expert instead of failing; any budget at or above the minimum gives a plan.
#[test]
fn stacks_beyond_the_binding_limit_stream_even_when_the_budget_holds_them() {
    let model = Model::load(&common::fixture("v3_noaux")).unwrap();
    let all = plan::build(&model, CAPACITY, &GpuOptions::default(), &TARGET).unwrap().memory;
    let target = Target { stack_limit: 1 << 10, ..TARGET };
    let plan = plan::build(&model, CAPACITY, &GpuOptions::default(), &target).unwrap();
    let s = plan.streaming.as_ref().expect("stacks too big to bind stream");
    assert_eq!(s.slots as u64, all.experts, "one slot per expert: every expert fits the budget");
    for budget in [all.minimum(), (all.minimum() + all.all_resident()) / 2, all.all_resident(), 2 * all.all_resident()] {
        let options = GpuOptions { gpu_mem: GpuMem::Bytes(budget), placement: ExpertPlacement::Stream, ..Default::default() };
        let plan = plan::build(&model, CAPACITY, &options, &target).unwrap_or_else(|e| panic!("budget {budget}: {e}"));
        assert!(plan.streaming.is_some(), "budget {budget}");
    }
}

/// The host ops of a plan's body, by MoE layer: (layer, what crosses, overlap, host op names).
fn host_stops(plan: &Plan) -> Vec<(usize, usize, Vec<&'static str>)> {
    plan.body
        .iter()
        .filter_map(|op| match op {
            Op::HostExperts { layer, overlap, ops, .. } => Some((*layer, *overlap, ops.iter().map(|o| o.name()).collect())),
            _ => None,
        })
        .collect()
}

/// `--cpu-moe` and `--n-cpu-moe N` put the first MoE layers' routed experts on the host: each
/// a stop whose ops are the SwiGLU experts and their weighted sum over the host's own stacks,
/// with the shared expert after it left to the GPU; none of those experts counts against the
/// GPU's memory, and a backend that is itself the CPU never gets the ops.
#[test]
fn cpu_moe_puts_the_first_moe_layers_experts_on_the_host() {
    for family in ["v3_noaux", "v2_lite"] {
        let model = Model::load(&common::fixture(family)).unwrap();
        let c = &model.config;
        let moe = model.weights.moe_layers().len();
        let all_gpu = plan::build(&model, CAPACITY, &GpuOptions::default(), &TARGET).unwrap();
        assert!(all_gpu.host.is_none() && host_stops(&all_gpu).is_empty());
        for (cpu_moe, want) in [(usize::MAX, moe), (1, 1), (moe + 5, moe)] {
            let options = GpuOptions { cpu_moe, ..Default::default() };
            let plan = plan::build(&model, CAPACITY, &options, &TARGET).unwrap();
            let host = plan.host.as_ref().expect("layers on the host");
            assert_eq!(host.uploads, Some(false), "{family}: uploads by measured rates on a hardware GPU");
            let software = plan::build(&model, CAPACITY, &options, &Target { software: true, ..TARGET }).unwrap();
            let software = software.host.as_ref().unwrap();
            assert!(software.uploads.is_none() && software.split.is_none(), "{family}: no uploads on a software adapter");
            assert_eq!(host.layers, want, "{family}");
            assert_eq!(host.weights.len(), 3 * want, "{family}: gate, up and down stacks per layer");
            assert!(host.weights.iter().all(|w| w.stack.len() == c.n_routed_experts && w.routed));
            let stops = host_stops(&plan);
            assert_eq!(stops.iter().map(|s| s.0).collect::<Vec<_>>(), (0..want).collect::<Vec<_>>(), "{family}");
            // A hardware GPU gets staging slots for prompt uploads: every host layer's GPU
            // part lists slots (four ops) before the shared expert (four more).
            let shared_ops = if c.n_shared_experts > 0 { 4 } else { 0 };
            let split = plan.host.as_ref().and_then(|h| h.split.as_ref()).expect("staging slots");
            assert_eq!((split.staging, split.slots.len()), (c.num_experts_per_tok, 0), "{family}");
            for (_, overlap, ops) in &stops {
                assert_eq!(*overlap, 4 + shared_ops, "{family}: the listed slots and the shared expert overlap the host");
                assert_eq!(ops, &["expert_matmul", "expert_matmul", "silu_mul", "expert_matmul", "moe_combine"]);
            }
            assert_eq!(plan.memory.experts, ((moe - want) * c.n_routed_experts) as u64, "{family}: the host's experts are off the GPU");
            assert!(plan.streaming.is_none());
            assert!(plan.describe().contains(&format!("routed experts of the first {want} MoE layer(s) on the CPU")));
        }
        let cpu_target = Target { hybrid: false, ..TARGET };
        let plan = plan::build(&model, CAPACITY, &GpuOptions { cpu_moe: usize::MAX, ..Default::default() }, &cpu_target).unwrap();
        assert!(plan.host.is_none(), "{family}: the CPU backend computes every expert itself");
    }
}

/// Under a budget, `--expert-placement auto` (the default) keeps as many MoE layers' experts on
/// the GPU as fit, from the last, and computes the rest on the host: no streaming; below what
/// must stay on the GPU it is refused, naming that amount. `stream` streams as before.
#[test]
fn a_budget_places_whole_layers_on_the_host_until_the_rest_fit() {
    let model = Model::load(&common::fixture("v3_noaux")).unwrap();
    let c = &model.config;
    let moe = model.weights.moe_layers().len();
    assert!(moe >= 2, "the fixture has several MoE layers");
    let all = plan::build(&model, CAPACITY, &GpuOptions::default(), &TARGET).unwrap().memory;
    let per_layer = c.n_routed_experts as u64 * all.expert_bytes;
    let routed_sum = (TARGET.max_chunk * (c.hidden_size + 1) * 4) as u64;
    for gpu_layers in 0..moe {
        // Room for exactly `gpu_layers` layers' experts beside what stays.
        let budget = all.resident + routed_sum + gpu_layers as u64 * per_layer;
        let options = GpuOptions { gpu_mem: GpuMem::Bytes(budget), ..Default::default() };
        let plan = plan::build(&model, CAPACITY, &options, &TARGET).unwrap();
        assert_eq!(plan.host.as_ref().map(|h| h.layers), Some(moe - gpu_layers), "budget for {gpu_layers} layer(s)");
        assert!(plan.streaming.is_none());
        assert!(plan.memory.all_resident() <= budget);
        let one_less = GpuOptions { gpu_mem: GpuMem::Bytes(budget - 1), ..Default::default() };
        let fewer = plan::build(&model, CAPACITY, &one_less, &TARGET).map(|p| p.host.map(|h| h.layers));
        match gpu_layers {
            0 => assert!(fewer.expect_err("refused").to_string().contains("below what stays on the GPU")),
            _ => assert_eq!(fewer.unwrap(), Some(moe - gpu_layers + 1)),
        }
    }
    let share = GpuOptions { gpu_mem: GpuMem::ExpertShare(0.5), ..Default::default() };
    assert!(plan::build(&model, CAPACITY, &share, &TARGET).unwrap().host.is_some());
    let stream = GpuOptions { gpu_mem: GpuMem::ExpertShare(0.5), placement: ExpertPlacement::Stream, ..Default::default() };
    let plan = plan::build(&model, CAPACITY, &stream, &TARGET).unwrap();
    assert!(plan.host.is_none() && plan.streaming.is_some());
    // Forced host layers and streaming for the rest: the cache holds only the GPU's layers.
    let both = GpuOptions { gpu_mem: GpuMem::ExpertShare(0.25), cpu_moe: 1, placement: ExpertPlacement::Stream, ..Default::default() };
    let plan = plan::build(&model, CAPACITY, &both, &TARGET).unwrap();
    assert_eq!(plan.host.as_ref().map(|h| h.layers), Some(1));
    let s = plan.streaming.as_ref().expect("the rest streams");
    assert_eq!(s.layers, (1..moe).collect::<Vec<_>>());
    assert_eq!(plan.memory.experts, ((moe - 1) * c.n_routed_experts) as u64);
}

/// With router counts, the GPU's room goes to the most picked experts wherever they are: a
/// layer split between the devices lists its GPU experts in slot pools (filled at load), its
/// stop writing the GPU's weights; streaming stays off.
#[test]
fn counts_put_the_most_picked_experts_on_the_gpu() {
    use dsrun::plan::placement::{ExpertCounts, LayerPlacement};
    let model = Model::load(&common::fixture("v3_noaux")).unwrap();
    let c = &model.config;
    let moe = model.weights.moe_layers().len();
    let experts = c.n_routed_experts;
    let mut counts = ExpertCounts::new(&vec![experts; moe], None);
    // Layer 0's experts 1 and 3 picked most, then layer 1's 2; the rest never.
    for _ in 0..5 {
        counts.add(0, [1, 3].into_iter());
    }
    counts.add(1, [2].into_iter());
    let all = plan::build(&model, CAPACITY, &GpuOptions::default(), &TARGET).unwrap().memory;
    let routed_sum = (TARGET.max_chunk * (c.hidden_size + 1) * 4) as u64;
    let budget = all.resident + routed_sum + 3 * all.expert_bytes;
    let options = GpuOptions { gpu_mem: GpuMem::Bytes(budget), expert_counts: Some(std::sync::Arc::new(counts.clone())), ..Default::default() };
    let plan = plan::build(&model, CAPACITY, &options, &TARGET).unwrap();
    let host = plan.host.as_ref().expect("layers on the host");
    let split = host.split.as_ref().expect("split layers");
    assert_eq!(split.slots, [(0, 1), (0, 3), (1, 2)]);
    assert_eq!(counts.place(&vec![experts; moe], c.num_experts_per_tok, 0, 3)[..2], [LayerPlacement::Split(vec![1, 3]), LayerPlacement::Split(vec![2])]);
    assert_eq!(host.layers, moe);
    assert_eq!(plan.memory.experts, 3);
    assert!(plan.streaming.is_none());
    let stops: Vec<_> = plan.body.iter().filter_map(|op| if let Op::HostExperts { gpu_weights, overlap, .. } = op { Some((gpu_weights.is_some(), *overlap)) } else { None }).collect();
    let shared = if c.n_shared_experts > 0 { 4 } else { 0 };
    assert_eq!(&stops[..2], [(true, 4 + shared), (true, 4 + shared)], "each split layer's GPU experts and shared expert overlap the host");
    assert!(plan.describe().contains("split: the GPU's slots listed"));
}
