//! The `dsrun` command line: argument parsing and printing; the work lives in the library.

use clap::{Args, Parser, Subcommand};
use dsrun::backend::layout::CacheFormat;
use dsrun::budget::{GpuMem, GpuOptions, Prefetch};
use dsrun::checkpoint::Checkpoint;
use dsrun::expert_cache::Eviction;
use dsrun::config::ModelConfig;
use dsrun::device::{open_engine, GpuChoice};
use dsrun::error::{Error, Result};
use dsrun::generate::{generate, StopReason, Stopping};
use dsrun::generation_config::GenerationDefaults;
use dsrun::speculative::Speculative;
use dsrun::model::{Logits, Model};
use dsrun::engine::Engine;
use dsrun::quant::QuantTarget;
use dsrun::sample::{Sampler, SamplerConfig};
use dsrun::tokenizer::Tokenizer;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

/// Run DeepSeek-V3-architecture Mixture-of-Experts models (MLA + DeepSeekMoE, FP8 blocks).
///
/// With no subcommand, generates text from --prompt and streams it to stdout; timing goes to stderr.
#[derive(Parser)]
#[command(name = "dsrun", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    generate: GenerateArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Write the logits of every position of a token sequence to a .npy file ([n_tokens, vocab], f32).
    Logits(LogitsArgs),
    /// Describe a checkpoint: architecture, parameter counts, bytes by dtype, ignored tensors.
    Inspect(InspectArgs),
    /// Scan every tensor of a checkpoint for non-finite values (NaN, infinities), naming the bad ones.
    Check(CheckArgs),
    /// List the GPU adapters wgpu can use, with the limits and features that matter.
    Devices,
    /// Write a random-weight checkpoint of a DeepSeek shape (config, sharded safetensors, tokenizer).
    Synth(SynthArgs),
    /// Measure prompt processing (pp) and generation (tg) speed in tokens per second.
    Bench(BenchArgs),
    /// Perplexity and bits per byte of a text file, in context-sized windows (llama-perplexity's measure).
    Perplexity(PerplexityArgs),
    /// Chat in the terminal, through the model's chat template (/help lists the commands).
    Chat(ChatArgs),
    /// Serve an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions), decoding
    /// up to --parallel requests together.
    Serve(ServeArgs),
}

