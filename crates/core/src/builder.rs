//! Loading a model to run, in one place: a checkpoint directory's `config.json` is parsed once,
//! and the load policy lives here rather than in each program that embeds dsrun: the default
//! context, whether the MTP layer loads for speculative decoding, the latent cache's format on
//! each device, and the warnings a user should see.
//!
//! ```no_run
//! use dsrun_core::{builder::EngineBuilder, generate::{generate, Stopping}, sample::{Sampler, SamplerConfig}};
//! # fn main() -> dsrun_core::Result<()> {
//! let builder = EngineBuilder::open("weights")?;
//! let tokenizer = builder.tokenizer()?;
//! let mut engine = builder.build()?.engine;
//! let prompt = tokenizer.encode("This module provides")?;
//! let sampler = Sampler::new(SamplerConfig::default(), builder.config().vocab_size)?;
//! let stopping = Stopping { max_tokens: 32, ..Default::default() };
//! generate(engine.as_mut(), &tokenizer, &prompt, sampler, stopping, 0, |text| Ok(print!("{text}")), &|| false)?;
//! # Ok(()) }
//! ```

use crate::backend::GpuChoice;
use crate::chat_template::ChatTemplate;
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::device::{open_parallel, Parallel};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::generation_config::GenerationDefaults;
use crate::gguf::Gguf;
use crate::model::Model;
use crate::plan::budget::GpuOptions;
use crate::plan::layout::CacheFormat;
use crate::plan::placement::{counts_path, ExpertCounts};
use crate::speculative::Speculative;
use crate::tokenizer::Tokenizer;
use crate::util::{Choice, Progress, Silent};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Context when none is asked for: the model's own limit, at most this.
pub const DEFAULT_CONTEXT: usize = 4096;

/// A checkpoint directory opened for loading, and how to load it.
pub struct EngineBuilder<'p> {
    dir: PathBuf,
    /// A GGUF file's tables, where `dir` is one.
    gguf: Option<Gguf>,
    config: ModelConfig,
    device: GpuChoice,
    parallel: Parallel,
    options: GpuOptions,
    kv_cache: Option<CacheFormat>,
    default_kv_cache: Option<CacheFormat>,
    speculative: Option<Speculative>,
    context: Option<usize>,
    decodes: bool,
    progress: &'p dyn Progress,
}

/// A loaded engine and what loading it had to say.
pub struct Loaded {
    pub engine: Box<dyn Engine>,
    /// Things the user should know (a context beyond what the model was trained for).
    pub warnings: Vec<String>,
    pub seconds: f64,
}

