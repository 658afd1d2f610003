//! Expert parallelism on lavapipe: the model divided among 2 and 3 wgpu devices of one process
//! (several devices on the one software adapter), each holding its share of the routed experts,
//! the partial sums all-reduced in host memory. Only the order of the routed sum's terms differs
//! from one device (each rank sums its slots, then the ranks' sums are added in rank order), so
//! logits are held within 1e-5 (relative) of one device's, within transformers' 1e-3 like every
//! backend, and greedy output token for token. The CUDA emulator's 4-device run is in tests/cuda.rs,
//! the multi-process jobs in tests/cli.rs.

mod common;
use common::*;
use dsrun::backend::wgpu::context;
use dsrun::device::{open_parallel, GpuChoice, Parallel};
use dsrun::engine::{CpuEngine, Engine, Steps};
use dsrun::model::Model;
use dsrun::plan::budget::{GpuMem, GpuOptions};
use dsrun::runtime::GpuModel;
use dsrun::util::Silent;

/// Relative distance allowed from one device: the routed sum regrouped by rank (f32 rounding
/// of a reordered sum of a few terms, ~1e-7 of the largest logit, amplified through the layers
/// that follow).
const FROM_ONE_DEVICE: f32 = 1e-5;

fn ctx() -> dsrun::backend::wgpu::GpuContext {
    context::open(GpuChoice::Vulkan).expect("a wgpu Vulkan adapter (on Debian: apt-get install mesa-vulkan-drivers)")
}

fn devices(n: usize) -> Parallel {
    Parallel { devices: vec![0; n], ..Default::default() }
}

fn divided(dir: &std::path::Path, capacity: usize, options: &GpuOptions, parallel: &Parallel) -> Box<dyn Engine> {
    open_parallel(GpuChoice::Vulkan, Model::load(dir).unwrap(), capacity, options, parallel, &Silent).unwrap()
}

#[test]
fn divided_logits_match_one_device_and_transformers_on_every_family() {
    for family in FAMILIES {
        let dir = fixture(family);
        let g = golden(&dir);
        let model = Model::load(&dir).unwrap();
        let want = prefill_then_decode_twice(&mut GpuModel::new(ctx(), &model, g.tokens.len(), Default::default()).unwrap(), &g.tokens);
        for world in [2, 3] {
            let mut engine = divided(&dir, g.tokens.len(), &GpuOptions::default(), &devices(world));
            let what = format!("{family} over {world} devices");
            assert!(engine.device_name().contains(&format!("rank 0 of {world}")), "{what}: {}", engine.device_name());
            let got = prefill_then_decode_twice(&mut engine, &g.tokens);
            let err = relative_error(&got, &want);
            assert!(err <= FROM_ONE_DEVICE, "{what}: {err:e} from one device");
            assert_logits_match(&what, &got[..g.logits.len()], &g.logits, g.vocab, 1e-3);
            // Every rank computed some of the routed slots, and the partial sums met.
            let stats = engine.counters().unwrap();
            assert!(stats.contains(&format!("rank 0 of {world}")) && !stats.contains("computed 0% "), "{what}: {stats}");
        }
    }
}

/// Greedy decoding, 48 tokens: every division of the experts picks one device's every token,
/// unequal shares (`--tensor-split 3,1`) and shares by the router's counts among them.
#[test]
fn divided_greedy_output_equals_one_device() {
    const GENERATED: usize = 48;
    for family in ["v3_noaux", "v2_glg", "v2_lite"] {
        let dir = fixture(family);
        let prompt = &golden(&dir).tokens[..8];
        let model = Model::load(&dir).unwrap();
        let capacity = prompt.len() + GENERATED;
        let greedy = |engine: &mut dyn Engine| greedy_tokens(engine, prompt, GENERATED);
        let want = greedy(&mut GpuModel::new(ctx(), &model, capacity, Default::default()).unwrap());
        let experts: Vec<usize> = model.weights.routed_layers(false).iter().map(|m| m.experts.len()).collect();
        let mut counts = dsrun::plan::placement::ExpertCounts::new(&experts, None);
        for (l, layer) in counts.layers.iter_mut().enumerate() {
            layer.tokens = 10;
            layer.counts.iter_mut().enumerate().for_each(|(e, c)| *c = ((e * 7 + l) % 5) as u64);
        }
        let by_counts = GpuOptions { expert_counts: Some(std::sync::Arc::new(counts)), ..Default::default() };
        for (name, options, parallel) in [
            ("2 devices", GpuOptions::default(), devices(2)),
            ("3 devices", GpuOptions::default(), devices(3)),
            ("--tensor-split 3,1", GpuOptions::default(), Parallel { split: vec![3.0, 1.0], ..devices(2) }),
            ("3 devices by router counts", by_counts.clone(), devices(3)),
        ] {
            let got = greedy(&mut divided(&dir, capacity, &options, &parallel));
            assert_eq!(got, want, "{family}, {name}: greedy output differs from one device");
        }
    }
}