#[derive(Args)]
struct CheckArgs {
    #[command(flatten)]
    model: ModelArgs,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// UTF-8 text to score.
    #[arg(long, short = 'f', value_name = "FILE")]
    file: PathBuf,
    /// Window length in tokens: each window runs from an empty cache and its second half is
    /// scored (default: min(512, max_position_embeddings), as llama-perplexity).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(2..))]
    ctx: Option<u64>,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// A system message to start the conversation with.
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// Longest reply in tokens.
    #[arg(short = 'n', long = "n-predict", default_value_t = 1024, value_name = "N")]
    n: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    stopping: StoppingArgs,
    /// Context length in tokens: the whole conversation (default: min(4096, max_position_embeddings)).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    ctx: Option<u64>,
    /// Print speed after every reply (also toggled by /stats).
    #[arg(long)]
    stats: bool,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Address to listen on (loopback by default: other machines cannot connect).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Sequences decoded together (continuous batching); each has the full --ctx.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    parallel: u64,
    /// Context length per sequence in tokens (default: min(4096, max_position_embeddings)).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    ctx: Option<u64>,
    /// Require `Authorization: Bearer KEY` on /v1/ routes.
    #[arg(long, value_name = "KEY", env = "DSRUN_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The model name /v1/models lists and responses carry (default: the model directory's name).
    #[arg(long, value_name = "NAME")]
    alias: Option<String>,
    /// Largest request body, in bytes (413 beyond).
    #[arg(long, default_value_t = 4 << 20, value_name = "BYTES")]
    body_limit: usize,
    /// Requests that may wait for a free sequence before new ones get 503.
    #[arg(long, default_value_t = 256, value_name = "N")]
    queue: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct SynthArgs {
    /// Directory to write (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Shape to start from.
    #[arg(long, value_enum, default_value = "small")]
    preset: dsrun::synth::Preset,
    /// Number of layers (the leading dense layers are kept, at most layers - 1).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    layers: Option<u64>,
    /// Routed experts per MoE layer (must divide into the preset's expert groups).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    experts: Option<u64>,
    /// Hidden size.
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..))]
    hidden: Option<u64>,
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: dsrun::synth::SynthDtype,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Largest shard file in GiB.
    #[arg(long, default_value_t = 4.0, value_name = "GIB")]
    shard_gib: f64,
    /// Also write a multi-token-prediction layer (DeepSeek-V3's layer 61), for speculative decoding.
    #[arg(long)]
    mtp: bool,
    /// The deepseek-v32 preset's index_topk: positions each query attends to [default: 2048].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    index_topk: Option<u64>,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Prompt tokens processed in one call (0 skips the test). As in llama-bench, -p is a
    /// length here; generation's -p is the prompt text (as in llama-cli).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512, value_parser = parse_prompt_length)]
    prompt: usize,
    /// Tokens generated one by one (0 skips the test).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    generate: usize,
    /// Sequences decoded together for batched generation tests, comma-separated (1: the plain
    /// tg test); e.g. 1,4,8 reports tg128, tg128x4 and tg128x8 as aggregate tok/s.
    #[arg(long, value_delimiter = ',', default_value = "1", value_parser = clap::value_parser!(u64).range(1..=256))]
    parallel: Vec<u64>,
    /// Tokens already in the cache when each test starts (llama-bench's -d); filling is not timed.
    #[arg(short = 'd', long = "depth", default_value_t = 0, value_name = "N")]
    depth: usize,
    /// Repetitions of each test.
    #[arg(short = 'r', long = "repetitions", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    repetitions: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ModelArgs {
    /// Checkpoint directory (config.json, *.safetensors, tokenizer.json). Default: the bundled tiny model.
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
}

#[derive(Args)]
struct DeviceArgs {
    /// Compute device.
    #[arg(long, value_enum, default_value = "auto")]
    gpu: GpuChoice,
    /// Weight format on the GPU: keep the checkpoint's (bf16, FP8 + block scales, ...), or convert
    /// at load to f16, q8 (int8, a scale per 32) or q4 (4-bit, scale and min per 32).
    #[arg(long, value_enum, default_value = "keep")]
    quant: QuantTarget,
    /// GPU memory dsrun may use: `auto` (80% of the adapter's device memory), a size (12G,
    /// 512MiB, 3GB), or N% (that share of the routed experts, everything else resident).
    /// Routed experts that do not fit are streamed from host memory through a slot cache.
    #[arg(long, value_name = "BYTES|auto|N%", default_value = "auto")]
    gpu_mem: GpuMem,
    /// Which cached expert gives way when another must be uploaded (expert streaming).
    #[arg(long, value_enum, default_value = "lru")]
    expert_eviction: Eviction,
    /// Guess the next MoE layer's experts and upload them ahead of need (expert streaming);
    /// auto: on, except on software adapters.
    #[arg(long, value_enum, default_value = "auto")]
    prefetch: Prefetch,
    /// How the latent cache stores its values [default: f16 on the GPU (half the memory and
    /// bytes per step); f32 for `logits` and on the CPU reference].
    #[arg(long, value_enum)]
    kv_cache: Option<CacheFormat>,
    /// Speculative decoding: draft tokens with the checkpoint's multi-token-prediction layer
    /// and verify them in one step [default: mtp where the checkpoint has the layer].
    #[arg(long, value_enum)]
    speculative: Option<Speculative>,
    /// Tokens the MTP layer drafts per step (chained on its own output beyond the first).
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=dsrun::speculative::MAX_DRAFT as u64))]
    draft: u64,
}

impl DeviceArgs {
    /// The options for generation, chat, serve, bench and perplexity (a 16-bit cache on GPUs).
    fn options(&self) -> GpuOptions {
        let default = if self.gpu == GpuChoice::Cpu { CacheFormat::F32 } else { CacheFormat::F16 };
        self.options_with(default)
    }

