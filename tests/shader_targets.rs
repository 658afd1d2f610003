//! Every WGSL pipeline variant dsrun builds, translated by naga to MSL, HLSL and GLSL as wgpu
//! does on Metal, DX12 and GL. The laptops dsrun is for are never in CI; this is how a shader
//! construct those backends reject is caught here.
//!
//! The variants are the ones real models ask for: the bundled model, the fixture families and
//! GGUF files of llama.cpp's block formats loaded on the wgpu adapter (CI: lavapipe) in every
//! weight format, every cache format, both
//! kernel shapes, with and without subgroups, the tiled GEMM, grouped experts, f16 arithmetic
//! and expert streaming; then each pipeline's module, with its `override` constants, is
//! written out for each target. GL has neither subgroups nor f16: variants that need them
//! (naga's validator says so) are not built there and are not translated to GLSL.

mod common;
use dsrun::backend::wgpu::context::{self, GpuContext};
use dsrun::backend::wgpu::kernels::{Kernel, Variant};
use dsrun::device::GpuChoice;
use dsrun::model::Model;
use dsrun::plan::budget::{GpuMem, GpuOptions};
use dsrun::plan::layout::CacheFormat;
use dsrun::quant::QuantTarget;
use dsrun::runtime::GpuModel;
use naga::valid::{Capabilities, ValidationFlags, Validator};
use naga::ShaderStage;

/// The variants built by loading each model under each adapter setting and option.
fn variants() -> Vec<Variant> {
    let base = context::open(GpuChoice::Auto).expect("a wgpu adapter (on Debian: apt-get install mesa-vulkan-drivers)");
    // (CPU shapes, subgroups, tiled GEMM, grouped experts, f16 arithmetic)
    let mut settings = vec![(true, base.subgroups, false, true, false), (false, false, true, false, false), (false, base.subgroups, true, true, false)];
    if base.shader_f16 {
        settings.push((false, base.subgroups, false, true, true));
        settings.push((true, false, false, false, true));
    }
    let bundled = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("weights");
    let models: Vec<(Model, Vec<QuantTarget>)> = vec![
        (Model::load(&bundled).unwrap(), vec![QuantTarget::Keep, QuantTarget::F16, QuantTarget::Q8, QuantTarget::Q4]),
        (Model::load(&common::fixture("v3_fp8")).unwrap(), vec![QuantTarget::Keep]),
        (Model::load(&common::fixture("v2_lite")).unwrap(), vec![QuantTarget::Keep]),
        (Model::load(&common::fixture("v32")).unwrap(), vec![QuantTarget::Keep]),
    ];
    // GGUF files as llama-quantize wrote them (Q8_0; Q4_K, Q6_K, Q5_0; the i-quant mix's IQ2_XXS,
    // Q5_K, Q2_K, IQ4_NL): the modules with the block decoders (every format's arm of them).
    let gguf = |file: &str| dsrun::builder::EngineBuilder::open(common::fixture("gguf").join(file)).unwrap().model().unwrap();
    let models: Vec<(Model, Vec<QuantTarget>)> = models.into_iter().chain(["v3_noaux-q8_0.gguf", "kq-q4_k_m.gguf", "kq-iq2_xxs.gguf"].map(|f| (gguf(f), vec![QuantTarget::Keep]))).collect();
    let mut found: Vec<Variant> = Vec::new();
    let mut keep = |v: Vec<Variant>| {
        for variant in v {
            if !found.contains(&variant) {
                found.push(variant);
            }
        }
    };
    for &(cpu_shapes, subgroups, prefill_gemm, group_experts, f16_math) in &settings {
        let ctx = GpuContext { cpu_shapes, subgroups, prefill_gemm, group_experts, f16_math, ..base.clone() };
        for (model, quants) in &models {
            for (i, &quant) in quants.iter().enumerate() {
                let kv_cache = [CacheFormat::F16, CacheFormat::Bf16, CacheFormat::F32][i % 3];
                let gpu_mem = if i == 1 { "50%".parse::<GpuMem>().unwrap() } else { GpuMem::Auto };
                let options = GpuOptions { quant, kv_cache, gpu_mem, sequences: 2, mtp: model.weights.mtp.is_some(), ..Default::default() };
                let engine = GpuModel::with_options(ctx.clone(), model, 32, &options).unwrap();
                keep(engine.backend().builder.pipelines.variants());
            }
        }
        // The benchmarks' bandwidth reference.
        let builder = dsrun::backend::wgpu::lower::Builder::new(ctx).unwrap();
        builder.pipelines.get(Kernel::StreamRead, None);
        keep(builder.pipelines.variants());
    }
    found
}