/// Several sequences decoded together over 2 devices: each sequence's logits within 1e-5 of
/// its own alone (one device) and 1e-3 of the CPU reference.
#[test]
fn divided_batched_decode_matches_each_sequence_alone() {
    for family in ["v3_noaux", "v2_lite"] {
        let dir = fixture(family);
        let options = GpuOptions { sequences: 8, ..Default::default() };
        let mut batched = divided(&dir, 32, &options, &devices(2));
        let model = Model::load(&dir).unwrap();
        let mut alone = GpuModel::new(ctx(), &model, 32, Default::default()).unwrap();
        let mut cpu = CpuEngine::new(Model::load(&dir).unwrap(), 32);
        batched_decode_near_alone(&format!("{family}, 2 devices"), &mut batched, &mut alone, &mut cpu, FROM_ONE_DEVICE);
    }
}

/// Speculative decoding's MTP layer is a MoE layer too: its experts are divided like the
/// others', and its draft logits match transformers'.
#[test]
fn divided_mtp_drafts_match_transformers() {
    for family in MTP_FAMILIES {
        let dir = fixture(family);
        let g = golden_mtp(&dir).expect("an MTP fixture");
        let options = GpuOptions { mtp: true, ..Default::default() };
        let n = g.tokens.len();
        let mut engine = divided(&dir, n, &options, &devices(2));
        assert!(engine.has_mtp(), "{family}");
        let vocab = engine.config().vocab_size;
        // Position by position, as tests/speculative.rs on one device.
        let mut drafts = Vec::new();
        engine.forward_keep(0, &g.tokens[..1], dsrun::model::Logits::Last).unwrap();
        for i in 0..n - 1 {
            drafts.extend(engine.draft(0, &g.tokens[i + 1..i + 2]).unwrap());
            if i + 2 < n {
                engine.forward_keep(0, &g.tokens[i + 1..i + 2], dsrun::model::Logits::Last).unwrap();
            }
        }
        assert_logits_match(&format!("{family} MTP over 2 devices"), &drafts, &g.logits, vocab, 1e-3);
    }
}

#[test]
fn divided_plans_refuse_what_they_cannot_do() {
    let dir = fixture("v3_noaux");
    let open = |options: &GpuOptions, parallel: &Parallel| open_parallel(GpuChoice::Vulkan, Model::load(&dir).unwrap(), 16, options, parallel, &Silent).err().map(|e| e.to_string());
    let stream = open(&GpuOptions { gpu_mem: GpuMem::Bytes(1 << 16), placement: dsrun::plan::budget::ExpertPlacement::Stream, ..Default::default() }, &devices(2)).unwrap();
    assert!(stream.contains("this device's share") && stream.contains("more devices"), "{stream}");
    let split = open(&GpuOptions::default(), &Parallel { split: vec![1.0, 1.0, 1.0], ..devices(2) }).unwrap();
    assert!(split.contains("--tensor-split has 3 weights for 2 devices"), "{split}");
    let budget = open(&GpuOptions { gpu_mem: GpuMem::Bytes(1 << 16), ..Default::default() }, &devices(2)).unwrap();
    assert!(budget.contains("this device's share") && budget.contains("more devices"), "{budget}");
    let cpu = open_parallel(GpuChoice::Cpu, Model::load(&dir).unwrap(), 16, &GpuOptions::default(), &devices(2), &Silent).err().unwrap().to_string();
    assert!(cpu.contains("--gpu cpu runs on the host"), "{cpu}");
    let missing = open(&GpuOptions::default(), &Parallel { devices: vec![0, 7], ..Default::default() }).unwrap();
    assert!(missing.contains("rank 1 of 2") && missing.contains("--devices 7"), "{missing}");
}

