//! Hybrid placement (`--cpu-moe`, `--n-cpu-moe`, `--expert-placement auto` under `--gpu-mem`):
//! routed experts of some MoE layers computed by the CPU backend on the host, the rest of the
//! model on a GPU backend (lavapipe here; the CUDA emulator in tests/cuda.rs). The host's
//! kernels sum in another order than the GPU's, so logits are held to transformers' within the
//! same 1e-3 as every backend, and greedy output to the all-GPU engine's token for token.

mod common;
use common::*;
use dsrun::backend::wgpu::context;
use dsrun::device::GpuChoice;
use dsrun::engine::{CpuEngine, Engine, Steps};
use dsrun::model::Model;
use dsrun::plan::budget::{GpuMem, GpuOptions};
use dsrun::runtime::GpuModel;

fn ctx() -> dsrun::backend::wgpu::GpuContext {
    context::open(GpuChoice::Auto).expect("a wgpu adapter (on Debian: apt-get install mesa-vulkan-drivers)")
}

/// The placements tested, with the host layers each must give on a model of `moe` MoE layers.
fn placements(moe: usize) -> Vec<(&'static str, GpuOptions, usize)> {
    vec![
        ("--cpu-moe", GpuOptions { cpu_moe: usize::MAX, ..Default::default() }, moe),
        ("--n-cpu-moe 1", GpuOptions { cpu_moe: 1, ..Default::default() }, 1),
        // Room for half the experts: the GPU keeps the last whole layers that fit.
        ("--gpu-mem 50%", GpuOptions { gpu_mem: GpuMem::ExpertShare(0.5), ..Default::default() }, moe - moe / 2),
    ]
}

#[test]
fn hybrid_logits_match_transformers_on_every_family() {
    for family in FAMILIES {
        let dir = fixture(family);
        let g = golden(&dir);
        let model = Model::load(&dir).unwrap();
        let moe = model.weights.moe_layers().len();
        for (name, options, host) in placements(moe) {
            let mut hybrid = GpuModel::with_options(ctx(), &model, g.tokens.len(), &options).unwrap();
            let what = format!("{family}, {name}");
            assert_eq!(hybrid.host_layers(), Some(host), "{what}");
            assert_eq!(hybrid.expert_slots(), None, "{what}: nothing streams");
            let got = prefill_then_decode_twice(&mut hybrid, &g.tokens);
            assert_logits_match(&what, &got[..g.logits.len()], &g.logits, g.vocab, 1e-3);
            let c = hybrid.host_counters().unwrap();
            // Every engine call stops at every host layer.
            assert!(c.layers > 0 && c.layers.is_multiple_of(host as u64), "{what}: {c:?}");
            assert!(c.expert_bytes > 0 && c.bytes_out > 0, "{what}: {c:?}");
        }
    }
}

/// Greedy decoding, 64 tokens: the hybrid engine picks the all-GPU engine's every token.
#[test]
fn hybrid_greedy_output_equals_all_gpu() {
    const GENERATED: usize = 64;
    for family in ["v3_noaux", "v2_glg"] {
        let dir = fixture(family);
        let prompt = &golden(&dir).tokens[..8];
        let model = Model::load(&dir).unwrap();
        let capacity = prompt.len() + GENERATED;
        let greedy = |engine: &mut dyn Engine| greedy_tokens(engine, prompt, GENERATED);
        let want = greedy(&mut GpuModel::new(ctx(), &model, capacity, Default::default()).unwrap());
        for (name, options, _) in placements(model.weights.moe_layers().len()) {
            let got = greedy(&mut GpuModel::with_options(ctx(), &model, capacity, &options).unwrap());
            assert_eq!(got, want, "{family}, {name}: greedy output differs from all-GPU");
        }
    }
}

/// A batch of sequences decoded together, their tokens' experts computed on the host in one
/// grouped pass, gives each sequence what it computes alone.
#[test]
fn batched_hybrid_decode_matches_each_sequence_alone() {
    for family in ["v3_noaux", "v2_lite"] {
        let model = Model::load(&fixture(family)).unwrap();
        let capacity = 9 + BATCH_STEPS + 1;
        let options = GpuOptions { cpu_moe: usize::MAX, sequences: BATCH_ORDER.len(), ..Default::default() };
        let mut batched = GpuModel::with_options(ctx(), &model, capacity, &options).unwrap();
        assert!(batched.host_layers().is_some());
        let mut alone = GpuModel::with_options(ctx(), &model, capacity, &GpuOptions { cpu_moe: usize::MAX, ..Default::default() }).unwrap();
        let mut cpu = CpuEngine::new(Model::load(&fixture(family)).unwrap(), capacity);
        // The host computes one token's experts with mat-vecs and several tokens' with a GEMM
        // grouped by expert: the same products summed in another order (f32 rounding, measured
        // 3e-7 relative), so the batch is held near each sequence alone, not bitwise.
        batched_decode_near_alone(&format!("{family} hybrid"), &mut batched, &mut alone, &mut cpu, 1e-5);
    }
}