impl<'p> EngineBuilder<'p> {
    /// Reads `dir/config.json` (the only time it is parsed). Defaults: the best device
    /// (`GpuChoice::Auto`), the checkpoint's weight format, everything resident that fits, one
    /// sequence of min(4096, max_position_embeddings) tokens, a 16-bit latent cache on GPUs
    /// (f32 on the CPU reference), speculative decoding where the checkpoint has an MTP layer.
    pub fn open(dir: impl Into<PathBuf>) -> Result<EngineBuilder<'static>> {
        let dir = dir.into();
        let (gguf, config) = if crate::gguf::is_gguf(&dir) {
            let (gguf, config) = crate::gguf::deepseek2::open_config(&dir)?;
            (Some(gguf), config)
        } else {
            (None, ModelConfig::from_file(&dir.join("config.json"))?)
        };
        Ok(EngineBuilder {
            dir,
            gguf,
            config,
            device: GpuChoice::Auto,
            parallel: Parallel::default(),
            options: GpuOptions::default(),
            kv_cache: None,
            default_kv_cache: None,
            speculative: None,
            context: None,
            decodes: true,
            progress: &Silent,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(mut self, device: GpuChoice) -> Self {
        self.device = device;
        self
    }

    /// Several devices (`--devices`, `--tensor-split`) or this process's rank of a multi-process
    /// job: the routed experts divided among them (expert parallelism).
    pub fn parallel(mut self, parallel: Parallel) -> Self {
        self.parallel = parallel;
        self
    }

    /// The devices or ranks the model is divided among.
    pub fn parallel_settings(&self) -> &Parallel {
        &self.parallel
    }

    /// Weight format, memory budget, expert eviction and prefetch (`sequences`, `kv_cache` and
    /// `mtp` are set by their own methods and the load policy).
    pub fn gpu_options(mut self, options: GpuOptions) -> Self {
        self.options = options;
        self
    }

    /// The latent cache's format (None: the device's default).
    pub fn kv_cache(mut self, format: Option<CacheFormat>) -> Self {
        self.kv_cache = format;
        self
    }

    /// The cache format when none is asked for, on every device (`dsrun logits`: exact f32, to
    /// compare implementations).
    pub fn default_kv_cache(mut self, format: CacheFormat) -> Self {
        self.default_kv_cache = Some(format);
        self
    }

    /// `--speculative`: None drafts with the MTP layer where the checkpoint has one.
    pub fn speculative(mut self, speculative: Option<Speculative>) -> Self {
        self.speculative = speculative;
        self
    }

    /// Tokens of context per sequence (None: min(4096, max_position_embeddings)).
    pub fn context(mut self, tokens: Option<usize>) -> Self {
        self.context = tokens;
        self
    }

    /// Sequences with their own cache, decoded together (a server's batch).
    pub fn sequences(mut self, sequences: usize) -> Self {
        self.options.sequences = sequences;
        self
    }

    /// Whether the engine generates tokens (false for scoring: logits, perplexity), and so
    /// whether the MTP layer loads for speculative decoding.
    pub fn decodes(mut self, decodes: bool) -> Self {
        self.decodes = decodes;
        self
    }

    /// Where loading reports the weights it uploads and converts.
    pub fn progress<'q>(self, progress: &'q dyn Progress) -> EngineBuilder<'q> {
        EngineBuilder {
            dir: self.dir,
            gguf: self.gguf,
            config: self.config,
            device: self.device,
            parallel: self.parallel,
            options: self.options,
            kv_cache: self.kv_cache,
            default_kv_cache: self.default_kv_cache,
            speculative: self.speculative,
            context: self.context,
            decodes: self.decodes,
            progress,
        }
    }

