//! `dsrun` with no subcommand: continue a prompt and stream the text to stdout.

use super::args::{DeviceArgs, ModelArgs, SamplingArgs, StoppingArgs};
use super::progress::Bar;
use clap::Args;
use dsrun::error::{Error, Result};
use dsrun::generate::{generate, StopReason};
use std::io::Write;
use std::time::Instant;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Text to continue.
    #[arg(long, short = 'p', default_value = "This module provides")]
    pub prompt: String,
    /// Number of tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 64, value_name = "N")]
    pub n: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub stopping: StoppingArgs,
    /// Context length in tokens: prompt plus generated (default: min(4096, max_position_embeddings)).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub ctx: Option<u64>,
    /// Also print work counters (dispatches, submits and bytes read back per step) to stderr.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let started = Instant::now();
    let load = Bar::new();
    let builder = args.device.builder(&args.model.dir())?.context(args.ctx.map(|c| c as usize)).progress(&load);
    let sampler = args.sampling.sampler(&builder.generation_defaults()?, builder.config().vocab_size)?;
    let tokenizer = builder.tokenizer()?;
    let loaded = builder.build()?;
    super::warn(&loaded.warnings);
    let mut engine = loaded.engine;
    let load_seconds = started.elapsed().as_secs_f64();
    let prompt = tokenizer.encode(&args.prompt)?;

    let mut stdout = std::io::stdout().lock();
    let failed = |e| Error::io("stdout", e);
    write!(stdout, "{}", args.prompt).and_then(|_| stdout.flush()).map_err(failed)?;
    let emit = |text: &str| write!(stdout, "{text}").and_then(|_| stdout.flush()).map_err(failed);
    let draft = args.device.draft(engine.as_ref());
    let stats = generate(engine.as_mut(), &tokenizer, &prompt, sampler, args.stopping.stopping(args.n), draft, emit, &|| false)?;
    writeln!(stdout).and_then(|_| stdout.flush()).map_err(failed)?;
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