/// Hybrid placement combined with expert parallelism: each rank computes the experts of its
/// share that `--cpu-moe` / `--n-cpu-moe` put on the host, or that do not fit its budget, on the
/// host's CPU beside its GPU's, and adds the two sums before the all-reduce. The host's kernels
/// sum in another order than the GPU's (as hybrid placement on one device): logits within 1e-3
/// of transformers', greedy output as one device's.
#[test]
fn divided_with_hybrid_placement() {
    for family in ["v3_noaux", "v2_lite", "v3_fp8"] {
        let dir = fixture(family);
        let g = golden(&dir);
        let model = Model::load(&dir).unwrap();
        let capacity = g.tokens.len() + 24;
        let want = greedy_tokens(&mut GpuModel::new(ctx(), &model, capacity, Default::default()).unwrap(), &g.tokens[..6], 24);
        for (name, options) in [
            ("--cpu-moe", GpuOptions { cpu_moe: usize::MAX, ..Default::default() }),
            ("--n-cpu-moe 1", GpuOptions { cpu_moe: 1, ..Default::default() }),
            ("--gpu-mem 50%", GpuOptions { gpu_mem: GpuMem::ExpertShare(0.5), ..Default::default() }),
        ] {
            let what = format!("{family} over 2 devices, {name}");
            let mut engine = divided(&dir, capacity, &options, &devices(2));
            let got = prefill_then_decode_twice(&mut engine, &g.tokens);
            assert_logits_match(&what, &got[..g.logits.len()], &g.logits, g.vocab, 1e-3);
            let stats = engine.counters().unwrap();
            assert!(stats.contains("on its host's CPU"), "{what}: {stats}");
            engine.reset();
            assert_eq!(greedy_tokens(&mut engine, &g.tokens[..6], 24), want, "{what}: greedy output differs from one device");
        }
    }
}

/// Expert streaming combined: under `--expert-placement stream` a rank whose share does not fit
/// its budget streams it through the slots that do (in rounds where a prefill chunk wants more
/// experts than slots); each round's sum adds into the routed sum, so logits stay within 1e-5 of
/// one device's and greedy output is one device's.
#[test]
fn divided_with_streaming() {
    use dsrun::plan::budget::ExpertPlacement;
    for family in ["v3_noaux", "v2_lite"] {
        let dir = fixture(family);
        let g = golden(&dir);
        let model = Model::load(&dir).unwrap();
        let capacity = g.tokens.len() + 24;
        let mut one = GpuModel::new(ctx(), &model, capacity, Default::default()).unwrap();
        let want = prefill_then_decode_twice(&mut one, &g.tokens);
        let options = GpuOptions { gpu_mem: GpuMem::ExpertShare(0.2), placement: ExpertPlacement::Stream, ..Default::default() };
        let what = format!("{family} over 2 devices, streamed");
        let mut engine = divided(&dir, capacity, &options, &devices(2));
        let got = prefill_then_decode_twice(&mut engine, &g.tokens);
        let err = relative_error(&got, &want);
        assert!(err <= FROM_ONE_DEVICE, "{what}: {err:e} from one device");
        assert_logits_match(&what, &got[..g.logits.len()], &g.logits, g.vocab, 1e-3);
        let stats = engine.counters().unwrap();
        assert!(stats.contains("streamed through") && stats.contains("misses"), "{what}: {stats}");
        one.reset();
        engine.reset();
        assert_eq!(greedy_tokens(&mut engine, &g.tokens[..6], 24), greedy_tokens(&mut one, &g.tokens[..6], 24), "{what}: greedy output");
    }
}

/// `inspect --plan` of a rank: its share of the experts, its memory, what it all-reduces.
#[test]
fn a_rank_plan_holds_its_share() {
    let dir = fixture("v3_noaux");
    let model = Model::load(&dir).unwrap();
    let experts: Vec<usize> = model.weights.routed_layers(false).iter().map(|m| m.experts.len()).collect();
    let shards = dsrun::plan::shard::shard_experts(&experts, &[1.0, 1.0], None).unwrap();
    let mut b = dsrun::backend::wgpu::WgpuBackend::new(ctx()).unwrap();
    let target = dsrun::backend::Backend::target(&mut b, &model.config, 16).unwrap();
    let whole = dsrun::plan::build(&model, 16, &GpuOptions::default(), &target).unwrap();
    let options = GpuOptions { shard: Some(std::sync::Arc::new(shards[1].clone())), ..Default::default() };
    let plan = dsrun::plan::build(&model, 16, &options, &target).unwrap();
    let total: usize = experts.iter().sum();
    assert_eq!(plan.memory.experts as usize, total / 2);
    assert_eq!(whole.memory.experts as usize, total);
    let shard = plan.shard.as_ref().unwrap();
    assert_eq!(shard.slots.len(), total / 2);
    assert!(shard.slots.iter().all(|&(l, e)| shards[1].owned[l].contains(&e)));
    let text = plan.describe();
    assert!(text.contains("shard_experts") && text.contains("all-reduced over the ranks"), "{text}");
    assert_eq!(text.matches("shard_experts").count(), experts.len());
}