    /// The context the engine gets.
    pub fn capacity(&self) -> usize {
        self.context.unwrap_or(self.config.max_position_embeddings.min(DEFAULT_CONTEXT))
    }

    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match &self.gguf {
            Some(gguf) => Tokenizer::from_gguf(gguf, &self.config),
            None => Tokenizer::load(&self.dir, &self.config),
        }
    }

    /// generation_config.json's sampling defaults (a GGUF carries none).
    pub fn generation_defaults(&self) -> Result<GenerationDefaults> {
        match &self.gguf {
            Some(_) => Ok(GenerationDefaults::default()),
            None => GenerationDefaults::load(&self.dir),
        }
    }

    pub fn chat_template(&self) -> Result<Option<ChatTemplate>> {
        match &self.gguf {
            Some(gguf) => ChatTemplate::from_gguf(gguf, &self.dir),
            None => ChatTemplate::load(&self.dir),
        }
    }

    /// The checkpoint's tensors (memory-mapped) under dsrun's names: a safetensors directory's,
    /// or a GGUF file's mapped onto them.
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        match &self.gguf {
            Some(_) => Ok(crate::gguf::deepseek2::open(&self.dir)?.checkpoint),
            None => Checkpoint::open(&self.dir),
        }
    }

    /// The checkpoint's weights (memory-mapped), checked against the config.
    pub fn model(&self) -> Result<Model> {
        let checkpoint = self.checkpoint()?;
        Model::from_checkpoint(self.config.clone(), &checkpoint)
    }

    /// The options the engine is built with, after the load policy: the cache format for the
    /// device, and the MTP layer where this engine decodes and `--speculative` allows.
    pub fn resolved_options(&self, model: &Model) -> Result<GpuOptions> {
        let reference = self.device == GpuChoice::Reference;
        if let (true, Some(c)) = (reference, self.kv_cache) {
            if c != CacheFormat::F32 {
                return Err(Error::Invalid(format!("--kv-cache {}: the CPU reference keeps an f32 cache", c.name())));
            }
        }
        // The reference keeps an exact cache. The backends, the CPU's among them, keep 16-bit
        // latents by default: half the memory and the bytes attention reads per token (on the
        // CPU, decode at depth 4096 kept 80% of depth 0's speed with f16, 76% with f32).
        let default = self.default_kv_cache.unwrap_or(if reference { CacheFormat::F32 } else { CacheFormat::F16 });
        let mtp = self.decodes && wants_mtp(self.speculative, model)?;
        Ok(GpuOptions { kv_cache: self.kv_cache.unwrap_or(default), mtp, ..self.options.clone() })
    }

    /// Loads the weights and opens the engine.
    pub fn build(&self) -> Result<Loaded> {
        let started = Instant::now();
        let model = self.model()?;
        let mut loaded = self.build_from(model)?;
        loaded.seconds = started.elapsed().as_secs_f64();
        Ok(loaded)
    }

    /// Opens the engine on weights already loaded with [`EngineBuilder::model`].
    pub fn build_from(&self, model: Model) -> Result<Loaded> {
        let started = Instant::now();
        let options = self.resolved_options(&model)?;
        let capacity = self.capacity();
        let mut warnings = Vec::new();
        if capacity > model.config.max_position_embeddings {
            warnings.push(format!(
                "--ctx {capacity} is beyond the model's max_position_embeddings ({}): positions past it were never trained, and output there is unreliable",
                model.config.max_position_embeddings
            ));
        }
        // Hybrid placement (and the router counts it keeps) only where a GPU backend may run.
        let on_gpu = !matches!(self.device, GpuChoice::Cpu | GpuChoice::Reference);
        let forced = options.cpu_moe > 0 || options.placement == crate::plan::budget::ExpertPlacement::Cpu;
        if forced && !on_gpu {
            warnings.push(format!("--cpu-moe / --n-cpu-moe / --expert-placement cpu: --gpu {} computes every expert on the CPU already; ignored", self.device.name()));
        }
        let counts = on_gpu.then(|| std::sync::Arc::new(self.expert_counts(&model, &mut warnings)));
        let options = GpuOptions { expert_counts: counts, ..options };
        let engine = open_parallel(self.device, model, capacity, &options, &self.parallel, self.progress)?;
        log::info!("loaded {} in {:.2} s on {}", self.dir.display(), started.elapsed().as_secs_f64(), engine.device_name());
        Ok(Loaded { engine, warnings, seconds: started.elapsed().as_secs_f64() })
    }
}

impl EngineBuilder<'_> {
    /// How often the router picked each expert in earlier runs on this checkpoint (hybrid
    /// placement keeps the most picked on the GPU), from the user's cache directory; a file
    /// that does not parse or fit is ignored with a warning, and rewritten.
    fn expert_counts(&self, model: &Model, warnings: &mut Vec<String>) -> ExpertCounts {
        // The MTP layer's counts too wherever the checkpoint has one, loaded now or not, so
        // the file fits runs with and without speculative decoding.
        let experts: Vec<usize> = model.weights.routed_layers(true).iter().map(|m| m.experts.len()).collect();
        let Some(path) = counts_path(&self.dir) else {
            return ExpertCounts::new(&experts, None);
        };
        ExpertCounts::load(&path, &experts).unwrap_or_else(|e| {
            warnings.push(format!("expert counts: {e}"));
            ExpertCounts::new(&experts, Some(path))
        })
    }
}

/// Whether to load `model`'s MTP layer for speculative decoding under `--speculative`.
fn wants_mtp(speculative: Option<Speculative>, model: &Model) -> Result<bool> {
    match (speculative, model.weights.mtp.is_some()) {
        (Some(Speculative::Off), _) => Ok(false),
        (Some(Speculative::Mtp), false) => Err(Error::Invalid(format!(
            "--speculative mtp: this checkpoint has no MTP layer ({}; `dsrun inspect` shows); use --speculative off",
            if model.config.num_nextn_predict_layers > 0 { "its config announces one, but its weights are not there" } else { "num_nextn_predict_layers is 0" }
        ))),
        (_, has) => Ok(has),
    }
}
