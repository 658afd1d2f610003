//! Flags several subcommands share: the model directory, the device and how the model loads
//! there, sampling and stopping. They map onto the core's `EngineBuilder` and settings; the
//! load policy itself lives in the core.

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::Args;
use dsrun::builder::EngineBuilder;
use dsrun::device::GpuChoice;
use dsrun::error::Result;
use dsrun::generate::Stopping;
use dsrun::generation_config::GenerationDefaults;
use dsrun::plan::budget::{Eviction, ExpertPlacement, GpuMem, GpuOptions, Math, Prefetch, PromptUploads};
use dsrun::plan::layout::CacheFormat;
use dsrun::quant::QuantTarget;
use dsrun::sample::{Sampler, SamplerConfig};
use dsrun::speculative::Speculative;
use dsrun::util::Choice;
use std::path::{Path, PathBuf};

/// A value parser for a core setting chosen by name, its names and help listed by `--help`.
pub fn choice<T: Choice + Clone + Send + Sync>() -> impl TypedValueParser<Value = T> {
    PossibleValuesParser::new(T::ALL.iter().map(|&(_, name, help)| PossibleValue::new(name).help(help))).map(|name| T::from_name(&name).expect("clap accepts only the listed names"))
}

#[derive(Args)]
pub struct ModelArgs {
    /// Checkpoint directory (config.json, *.safetensors, tokenizer.json), or a GGUF file
    /// (llama.cpp's; of split files, the first). Default: the bundled tiny model.
    #[arg(long, value_name = "DIR|FILE.gguf")]
    pub model: Option<PathBuf>,
}

impl ModelArgs {
    /// `--model`, or the tiny model bundled in `weights/` (next to the working directory or the crate).
    pub fn dir(&self) -> PathBuf {
        if let Some(dir) = &self.model {
            return dir.clone();
        }
        let local = Path::new("weights");
        if local.join("config.json").is_file() {
            local.to_path_buf()
        } else {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("weights")
        }
    }
}