/// The published-model estimate `inspect` prints for a config.json alone agrees with what a
/// rank's plan holds for an FP8 checkpoint of that shape (the fixture is FP8 with bf16
/// embedding, head and router, as published).
#[test]
fn the_published_estimate_matches_a_rank_plan() {
    let dir = fixture("v3_fp8");
    let model = Model::load(&dir).unwrap();
    let experts: Vec<usize> = model.weights.routed_layers(false).iter().map(|m| m.experts.len()).collect();
    let shards = dsrun::plan::shard::shard_experts(&experts, &[1.0, 1.0], None).unwrap();
    let mut b = dsrun::backend::wgpu::WgpuBackend::new(ctx()).unwrap();
    let target = dsrun::backend::Backend::target(&mut b, &model.config, 16).unwrap();
    let options = GpuOptions { shard: Some(std::sync::Arc::new(shards[0].clone())), ..Default::default() };
    let plan = dsrun::plan::build(&model, 16, &options, &target).unwrap();
    let got = plan.rank_traffic().unwrap();
    let want = dsrun::plan::shard::published_traffic(&model.config, 2);
    assert_eq!((got.experts, got.total_experts, got.moe_layers, got.top_k), (want.experts, want.total_experts, want.moe_layers, want.top_k));
    let near = |a: f64, b: f64| (a - b).abs() <= 0.02 * b;
    assert!(near(got.expert_bytes as f64, want.expert_bytes as f64), "{got:?}\n{want:?}");
    assert!(near(got.other_weight_bytes as f64, want.other_weight_bytes as f64), "{got:?}\n{want:?}");
    assert!(near(got.read_per_token(), want.read_per_token()), "{got:?}\n{want:?}");
    assert_eq!((got.reduce_bytes(), got.choice_bytes()), (want.reduce_bytes(), want.choice_bytes()));
}

/// DeepSeek-V3 as published (`inspect` of its config.json alone): ~673 GB, 58 MoE layers of 256
/// experts; divided among 8 ranks each holds 32 experts per layer and fits an H200, among 16 an
/// H800.
#[test]
fn published_v3_in_eight_and_sixteen() {
    use dsrun::plan::shard::published_traffic;
    let v3 = dsrun::synth::config(&dsrun::synth::SynthOptions { preset: dsrun::synth::Preset::DeepseekV3, ..Default::default() }).unwrap();
    let config = dsrun::config::ModelConfig::from_json(&v3).unwrap();
    let one = published_traffic(&config, 1);
    let bytes = one.weight_bytes() as f64; // ~1 byte per FP8 weight, 2 per bf16 one
    assert!((660e9..690e9).contains(&bytes), "{bytes:e}");
    assert_eq!(one.moe_layers, 58);
    let eight = published_traffic(&config, 8);
    assert_eq!(eight.experts, 58 * 32);
    assert!(eight.other_weight_bytes > 15 << 30 && eight.other_weight_bytes < 20 << 30, "{}", eight.describe());
    assert!(eight.weight_bytes() < 100 << 30 && published_traffic(&config, 16).weight_bytes() < 60 << 30);
    assert_eq!(eight.reduce_bytes(), 58 * 7168 * 4);
    assert!(eight.read_per_token() < one.read_per_token());
}

/// A step every rank would refuse (a token outside the vocabulary, a full context) is refused
/// by rank 0 before the others see it: the job goes on, and the next steps are exact.
#[test]
fn a_refused_step_leaves_the_ranks_in_step() {
    let dir = fixture("v3_noaux");
    let g = golden(&dir);
    let mut engine = divided(&dir, g.tokens.len(), &GpuOptions::default(), &devices(2));
    let vocab = engine.config().vocab_size as u32;
    let bad = engine.forward(&[1, vocab + 5], dsrun::model::Logits::Last).unwrap_err();
    assert!(bad.is_request_error() && bad.to_string().contains("out of range"), "{bad}");
    let full = engine.forward(&vec![1; g.tokens.len() + 1], dsrun::model::Logits::Last).unwrap_err();
    assert!(full.is_request_error(), "{full}");
    let model = Model::load(&dir).unwrap();
    let want = prefill_then_decode_twice(&mut GpuModel::new(ctx(), &model, g.tokens.len(), Default::default()).unwrap(), &g.tokens);
    let got = prefill_then_decode_twice(&mut engine, &g.tokens);
    assert!(relative_error(&got, &want) <= FROM_ONE_DEVICE);
}