    /// The options with `default` as the cache format unless --kv-cache says otherwise.
    fn options_with(&self, default: CacheFormat) -> GpuOptions {
        GpuOptions {
            quant: self.quant,
            gpu_mem: self.gpu_mem,
            eviction: self.expert_eviction,
            prefetch: self.prefetch,
            sequences: 1,
            kv_cache: self.kv_cache.unwrap_or(default),
            mtp: false,
        }
    }

    /// Whether to load `model`'s MTP layer for speculative decoding (commands that decode).
    fn wants_mtp(&self, model: &Model) -> Result<bool> {
        match (self.speculative, model.weights.mtp.is_some()) {
            (Some(Speculative::Off), _) => Ok(false),
            (Some(Speculative::Mtp), false) => Err(Error::Invalid(format!(
                "--speculative mtp: this checkpoint has no MTP layer ({}; `dsrun inspect` shows); use --speculative off",
                if model.config.num_nextn_predict_layers > 0 { "its config announces one, but its weights are not there" } else { "num_nextn_predict_layers is 0" }
            ))),
            (_, has) => Ok(has),
        }
    }

    /// Drafts per speculative step for an engine (0: it has no MTP layer loaded).
    fn draft(&self, engine: &dyn Engine) -> usize {
        if engine.has_mtp() {
            self.draft as usize
        } else {
            0
        }
    }

