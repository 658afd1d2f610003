//! WGSL kernels and their compiled pipelines, cached by (kernel, weight format).
//!
//! Each kernel family lives in one file under `shaders/`; the weight format is an `override`
//! constant (its values are the format table's, src/format.rs), so variants are pipelines of
//! one module, never copies of the source.

use crate::quant::DType;
use std::collections::HashMap;
use std::sync::Mutex;

const STEP: &str = include_str!("../../../shaders/step.wgsl");
const WEIGHTS: &str = include_str!("../../../shaders/weights.wgsl");
const GGML_BLOCKS: &str = include_str!("../../../shaders/ggml_blocks.wgsl");
const CACHE: &str = include_str!("../../../shaders/cache.wgsl");
const CACHE_STORE: &str = include_str!("../../../shaders/cache_store.wgsl");
const ATTENTION_PARAMS: &str = include_str!("../../../shaders/attention_params.wgsl");
const REDUCE_SHARED: &str = include_str!("../../../shaders/reduce_shared.wgsl");
const REDUCE_SUBGROUPS: &str = include_str!("../../../shaders/reduce_subgroups.wgsl");
const ARITH_F32: &str = include_str!("../../../shaders/arith_f32.wgsl");
const ARITH_F16: &str = include_str!("../../../shaders/arith_f16.wgsl");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    Matmul,
    /// `Matmul` multiplying in f16 (arith_f16.wgsl; needs the device's SHADER_F16).
    MatmulF16,
    Gemm,
    Embed,
    RmsNorm,
    LatentStore,
    RopeQ,
    QAbsorb,
    VUp,
    AttentionPartial,
    /// `AttentionPartial` for CPU adapters: one subgroup per workgroup (needs subgroups).
    AttentionPartialSubgroup,
    AttentionMerge,
    /// V3.2's indexer (indexer.wgsl): key norm, RoPE and store; scores; top-k selection.
    IndexerPrepare,
    IndexerScores,
    IndexerTopK,
    Router,
    SiluMul,
    MoeCombine,
    Argmax,
    GroupExperts,
    /// Benchmarks' bandwidth reference.
    StreamRead,
}

impl Kernel {
    /// Whether the kernel sums across lanes with `sum_over_lanes` (from a reduce snippet).
    fn reduces(self) -> bool {
        matches!(self, Kernel::Matmul | Kernel::MatmulF16 | Kernel::AttentionPartial | Kernel::AttentionMerge)
    }