#[derive(Args)]
pub struct DeviceArgs {
    /// Compute device.
    #[arg(long, default_value = "auto", value_parser = choice::<GpuChoice>())]
    pub gpu: GpuChoice,
    /// Threads the CPU computes on (`--gpu cpu`, the reference, weight conversion) [default:
    /// one per physical core].
    #[arg(short = 't', long, value_name = "N")]
    pub threads: Option<usize>,
    /// Weight format on the GPU: keep the checkpoint's (bf16, FP8 + block scales, ...), or convert
    /// at load to f16, q8 (int8, a scale per 32) or q4 (4-bit, scale and min per 32).
    #[arg(long, default_value = "keep", value_parser = choice::<QuantTarget>())]
    pub quant: QuantTarget,
    /// How matmuls multiply: exact (f32 activations) or fast (on the CPU backend int8
    /// activations for q8/q4 weights and GGUF's Q8_0/Q4_K/Q5_K/Q5_0/Q6_K in decode, as
    /// llama.cpp multiplies them, and bf16 dots where
    /// the CPU has AVX512-BF16: bf16 weights in decode, every format in prefill; f16
    /// arithmetic on GPUs with SHADER_F16).
    #[arg(long, default_value = "exact", value_parser = choice::<Math>())]
    pub math: Math,
    /// GPU memory dsrun may use: `auto` (80% of the adapter's device memory), a size (12G,
    /// 512MiB, 3GB), or N% (that share of the routed experts, everything else resident).
    /// Routed experts that do not fit are computed on the CPU (see --expert-placement).
    #[arg(long, value_name = "BYTES|auto|N%", default_value = "auto")]
    pub gpu_mem: GpuMem,
    /// Compute every routed expert on the CPU, from host memory; attention, shared experts,
    /// dense layers and the head stay on the GPU (as llama.cpp's --cpu-moe).
    #[arg(long, conflicts_with = "n_cpu_moe")]
    pub cpu_moe: bool,
    /// Compute the routed experts of the first N MoE layers on the CPU (as llama.cpp's --n-cpu-moe).
    #[arg(long, value_name = "N")]
    pub n_cpu_moe: Option<usize>,
    /// Where routed experts that do not fit --gpu-mem go: auto (the GPU keeps those the router
    /// picks most, counted across runs under the cache directory; the CPU computes the rest),
    /// stream (copied into a GPU slot cache as the router asks), cpu (every one on the CPU, as
    /// --cpu-moe).
    #[arg(long, default_value = "auto", value_parser = choice::<ExpertPlacement>())]
    pub expert_placement: ExpertPlacement,
    /// Upload a prompt chunk's experts that many of its tokens use to the GPU for the chunk
    /// instead of computing them on the CPU (hybrid placement): auto (where the measured link
    /// and CPU rates say it is faster; off on software adapters), on, off.
    #[arg(long, default_value = "auto", value_parser = choice::<PromptUploads>())]
    pub upload_prompt_experts: PromptUploads,
    /// Which cached expert gives way when another must be uploaded (expert streaming).
    #[arg(long, default_value = "lru", value_parser = choice::<Eviction>())]
    pub expert_eviction: Eviction,
    /// Guess the next MoE layer's experts and upload them ahead of need (expert streaming);
    /// auto: on, except on software adapters.
    #[arg(long, default_value = "auto", value_parser = choice::<Prefetch>())]
    pub prefetch: Prefetch,
    /// How the latent cache stores its values [default: f16 on the backends (half the memory
    /// and bytes per step); f32 for `logits` and on the CPU reference].
    #[arg(long, value_parser = choice::<CacheFormat>())]
    pub kv_cache: Option<CacheFormat>,
    /// Speculative decoding: draft tokens with the checkpoint's multi-token-prediction layer
    /// and verify them in one step [default: mtp where the checkpoint has the layer].
    #[arg(long, value_parser = choice::<Speculative>())]
    pub speculative: Option<Speculative>,
    /// Divide the model among these devices (expert parallelism: each holds the weights other
    /// than routed experts and its share of those): wgpu adapters as `dsrun devices` numbers
    /// them (an index twice: two devices on one adapter), or CUDA ordinals. In a multi-process
    /// job (torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), entry LOCAL_RANK
    /// is this rank's device [default: LOCAL_RANK].
    #[arg(long, value_name = "I,J,...", value_delimiter = ',')]
    pub devices: Vec<usize>,
    /// Each device's share of the routed experts, as weights (3,1: three quarters on the first),
    /// as llama.cpp's --tensor-split [default: equal].
    #[arg(long, value_name = "W,W,...", value_delimiter = ',')]
    pub tensor_split: Vec<f64>,
    /// Tokens the MTP layer drafts per step (chained on its own output beyond the first).
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=dsrun::speculative::MAX_DRAFT as u64))]
    pub draft: u64,
}

impl DeviceArgs {
    /// The checkpoint in `dir` opened for loading on this device with these flags.
    pub fn builder(&self, dir: &Path) -> Result<EngineBuilder<'static>> {
        // A second thread on a core shares its FMA units and caches: the kernels gain nothing.
        dsrun::backend::cpu::set_threads(self.threads.unwrap_or_else(dsrun::backend::cpu::physical_cores))?;
        let cpu_moe = if self.cpu_moe { usize::MAX } else { self.n_cpu_moe.unwrap_or(0) };
        let options = GpuOptions {
            quant: self.quant,
            gpu_mem: self.gpu_mem,
            eviction: self.expert_eviction,
            prefetch: self.prefetch,
            math: self.math,
            cpu_moe,
            placement: self.expert_placement,
            prompt_uploads: self.upload_prompt_experts,
            ..GpuOptions::default()
        };
        let parallel = dsrun::device::Parallel { devices: self.devices.clone(), split: self.tensor_split.clone(), launch: dsrun::runtime::comm::Launch::from_env()? };
        if !parallel.split.is_empty() && parallel.launch.is_none() && parallel.split.len() != parallel.devices.len() {
            return Err(dsrun::error::Error::Invalid(format!("--tensor-split has {} weights for {} --devices: one per device", parallel.split.len(), parallel.devices.len())));
        }
        Ok(EngineBuilder::open(dir)?.device(self.gpu).parallel(parallel).gpu_options(options).kv_cache(self.kv_cache).speculative(self.speculative))
    }

    /// Drafts per speculative step for an engine (0: it has no MTP layer loaded).
    pub fn draft(&self, engine: &dyn dsrun::engine::Engine) -> usize {
        if dsrun::engine::Steps::has_mtp(engine) {
            self.draft as usize
        } else {
            0
        }
    }
}