    /// Rejects a --kv-cache the chosen device cannot honour.
    fn check(&self) -> Result<()> {
        match (self.gpu, self.kv_cache) {
            (GpuChoice::Cpu, Some(c)) if c != CacheFormat::F32 => {
                Err(Error::Invalid(format!("--kv-cache {}: the CPU reference keeps an f32 cache", c.name())))
            }
            _ => Ok(()),
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Text to continue.
    #[arg(long, short = 'p', default_value = "This module provides")]
    prompt: String,
    /// Number of tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 64, value_name = "N")]
    n: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    stopping: StoppingArgs,
    /// Context length in tokens: prompt plus generated (default: min(4096, max_position_embeddings)).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    ctx: Option<u64>,
    /// Also print work counters (dispatches, submits and bytes read back per step) to stderr.
    #[arg(long, short = 'v')]
    verbose: bool,
}

/// How the next token is chosen. Unset values come from the checkpoint's
/// generation_config.json, else llama.cpp's defaults.
#[derive(Args, Clone)]
struct SamplingArgs {
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
}

impl SamplingArgs {
    /// The settings, checked under the flags' names (`top_p` is `--top-p`).
    fn checked_config(&self, defaults: &GenerationDefaults, vocab: usize) -> Result<SamplerConfig> {
        let config = self.config(defaults);
        config.validate_named(vocab, &|field| format!("--{}", field.replace("repetition", "repeat").replace('_', "-")))?;
        Ok(config)
    }

    fn sampler(&self, defaults: &GenerationDefaults, vocab: usize) -> Result<Sampler> {
        Sampler::new(self.checked_config(defaults, vocab)?, vocab)
    }
}

fn parse_prompt_length(s: &str) -> std::result::Result<usize, String> {
    s.parse::<usize>().map_err(|_| format!("`{s}`: bench's -p is the prompt length in tokens, as in llama-bench (text prompts are for `dsrun -p TEXT`)"))
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
struct StoppingArgs {
    /// End the reply at this text, which is not printed (repeatable).
    #[arg(long, value_name = "TEXT")]
    stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
}

impl StoppingArgs {
    fn stopping(&self, max_tokens: usize) -> Stopping {
        Stopping { max_tokens, stop: self.stop.clone(), ignore_eos: self.ignore_eos, logprobs: None }
    }
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Comma-separated token ids, e.g. 0,5,17.
    #[arg(long, value_delimiter = ',', required = true, num_args = 1..)]
    tokens: Vec<u32>,
    /// Output file (.npy, little-endian f32, shape [n_tokens, vocab_size]).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

#[derive(Args)]
struct InspectArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Also print the forward plan the chosen GPU backend would run: its buffers and weights
    /// with their sizes, every op of a step, the memory plan and expert streaming.
    #[arg(long)]
    plan: bool,
    #[command(flatten)]
    device: DeviceArgs,
    /// Context length the plan is made for (default: min(4096, max_position_embeddings)).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    ctx: Option<u64>,
}

fn main() -> ExitCode {
    quiet_mesa();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn,wgpu_hal=off")).format_timestamp(None).init();
    let cli = Cli::parse();
    let result = match cli.command {
        None => run_generate(cli.generate),
        Some(Command::Logits(args)) => run_logits(args),
        Some(Command::Inspect(args)) => run_inspect(args),
        Some(Command::Check(args)) => run_check(args),
        Some(Command::Devices) => run_devices(),
        Some(Command::Synth(args)) => run_synth(args),
        Some(Command::Bench(args)) => run_bench(args),
        Some(Command::Chat(args)) => dsrun_chat(args),
        Some(Command::Perplexity(args)) => run_perplexity(args),
        Some(Command::Serve(args)) => run_serve(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`dsrun | head`) is the reader's choice, not an error worth a message.
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Mesa's drivers print "XDG_RUNTIME_DIR is invalid or not set" on every adapter query when
/// the variable is missing (containers, CI, ssh sessions); dsrun draws nothing on screen, so a
/// private directory stands in for it. Set while the process has one thread.
fn quiet_mesa() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let dir = std::env::temp_dir().join("dsrun-xdg-runtime");
        if std::fs::create_dir_all(&dir).is_ok() {
            std::env::set_var("XDG_RUNTIME_DIR", &dir);
        }
    }
}

/// `--model`, or the tiny model bundled in `weights/` (next to the working directory or the crate).
fn model_dir(args: &ModelArgs) -> PathBuf {
    if let Some(dir) = &args.model {
        return dir.clone();
    }
    let local = Path::new("weights");
    if local.join("config.json").is_file() {
        local.to_path_buf()
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("weights")
    }
}

/// One sequence's engine; `decodes`: the command generates tokens (the MTP layer is loaded
/// for speculative decoding where `--speculative` allows).
fn load(dir: &Path, device: &DeviceArgs, capacity: Option<usize>, decodes: bool) -> Result<Box<dyn Engine>> {
    load_sequences(dir, device, capacity, GpuOptions { sequences: 1, ..device.options() }, decodes)
}

/// The engine `options` describe (its sequences of `capacity` tokens each).
fn load_sequences(dir: &Path, device: &DeviceArgs, capacity: Option<usize>, mut options: GpuOptions, decodes: bool) -> Result<Box<dyn Engine>> {
    let started = Instant::now();
    device.check()?;
    let model = Model::load(dir)?;
    options.mtp = decodes && device.wants_mtp(&model)?;
    let capacity = capacity.unwrap_or(model.config.max_position_embeddings.min(4096));
    if capacity > model.config.max_position_embeddings {
        eprintln!(
            "warning: --ctx {capacity} is beyond the model's max_position_embeddings ({}): positions past it were never trained, and output there is unreliable",
            model.config.max_position_embeddings
        );
    }
    let engine = open_engine(device.gpu, model, capacity, &options)?;
    log::info!("loaded {} in {:.2} s on {}", dir.display(), started.elapsed().as_secs_f64(), engine.device_name());
    Ok(engine)
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    let dir = model_dir(&args.model);
    let started = Instant::now();
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let defaults = GenerationDefaults::load(&dir)?;
    let sampler = args.sampling.sampler(&defaults, config.vocab_size)?;
    let tokenizer = Tokenizer::load(&dir, &config)?;
    let mut engine = load(&dir, &args.device, args.ctx.map(|c| c as usize), true)?;
    let load_seconds = started.elapsed().as_secs_f64();
    let prompt = tokenizer.encode(&args.prompt)?;

    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{}", args.prompt).and_then(|_| stdout.flush()).map_err(|e| Error::io("stdout", e))?;
    let emit = |text: &str| write!(stdout, "{text}").and_then(|_| stdout.flush()).map_err(|e| Error::io("stdout", e));
    let draft = args.device.draft(engine.as_ref());
    let stats = generate(engine.as_mut(), &tokenizer, &prompt, sampler, args.stopping.stopping(args.n), draft, emit, &|| false)?;
    writeln!(stdout).map_err(|e| Error::io("stdout", e))?;
    if stats.stop != StopReason::MaxTokens {
        eprintln!("{}", stats.stop.describe(stats.generated_tokens, engine.capacity()));
    }
    eprintln!("load {load_seconds:.2} s | {} | {}", stats.summary(), engine.device_name());
    if args.verbose {
        if let Some(counters) = engine.counters() {
            eprintln!("{counters}");
        }
    }
    Ok(())
}

fn run_serve(args: ServeArgs) -> Result<()> {
    let dir = model_dir(&args.model);
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let defaults = GenerationDefaults::load(&dir)?;
    // Requests bring their own seed (or one from the clock).
    let sampling = SamplerConfig { seed: 0, ..args.sampling.checked_config(&defaults, config.vocab_size)? };
    let tokenizer = Tokenizer::load(&dir, &config)?;
    let template = dsrun::chat_template::ChatTemplate::load(&dir)?;
    if template.is_none() {
        eprintln!("note: {} has no chat template: /v1/chat/completions answers 400, /v1/completions works", dir.display());
    }
    let options = GpuOptions { sequences: args.parallel as usize, ..args.device.options() };
    let engine = load_sequences(&dir, &args.device, args.ctx.map(|c| c as usize), options, true)?;
    let name = args.alias.clone().unwrap_or_else(|| model_name(&dir));
    let summary = format!("{} sequences of {} tokens on {}", engine.sequences(), engine.capacity(), engine.device_name());
    let options = dsrun::server::ServerOptions { model_name: name.clone(), api_key: args.api_key.clone(), body_limit: args.body_limit, queue: args.queue, sampling };
    let app = std::sync::Arc::new(dsrun::server::App::new(engine, tokenizer, template, options));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(|e| Error::io("tokio runtime", e))?;
    let addr = format!("{}:{}", args.host, args.port);
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| Error::Invalid(format!("cannot listen on {addr}: {e}")))?;
        let local = listener.local_addr().map_err(|e| Error::io(&addr, e))?;
        eprintln!("dsrun serve: listening on http://{local} (model \"{name}\", {summary}); Ctrl-C stops");
        dsrun::server::serve(listener, app.clone(), dsrun::server::interrupted()).await.map_err(|e| Error::io(&addr, e))
    })?;
    eprintln!("dsrun serve: requests drained, shutting down");
    if let Ok(mut app) = std::sync::Arc::try_unwrap(app) {
        app.stop();
    }
    Ok(())
}