    /// The matmul's arithmetic snippet, for the kernels that multiply through one.
    fn arithmetic(self) -> Option<&'static str> {
        match self {
            Kernel::Matmul => Some(ARITH_F32),
            Kernel::MatmulF16 => Some(ARITH_F16),
            _ => None,
        }
    }

    /// Whether the kernel reads or writes a latent or index key cache (through cache.wgsl).
    fn uses_cache(self) -> bool {
        self.stores_cache() || matches!(self, Kernel::AttentionPartial | Kernel::AttentionPartialSubgroup | Kernel::AttentionMerge)
    }

    /// Whether the kernel's file writes a cache (cache_store.wgsl; every entry point of the
    /// file alike, since they share one module).
    fn stores_cache(self) -> bool {
        matches!(self, Kernel::LatentStore | Kernel::IndexerPrepare | Kernel::IndexerScores | Kernel::IndexerTopK)
    }

    /// Whether the kernel is a form of the split attention (attention_params.wgsl).
    fn attends(self) -> bool {
        matches!(self, Kernel::AttentionPartial | Kernel::AttentionPartialSubgroup | Kernel::AttentionMerge)
    }

    /// (source, entry point, whether it reads a weight matrix)
    fn source(self) -> (&'static str, &'static str, bool) {
        match self {
            Kernel::Matmul | Kernel::MatmulF16 => (include_str!("../../../shaders/matmul.wgsl"), "main", true),
            Kernel::Gemm => (include_str!("../../../shaders/gemm.wgsl"), "main", true),
            Kernel::Embed => (include_str!("../../../shaders/embed.wgsl"), "main", true),
            Kernel::RmsNorm => (include_str!("../../../shaders/rmsnorm.wgsl"), "main", false),
            Kernel::LatentStore => (include_str!("../../../shaders/latent.wgsl"), "main", false),
            Kernel::RopeQ => (include_str!("../../../shaders/rope.wgsl"), "main", false),
            Kernel::QAbsorb => (include_str!("../../../shaders/mla_absorb.wgsl"), "q_absorb", true),
            Kernel::VUp => (include_str!("../../../shaders/mla_absorb.wgsl"), "v_up", true),
            Kernel::AttentionPartial => (include_str!("../../../shaders/attention_split.wgsl"), "partial_split", false),
            Kernel::AttentionPartialSubgroup => (include_str!("../../../shaders/attention_subgroup.wgsl"), "partial_subgroup", false),
            Kernel::AttentionMerge => (include_str!("../../../shaders/attention_split.wgsl"), "merge", false),
            Kernel::IndexerPrepare => (include_str!("../../../shaders/indexer.wgsl"), "prepare", false),
            Kernel::IndexerScores => (include_str!("../../../shaders/indexer.wgsl"), "score", false),
            Kernel::IndexerTopK => (include_str!("../../../shaders/indexer.wgsl"), "top_k", false),
            Kernel::Router => (include_str!("../../../shaders/router.wgsl"), "main", false),
            Kernel::SiluMul => (include_str!("../../../shaders/silu_mul.wgsl"), "main", false),
            Kernel::MoeCombine => (include_str!("../../../shaders/moe_combine.wgsl"), "main", false),
            Kernel::Argmax => (include_str!("../../../shaders/argmax.wgsl"), "main", false),
            Kernel::GroupExperts => (include_str!("../../../shaders/group_experts.wgsl"), "main", false),
            Kernel::StreamRead => (include_str!("../../../shaders/stream_read.wgsl"), "main", false),
        }
    }
}

/// What stands in for ggml_blocks.wgsl in the modules of formats that are not GGUF blocks
/// (weights.wgsl calls `block_step` behind a constant that is false there): the block decoders
/// would only lengthen every other pipeline's compile (measured on lavapipe: the bundled model
/// loaded in 0.75 s with them, 0.55 s without).
const NO_BLOCKS: &str = "fn block_step(i: u32) -> vec4<f32> { return vec4<f32>(0.0); }\n";

/// A kernel's whole WGSL module: the shared snippets it needs, then its family's file (the tiny
/// "#define pass"). `subgroups`: reductions through subgroup operations, else workgroup memory;
/// `blocks`: the weight format is one of GGUF's block formats (ggml_blocks.wgsl is included).
pub fn wgsl_source(kernel: Kernel, subgroups: bool, blocks: bool) -> String {
    let (source, _, uses_weights) = kernel.source();
    // naga 30 takes subgroup builtins without the standard's `enable subgroups;`, which it
    // rejects; f16 needs its `enable`, before any declaration.
    let mut full = String::new();
    if kernel == Kernel::MatmulF16 {
        full.push_str("enable f16;\n");
    }
    full.push_str(STEP);
    if uses_weights {
        full.push_str(&crate::format::wgsl_constants());
        full.push_str(WEIGHTS);
        full.push_str(if blocks { GGML_BLOCKS } else { NO_BLOCKS });
    }
    if let Some(arith) = kernel.arithmetic() {
        full.push_str(arith);
    }
    if kernel.uses_cache() {
        full.push_str(CACHE);
    }
    if kernel.stores_cache() {
        full.push_str(CACHE_STORE);
    }
    if kernel.attends() {
        full.push_str(ATTENTION_PARAMS);
    }
    if kernel.reduces() {
        full.push_str("const WG: u32 = 64u;\n");
        full.push_str(if subgroups { REDUCE_SUBGROUPS } else { REDUCE_SHARED });
    }
    full.push_str(source);
    full
}

