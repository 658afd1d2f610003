//! `dsrun synth` checkpoints load as published checkpoints do and run finitely through every
//! layer, on the CPU reference and the GPU alike; `dsrun bench` reports them.
//! (Checked by hand against transformers: tools/compare_synth.py gives 6e-7 relative on a
//! bf16 synth checkpoint.)

mod common;
use common::*;
use dsrun::backend::wgpu::context;
use dsrun::device::GpuChoice;
use dsrun::engine::{CpuEngine, Engine, Steps};
use dsrun::model::{Logits, Model};
use dsrun::runtime::GpuModel;
use dsrun::synth::{synth, Preset, SynthDtype, SynthOptions};

fn tiny(dtype: SynthDtype) -> SynthOptions {
    SynthOptions {
        preset: Preset::Small,
        layers: Some(3),
        experts: Some(16),
        hidden: Some(128),
        dtype,
        seed: 5,
        // Small shards: several files and an index, as published checkpoints are.
        shard_bytes: 4 << 20,
        // The FP8 one with an MTP layer, as V3 ships.
        mtp: dtype == SynthDtype::Fp8,
        index_topk: None,
    }
}

#[test]
fn synth_checkpoints_run_finitely_and_the_gpu_agrees_with_the_cpu() {
    for dtype in [SynthDtype::Bf16, SynthDtype::Fp8] {
        let dir = tempfile::tempdir().unwrap();
        let report = synth(dir.path(), &tiny(dtype), &dsrun::util::Silent).unwrap();
        assert!(report.shards > 1, "{dtype:?}: {} shard(s)", report.shards);
        let model = Model::load(dir.path()).unwrap();
        assert_eq!(model.config.num_hidden_layers, 3);
        assert_eq!(model.config.n_routed_experts, 16);
        let tokens = [0u32, 5, 17, 300, 9, 31999];
        let mut cpu = CpuEngine::new(Model::load(dir.path()).unwrap(), tokens.len());
        let want = cpu.forward(&tokens, Logits::All).unwrap();
        assert!(want.iter().all(|x| x.is_finite()), "{dtype:?}: non-finite logits");
        // Unit-scale weights keep logits at a modest scale, neither vanishing nor exploding.
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!((0.5..100.0).contains(&scale), "{dtype:?}: logits scale {scale}");

        let ctx = context::open(GpuChoice::Auto).expect("a wgpu adapter");
        let mut gpu = GpuModel::new(ctx, &model, tokens.len(), Default::default()).unwrap();
        let got = gpu.forward(&tokens, Logits::All).unwrap();
        assert_logits_match(&format!("synth {dtype:?} GPU"), &got, &want, model.config.vocab_size, 1e-3);

        // The MTP layer: present exactly when asked for, and its draft the same on both.
        assert_eq!(model.weights.mtp.is_some(), dtype == SynthDtype::Fp8, "{dtype:?}: MTP layer");
        if model.weights.mtp.is_some() {
            let mut cpu = CpuEngine::new(Model::load(dir.path()).unwrap(), tokens.len()).with_mtp().unwrap();
            let ctx = context::open(GpuChoice::Auto).expect("a wgpu adapter");
            let options = dsrun::plan::budget::GpuOptions { mtp: true, ..Default::default() };
            let mut gpu = GpuModel::with_options(ctx, &model, tokens.len(), &options).unwrap();
            let mut drafts = Vec::new();
            for engine in [&mut cpu as &mut dyn Engine, &mut gpu] {
                engine.forward_keep(0, &tokens[..5], Logits::Last).unwrap();
                drafts.push(engine.draft(0, &tokens[1..6]).unwrap());
            }
            assert!(drafts[0].iter().all(|x| x.is_finite()), "MTP draft logits finite");
            assert_logits_match("synth MTP draft GPU", &drafts[1], &drafts[0], model.config.vocab_size, 1e-3);
        }
    }
}

#[test]
fn synth_values_depend_only_on_the_seed() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let bar = dsrun::util::Silent;
    synth(a.path(), &tiny(SynthDtype::Fp8), &bar).unwrap();
    synth(b.path(), &tiny(SynthDtype::Fp8), &bar).unwrap();
    let files = |d: &std::path::Path| {
        let mut names: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        names
    };
    assert_eq!(files(a.path()), files(b.path()));
    for name in files(a.path()) {
        assert!(std::fs::read(a.path().join(&name)).unwrap() == std::fs::read(b.path().join(&name)).unwrap(), "{name:?} differs");
    }
}