/// How the next token is chosen. Unset values come from the checkpoint's
/// generation_config.json, else llama.cpp's defaults.
#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy [default: generation_config.json's, else 0.8].
    #[arg(long, value_name = "T", allow_negative_numbers = true)]
    temperature: Option<f32>,
    /// Sample from the K most likely tokens only; 0: all [default: 40].
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// Sample from the smallest set of tokens whose probability reaches P; 1: all [default: 0.95].
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    top_p: Option<f32>,
    /// Drop tokens less likely than P times the most likely one; 0: off [default: 0.05].
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    min_p: Option<f32>,
    /// Penalise every token already in the sequence, prompt included (1: off) [default: 1].
    #[arg(long, value_name = "X", allow_negative_numbers = true)]
    repeat_penalty: Option<f32>,
    /// Subtract X from the logit of every token generated so far (-2 to 2).
    #[arg(long, value_name = "X", default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Subtract X per occurrence from the logit of every token generated so far (-2 to 2).
    #[arg(long, value_name = "X", default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// Add BIAS to a token's logit: ID=BIAS, e.g. 15043=-inf bans token 15043 (repeatable).
    #[arg(long, value_name = "ID=BIAS", value_parser = parse_logit_bias)]
    logit_bias: Vec<(u32, f32)>,
    /// Random seed for sampling (default: from the clock).
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
}

impl SamplingArgs {
    fn config(&self, defaults: &GenerationDefaults) -> SamplerConfig {
        let mut c = defaults.sampler_config(self.seed.unwrap_or_else(dsrun::sample::clock_seed));
        c.temperature = self.temperature.unwrap_or(c.temperature);
        c.top_k = self.top_k.unwrap_or(c.top_k);
        c.top_p = self.top_p.unwrap_or(c.top_p);
        c.min_p = self.min_p.unwrap_or(c.min_p);
        c.repetition_penalty = self.repeat_penalty.unwrap_or(c.repetition_penalty);
        c.presence_penalty = self.presence_penalty;
        c.frequency_penalty = self.frequency_penalty;
        c.logit_bias = self.logit_bias.clone();
        c
    }

    /// The settings, checked under the flags' names (`top_p` is `--top-p`).
    pub fn checked_config(&self, defaults: &GenerationDefaults, vocab: usize) -> Result<SamplerConfig> {
        let config = self.config(defaults);
        config.validate_named(vocab, &|field| format!("--{}", field.replace("repetition", "repeat").replace('_', "-")))?;
        Ok(config)
    }

    pub fn sampler(&self, defaults: &GenerationDefaults, vocab: usize) -> Result<Sampler> {
        Sampler::new(self.checked_config(defaults, vocab)?, vocab)
    }
}

fn parse_logit_bias(s: &str) -> std::result::Result<(u32, f32), String> {
    let (id, bias) = s.split_once('=').ok_or_else(|| format!("`{s}`: expected ID=BIAS, e.g. 15043=-2.5"))?;
    let id = id.trim().parse::<u32>().map_err(|_| format!("`{s}`: `{id}` is not a token id"))?;
    let bias = match bias.trim() {
        "-inf" | "-infinity" => f32::NEG_INFINITY,
        b => b.parse::<f32>().ok().filter(|b| b.is_finite()).ok_or_else(|| format!("`{s}`: `{b}` is not a number (or -inf)"))?,
    };
    Ok((id, bias))
}

/// When a reply ends besides the model's own end of sequence.
#[derive(Args, Clone)]
pub struct StoppingArgs {
    /// End the reply at this text, which is not printed (repeatable).
    #[arg(long, value_name = "TEXT")]
    stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
}

impl StoppingArgs {
    pub fn stopping(&self, max_tokens: usize) -> Stopping {
        Stopping { max_tokens, stop: self.stop.clone(), ignore_eos: self.ignore_eos, logprobs: None }
    }
}