/// The checkpoint directory's name ("DeepSeek-V3"), or "dsrun" for the bundled model.
fn model_name(dir: &Path) -> String {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    match canonical.file_name().and_then(|n| n.to_str()) {
        Some("weights") | None => "dsrun-default".into(),
        Some(name) => name.to_string(),
    }
}

fn dsrun_chat(args: ChatArgs) -> Result<()> {
    let dir = model_dir(&args.model);
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let defaults = GenerationDefaults::load(&dir)?;
    let tokenizer = Tokenizer::load(&dir, &config)?;
    let template = dsrun::chat_template::ChatTemplate::load(&dir)?
        .ok_or_else(|| Error::Invalid(format!("{} has no chat template (tokenizer_config.json's chat_template): use `dsrun --prompt` to continue text", dir.display())))?;
    let mut engine = load(&dir, &args.device, args.ctx.map(|c| c as usize), true)?;
    let base = args.sampling.checked_config(&defaults, config.vocab_size)?;
    let draft = args.device.draft(engine.as_ref());
    let chat = dsrun::chat::Chat { engine: engine.as_mut(), tokenizer: &tokenizer, template: &template, draft };
    let settings = dsrun::chat::Settings {
        system: args.system.clone(),
        stopping: args.stopping.stopping(args.n),
        stats: args.stats,
    };
    // Each reply draws from its own seed, reproducible from --seed.
    let sampler = |turn: u64| Sampler::new(SamplerConfig { seed: base.seed.wrapping_add(turn), ..base.clone() }, config.vocab_size);
    dsrun::chat::run(chat, settings, &sampler)
}

