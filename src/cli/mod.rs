//! The `dsrun` command line: one file per subcommand, each parsing its flags into the core's
//! settings and printing what comes back. Shared flags live in `args`, progress bars in
//! `progress`.

pub mod args;
mod bench;
mod chat;
mod check;
mod devices;
mod generate;
mod inspect;
mod logits;
mod perplexity;
mod progress;
mod quantize;
mod serve;
mod synth;

use clap::{Parser, Subcommand};
use dsrun::error::{Error, Result};
use std::io::Write;

/// Run DeepSeek-V3-architecture Mixture-of-Experts models (MLA + DeepSeekMoE, FP8 blocks).
///
/// With no subcommand, generates text from --prompt and streams it to stdout; timing goes to stderr.
#[derive(Parser)]
#[command(name = "dsrun", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    generate: generate::GenerateArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Write the logits of every position of a token sequence to a .npy file ([n_tokens, vocab], f32).
    Logits(logits::LogitsArgs),
    /// Describe a checkpoint: architecture, parameter counts, bytes by dtype, ignored tensors.
    Inspect(inspect::InspectArgs),
    /// Scan every tensor of a checkpoint for non-finite values (NaN, infinities), naming the bad ones.
    Check(check::CheckArgs),
    /// Write a checkpoint (safetensors or GGUF) as a GGUF file of llama.cpp's layout in Q8_0,
    /// Q6_K, Q4_K_M, F16, BF16 or F32, to load without converting again (llama.cpp reads it too).
    Quantize(quantize::QuantizeArgs),
    /// List the GPU adapters wgpu can use, with the limits and features that matter.
    Devices,
    /// Write a random-weight checkpoint of a DeepSeek shape (config, sharded safetensors, tokenizer).
    Synth(synth::SynthArgs),
    /// Measure prompt processing (pp) and generation (tg) speed in tokens per second.
    Bench(bench::BenchArgs),
    /// Perplexity and bits per byte of a text file, in context-sized windows (llama-perplexity's measure).
    Perplexity(perplexity::PerplexityArgs),
    /// Chat in the terminal, through the model's chat template (/help lists the commands).
    Chat(chat::ChatArgs),
    /// Serve an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions), decoding
    /// up to --parallel requests together.
    Serve(serve::ServeArgs),
}

/// Runs the command `cli` names.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        None => generate::run(cli.generate),
        Some(Command::Logits(args)) => logits::run(args),
        Some(Command::Inspect(args)) => inspect::run(args),
        Some(Command::Check(args)) => check::run(args),
        Some(Command::Quantize(args)) => quantize::run(args),
        Some(Command::Devices) => devices::run(),
        Some(Command::Synth(args)) => synth::run(args),
        Some(Command::Bench(args)) => bench::run(args),
        Some(Command::Chat(args)) => chat::run(args),
        Some(Command::Perplexity(args)) => perplexity::run(args),
        Some(Command::Serve(args)) => serve::run(args),
    }
}

/// Writes `text` to stdout; a failed write (a full disk, a closed pipe) is an error, never a
/// silently lost result.
fn print(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|_| out.flush()).map_err(|e| Error::io("stdout", e))
}

/// Warnings from loading, on stderr.
fn warn(warnings: &[String]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}