/// One pipeline a `Pipelines` built: its kernel, its module's reduction form, and its
/// `override` constants (the weight format's `FORMAT` among them).
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    pub kernel: Kernel,
    pub subgroups: bool,
    pub constants: Vec<(&'static str, f64)>,
}

impl Variant {
    pub fn source(&self) -> String {
        let blocks = self.constants.iter().any(|&(name, value)| name == "FORMAT" && crate::format::FORMATS[value as usize].is_block());
        wgsl_source(self.kernel, self.subgroups, blocks)
    }

    pub fn entry_point(&self) -> &'static str {
        self.kernel.source().1
    }
}

/// (kernel, weight format, override constants as name=bits): one pipeline per distinct variant.
type PipelineKey = (Kernel, Option<DType>, Vec<(&'static str, u64)>);

pub struct Pipelines {
    device: wgpu::Device,
    /// Use subgroup operations in reductions (the device was opened with `Features::SUBGROUP`).
    subgroups: bool,
    /// By (kernel source, arithmetic snippet, with the GGUF block decoders).
    modules: Mutex<HashMap<(&'static str, Option<&'static str>, bool), wgpu::ShaderModule>>,
    cache: Mutex<HashMap<PipelineKey, wgpu::ComputePipeline>>,
}

impl Pipelines {
    pub fn new(device: &wgpu::Device, subgroups: bool) -> Self {
        Pipelines { device: device.clone(), subgroups, modules: Default::default(), cache: Default::default() }
    }

    /// Every pipeline built so far.
    pub fn variants(&self) -> Vec<Variant> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .keys()
            .map(|(kernel, format, overrides)| {
                let mut constants: Vec<(&'static str, f64)> = format.map(|f| vec![("FORMAT", f.format().code as f64)]).unwrap_or_default();
                constants.extend(overrides.iter().map(|&(n, bits)| (n, f64::from_bits(bits))));
                Variant { kernel: *kernel, subgroups: self.subgroups, constants }
            })
            .collect()
    }

    pub fn get(&self, kernel: Kernel, format: Option<DType>) -> wgpu::ComputePipeline {
        self.get_with(kernel, format, &[])
    }

    /// A variant with extra WGSL `override` constants; `format`: the weight matrix's.
    pub fn get_with(&self, kernel: Kernel, format: Option<DType>, overrides: &[(&'static str, f64)]) -> wgpu::ComputePipeline {
        let key: PipelineKey = (kernel, format, overrides.iter().map(|&(n, v)| (n, v.to_bits())).collect());
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = cache.get(&key) {
            return p.clone();
        }
        let (source, entry, uses_weights) = kernel.source();
        debug_assert_eq!(uses_weights, format.is_some(), "{kernel:?} weight format");
        let blocks = format.is_some_and(|f| f.format().is_block());
        let module = self
            .modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((source, kernel.arithmetic(), blocks))
            .or_insert_with(|| {
                let full = wgsl_source(kernel, self.subgroups, blocks);
                self.device.create_shader_module(wgpu::ShaderModuleDescriptor { label: Some(entry), source: wgpu::ShaderSource::Wgsl(full.into()) })
            })
            .clone();
        let mut constants: Vec<(&str, f64)> = format.map(|f| vec![("FORMAT", f.format().code as f64)]).unwrap_or_default();
        constants.extend_from_slice(overrides);
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&format!("{kernel:?}/{format:?}")),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            // Every kernel writes its workgroup memory before reading it, so wgpu's zero-fill (costly
            // on software adapters) is skipped.
            compilation_options: wgpu::PipelineCompilationOptions { constants: &constants, zero_initialize_workgroup_memory: false },
            cache: None,
        });
        cache.insert(key, pipeline.clone());
        pipeline
    }
}