/// The CPU backend standing in for the GPU (`with_host_stops`, how the hand-over's cost is
/// measured without one): the same logits within 1e-3 of transformers, the host stopping at
/// every MoE layer.
#[test]
fn host_stops_on_the_cpu_backend_match_transformers() {
    use dsrun::backend::cpu::CpuBackend;
    use dsrun::runtime::Runtime;
    for family in FAMILIES {
        let dir = fixture(family);
        let g = golden(&dir);
        let model = Model::load(&dir).unwrap();
        let options = GpuOptions { cpu_moe: usize::MAX, ..Default::default() };
        let mut hybrid = Runtime::with_options(CpuBackend::new().with_host_stops(), &model, g.tokens.len(), &options).unwrap();
        assert_eq!(hybrid.host_layers(), Some(model.weights.moe_layers().len()), "{family}");
        let got = prefill_then_decode_twice(&mut hybrid, &g.tokens);
        assert_logits_match(&format!("{family}, CPU backend with host stops"), &got[..g.logits.len()], &g.logits, g.vocab, 1e-3);
        let plain = Runtime::with_options(CpuBackend::new(), &model, g.tokens.len(), &options).unwrap();
        assert_eq!(plain.host_layers(), None, "{family}: a plain CPU backend computes its experts itself");
    }
}

/// Under a budget for half of one layer's experts the default placement splits the last MoE
/// layer between the devices (the GPU computing its listed slots from slot pools beside the
/// shared expert, the host the rest) and puts the others on the host: logits within 1e-3 of
/// transformers on every family; with router counts that favour a few experts, those are the
/// ones the GPU keeps.
#[test]
fn a_layer_split_between_the_devices_matches_transformers() {
    use dsrun::plan::placement::ExpertCounts;
    for family in FAMILIES {
        let dir = fixture(family);
        let g = golden(&dir);
        let model = Model::load(&dir).unwrap();
        let moe = model.weights.moe_layers().len();
        let experts = model.config.n_routed_experts;
        let share = 0.5 / moe as f64;
        let options = GpuOptions { gpu_mem: GpuMem::ExpertShare(share), ..Default::default() };
        let mut split = GpuModel::with_options(ctx(), &model, g.tokens.len(), &options).unwrap();
        let what = format!("{family}, half a layer's experts on the GPU");
        assert_eq!(split.host_layers(), Some(moe), "{what}");
        assert_eq!(split.split_experts(), Some(experts.div_ceil(2)), "{what}");
        let got = prefill_then_decode_twice(&mut split, &g.tokens);
        assert_logits_match(&what, &got[..g.logits.len()], &g.logits, g.vocab, 1e-3);
        let counts = split.expert_counts().unwrap();
        assert!(counts.layers.iter().all(|l| l.tokens > 0 && l.counts.iter().sum::<u64>() == l.tokens * model.config.num_experts_per_tok as u64), "{what}: {counts:?}");

        // Counts that favour the first layer's last experts: the GPU holds those instead.
        let sizes = vec![experts; moe];
        let mut favoured = ExpertCounts::new(&sizes, None);
        for _ in 0..4 {
            favoured.add(0, (experts as u32 - 2..experts as u32).chain(0..model.config.num_experts_per_tok as u32 - 2));
        }
        let options = GpuOptions { expert_counts: Some(std::sync::Arc::new(favoured)), ..options };
        let mut counted = GpuModel::with_options(ctx(), &model, g.tokens.len(), &options).unwrap();
        assert_eq!(counted.split_experts(), Some(experts.div_ceil(2)), "{family}");
        let got = prefill_then_decode_twice(&mut counted, &g.tokens);
        assert_logits_match(&format!("{what}, by counts"), &got[..g.logits.len()], &g.logits, g.vocab, 1e-3);
    }
}

/// A prompt chunk's experts that two or more of its tokens use, uploaded to the GPU's staging
/// slots for the chunk (`--upload-prompt-experts on`) instead of computed on the host: the
/// same logits within 1e-3 of transformers on every family; decode steps upload nothing.
#[test]
fn prompt_chunks_upload_their_most_used_experts() {
    use dsrun::plan::budget::PromptUploads;
    for family in FAMILIES {
        let dir = fixture(family);
        let g = golden(&dir);
        let model = Model::load(&dir).unwrap();
        let options = GpuOptions { cpu_moe: usize::MAX, prompt_uploads: PromptUploads::On, ..Default::default() };
        let mut hybrid = GpuModel::with_options(ctx(), &model, g.tokens.len(), &options).unwrap();
        let got = prefill_then_decode_twice(&mut hybrid, &g.tokens);
        let what = format!("{family}, prompt experts uploaded");
        assert_logits_match(&what, &got[..g.logits.len()], &g.logits, g.vocab, 1e-3);
        let c = hybrid.host_counters().unwrap();
        assert!(c.uploads > 0 && c.upload_bytes > 0, "{what}: {c:?}");
        hybrid.reset();
        hybrid.reset_counters();
        hybrid.forward(&g.tokens[..1], dsrun::model::Logits::Last).unwrap();
        assert_eq!(hybrid.host_counters().unwrap().uploads, 0, "{what}: one token uploads nothing");
        // Off on software adapters by default (the "GPU" is the host's cores).
        let mut auto = GpuModel::with_options(ctx(), &model, g.tokens.len(), &GpuOptions { cpu_moe: usize::MAX, ..Default::default() }).unwrap();
        prefill_then_decode_twice(&mut auto, &g.tokens);
        assert_eq!(auto.host_counters().unwrap().uploads, 0, "{family}: lavapipe is a software adapter");
    }
}