fn run_perplexity(args: PerplexityArgs) -> Result<()> {
    let dir = model_dir(&args.model);
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let tokenizer = Tokenizer::load(&dir, &config)?;
    let text = std::fs::read_to_string(&args.file).map_err(|e| Error::io(&args.file, e))?;
    let tokens = tokenizer.encode(&text)?;
    let window = args.ctx.map_or(config.max_position_embeddings.min(512), |c| c as usize);
    let mut engine = load(&dir, &args.device, Some(window), false)?;
    let windows = dsrun::perplexity::windows(&tokens, window).len();
    let bar = indicatif::ProgressBar::new(windows as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} windows, {msg} eta {eta}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let score = dsrun::perplexity::score(engine.as_mut(), &tokenizer, &tokens, window, &mut |s| {
        bar.set_message(format!("perplexity {:.4}", s.perplexity()));
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    println!(
        "perplexity {:.4} ± {:.4} | bits per byte {:.4} | {} tokens scored in {} windows of {window} ({} tokens in {})",
        score.perplexity(),
        score.perplexity_error(),
        score.bits_per_byte(),
        score.tokens,
        score.windows,
        tokens.len(),
        args.file.display()
    );
    eprintln!("{:.1} s on {}", started.elapsed().as_secs_f64(), engine.device_name());
    Ok(())
}

fn run_logits(args: LogitsArgs) -> Result<()> {
    let dir = model_dir(&args.model);
    // An exact f32 cache unless asked otherwise: logits exist to compare implementations.
    let options = args.device.options_with(CacheFormat::F32);
    let mut engine = load_sequences(&dir, &args.device, Some(args.tokens.len()), options, false)?;
    let logits = engine.forward(&args.tokens, Logits::All)?;
    let vocab = engine.config().vocab_size;
    dsrun::npy::write_f32(&args.out, &[args.tokens.len(), vocab], &logits)?;
    eprintln!("wrote {} x {vocab} logits to {} ({})", args.tokens.len(), args.out.display(), engine.device_name());
    Ok(())
}

fn run_check(args: CheckArgs) -> Result<()> {
    let dir = model_dir(&args.model);
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("checking {bar:40} {bytes}/{total_bytes} ({eta})").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let report = dsrun::check::run(&dir, &bar)?;
    bar.finish_and_clear();
    print!("{}", dsrun::check::describe(&report));
    if report.bad.is_empty() {
        Ok(())
    } else {
        Err(Error::Invalid(format!("{}: {} tensor(s) hold non-finite values", dir.display(), report.bad.len())))
    }
}

fn run_inspect(args: InspectArgs) -> Result<()> {
    let dir = model_dir(&args.model);
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let checkpoint = Checkpoint::open(&dir)?;
    let model = Model::from_checkpoint(config, &checkpoint)?;
    print!("{}", dsrun::inspect::report(&model.config, &checkpoint, &model.weights, &model.ignored));
    if args.plan {
        let capacity = args.ctx.map_or(model.config.max_position_embeddings.min(4096), |c| c as usize);
        print!("{}", dsrun::device::describe_plan(args.device.gpu, &model, capacity, &args.device.options())?);
    }
    Ok(())
}

fn run_synth(args: SynthArgs) -> Result<()> {
    if !(args.shard_gib > 0.0) {
        return Err(Error::Invalid(format!("--shard-gib {}: must be positive", args.shard_gib)));
    }
    let options = dsrun::synth::SynthOptions {
        preset: args.preset,
        layers: args.layers.map(|x| x as usize),
        experts: args.experts.map(|x| x as usize),
        hidden: args.hidden.map(|x| x as usize),
        dtype: args.dtype,
        seed: args.seed,
        shard_bytes: (args.shard_gib * (1u64 << 30) as f64) as u64,
        mtp: args.mtp,
        index_topk: args.index_topk.map(|k| k as usize),
    };
    let (params, bytes) = dsrun::synth::size(&options)?;
    eprintln!(
        "writing {} parameters ({}) to {}",
        dsrun::inspect::human_count(params),
        dsrun::inspect::human_bytes(bytes),
        args.out.display()
    );
    let bar = indicatif::ProgressBar::new(bytes);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let report = dsrun::synth::synth(&args.out, &options, &bar)?;
    bar.finish_and_clear();
    println!(
        "wrote {} ({} parameters, {} in {} shard(s)) in {:.1} s",
        args.out.display(),
        dsrun::inspect::human_count(report.params),
        dsrun::inspect::human_bytes(report.bytes),
        report.shards,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run_bench(args: BenchArgs) -> Result<()> {
    let dir = model_dir(&args.model);
    let model = Model::load(&dir)?;
    let params = dsrun::inspect::count_params(&model.config, &model.weights).total;
    let weights = weight_dtypes(&model);
    let capacity = args.depth + args.prompt.max(args.generate).max(9);
    let parallel: Vec<usize> = args.parallel.iter().map(|&p| p as usize).collect();
    let sequences = parallel.iter().copied().max().unwrap_or(1);
    args.device.check()?;
    let options = GpuOptions { sequences, mtp: args.device.wants_mtp(&model)?, ..args.device.options() };
    let mut engine = open_engine(args.device.gpu, model, capacity, &options)?;
    let draft = args.device.draft(engine.as_ref());
    let plan = dsrun::bench::BenchPlan { prompt: args.prompt, generate: args.generate, repetitions: args.repetitions as usize, parallel, depth: args.depth, draft };
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(indicatif::ProgressStyle::with_template("{spinner} bench: {msg} ({elapsed})").unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()));
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let results = dsrun::bench::run(engine.as_mut(), &plan, &mut |test| bar.set_message(format!("{test} x {} repetitions", args.repetitions)))?;
    bar.finish_and_clear();
    let setup = dsrun::bench::BenchSetup {
        model: dir.display().to_string(),
        params,
        weights,
        device: engine.device_name(),
        quant: format!("{:?}", args.device.quant).to_lowercase(),
        gpu_mem: args.device.gpu_mem.to_string(),
        kv_cache: if engine.device_name().starts_with("cpu") { "f32".into() } else { options.kv_cache.name().into() },
        counters: engine.counters(),
    };
    if args.json {
        println!("{}", dsrun::bench::json(&setup, &results));
    } else {
        print!("{}", dsrun::bench::table(&setup, &results));
    }
    Ok(())
}

/// The checkpoint's weight dtypes, most bytes first ("F8_E4M3 + BF16").
fn weight_dtypes(model: &Model) -> String {
    let w = &model.weights;
    let mut seen: Vec<String> = Vec::new();
    let mut note = |m: &dsrun::model::weights::Matrix| {
        let name = m.dtype.name().to_string();
        if !seen.contains(&name) {
            seen.push(name);
        }
    };
    for layer in &w.layers {
        if let dsrun::model::weights::FeedForward::Moe(moe) = &layer.ffn {
            moe.experts[0].matrices().into_iter().for_each(&mut note);
        }
        note(&layer.attention.o);
    }
    note(&w.embed);
    seen.join(" + ")
}

fn run_devices() -> Result<()> {
    let adapters = dsrun::backend::wgpu::context::describe_adapters();
    if adapters.is_empty() {
        println!("no GPU adapters found (dsrun runs on the CPU with --gpu cpu)");
    }
    for line in adapters {
        println!("{line}");
    }
    #[cfg(feature = "cuda")]
    match dsrun::backend::cuda::open(0) {
        Ok(rt) => println!("cuda: {}, {} (--gpu cuda)", rt.describe(), rt.memory().map_or("memory unknown".into(), dsrun::inspect::human_bytes)),
        Err(e) => println!("cuda: none ({e})"),
    }
    Ok(())
}