#[test]
fn every_pipeline_translates_to_msl_hlsl_and_glsl() {
    let variants = variants();
    // Every kernel a model runs is among them (StreamRead: the benchmarks').
    let kernels: std::collections::HashSet<Kernel> = variants.iter().map(|v| v.kernel).collect();
    assert!(kernels.len() >= 18, "only {} kernels built: {kernels:?}", kernels.len());
    let gl_capabilities = Capabilities::all() - Capabilities::SUBGROUP - Capabilities::SUBGROUP_BARRIER - Capabilities::SHADER_FLOAT16;
    let (mut failures, mut glsl) = (Vec::new(), 0);
    for v in &variants {
        let what = format!("{:?} (subgroups {}) {:?}", v.kernel, v.subgroups, v.constants);
        let source = v.source();
        let module = match naga::front::wgsl::parse_str(&source) {
            Ok(m) => m,
            Err(e) => {
                failures.push(format!("{what}: WGSL: {}", e.emit_to_string(&source)));
                continue;
            }
        };
        let info = match Validator::new(ValidationFlags::all(), Capabilities::all()).validate(&module) {
            Ok(i) => i,
            Err(e) => {
                failures.push(format!("{what}: validation: {e:?}"));
                continue;
            }
        };
        let entry = v.entry_point();
        let constants: naga::back::PipelineConstants = v.constants.iter().map(|&(n, x)| (n.to_string(), x)).collect();
        let (module, info) = match naga::back::pipeline_constants::process_overrides(&module, &info, Some((ShaderStage::Compute, entry)), &constants) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{what}: override constants: {e:?}"));
                continue;
            }
        };
        let point = Some((ShaderStage::Compute, entry.to_string()));
        let msl = naga::back::msl::Options { lang_version: (2, 4), ..Default::default() };
        if let Err(e) = naga::back::msl::write_string(&module, &info, &msl, &naga::back::msl::PipelineOptions { entry_point: point.clone(), ..Default::default() }) {
            failures.push(format!("{what}: MSL: {e:?}"));
        }
        let hlsl = naga::back::hlsl::Options { shader_model: naga::back::hlsl::ShaderModel::V6_2, ..Default::default() };
        let mut out = String::new();
        if let Err(e) = naga::back::hlsl::Writer::new(&mut out, &hlsl, &naga::back::hlsl::PipelineOptions { entry_point: point }).write(&module, &info, None) {
            failures.push(format!("{what}: HLSL: {e:?}"));
        }
        // GL builds only what needs neither subgroups nor f16.
        if Validator::new(ValidationFlags::all(), gl_capabilities).validate(&module).is_ok() {
            glsl += 1;
            let options = naga::back::glsl::Options { version: naga::back::glsl::Version::Embedded { version: 310, is_webgl: false }, ..Default::default() };
            let pipeline = naga::back::glsl::PipelineOptions { shader_stage: ShaderStage::Compute, entry_point: entry.to_string(), multiview: None };
            let mut out = String::new();
            let written = naga::back::glsl::Writer::new(&mut out, &module, &info, &options, &pipeline, naga::proc::BoundsCheckPolicies::default()).and_then(|mut w| w.write());
            if let Err(e) = written {
                failures.push(format!("{what}: GLSL: {e:?}"));
            }
        }
    }
    eprintln!("{} pipeline variants of {} kernels translated to MSL and HLSL, {glsl} to GLSL", variants.len(), kernels.len());
    assert!(glsl > 0 && glsl < variants.len(), "GLSL: {glsl} of {}", variants.len());
    assert!(failures.is_empty(), "{} of {} variants failed:\n{}", failures.len(), variants.len(), failures.join("\n"));
}

/// The struct a WGSL module declares as `name`: (member name, byte offset) and its size, by
/// naga's layout rules.
fn wgsl_struct(source: &str, name: &str) -> (Vec<(String, u32)>, u32) {
    let module = naga::front::wgsl::parse_str(source).unwrap();
    let ty = module.types.iter().find(|(_, t)| t.name.as_deref() == Some(name)).unwrap_or_else(|| panic!("no struct {name}")).1;
    match &ty.inner {
        naga::TypeInner::Struct { members, span } => (members.iter().map(|m| (m.name.clone().unwrap_or_default(), m.offset)).collect(), *span),
        other => panic!("{name} is {other:?}"),
    }
}

/// Host structs the kernels read, field by field against their WGSL declarations (naga's
/// layout of the module the kernels are built from): a field added, moved or retyped on
/// one side only fails here, not as wrong numbers on a device.
#[test]
fn host_structs_match_their_wgsl_layouts() {
    use dsrun::backend::wgpu::kernels::wgsl_source;
    use std::mem::{offset_of, size_of};
    let source = wgsl_source(Kernel::Matmul, false, false);
    let host_step = [("n_tokens", offset_of!(dsrun::backend::StepValues, n_tokens)), ("logits_row0", offset_of!(dsrun::backend::StepValues, logits_row0))];
    let (members, size) = wgsl_struct(&source, "Step");
    assert_eq!(size as usize, size_of::<dsrun::backend::StepValues>(), "Step's size");
    for (name, offset) in host_step {
        assert!(members.contains(&(name.to_string(), offset as u32)), "Step.{name} at {offset}: WGSL has {members:?}");
    }
    use dsrun::plan::layout::WeightLayout as L;
    let host_layout = [
        ("rows", offset_of!(L, rows)),
        ("cols", offset_of!(L, cols)),
        ("expert_stride", offset_of!(L, expert_stride)),
        ("scale_expert_stride", offset_of!(L, scale_expert_stride)),
        ("grid_cols", offset_of!(L, grid_cols)),
        ("block_rows", offset_of!(L, block_rows)),
        ("block_cols", offset_of!(L, block_cols)),
        ("row0", offset_of!(L, row0)),
        ("total_rows", offset_of!(L, total_rows)),
    ];
    let (members, size) = wgsl_struct(&source, "WeightLayout");
    assert_eq!(size as usize, size_of::<L>(), "WeightLayout's size");
    for (name, offset) in host_layout {
        assert!(members.contains(&(name.to_string(), offset as u32)), "WeightLayout.{name} at {offset}: WGSL has {members:?}");
    }
}
