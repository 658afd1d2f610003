//! `dsrun perplexity`: perplexity and bits per byte of a text file, as llama-perplexity measures them.

use super::args::{DeviceArgs, ModelArgs};
use super::progress::Bar;
use clap::Args;
use dsrun::error::{Error, Result};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// UTF-8 text to score.
    #[arg(long, short = 'f', value_name = "FILE")]
    pub file: PathBuf,
    /// Window length in tokens: each window runs from an empty cache and its second half is
    /// scored (default: min(512, max_position_embeddings), as llama-perplexity).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(3..))]
    pub ctx: Option<u64>,
}

pub fn run(args: PerplexityArgs) -> Result<()> {
    let builder = args.device.builder(&args.model.dir())?;
    let tokenizer = builder.tokenizer()?;
    let text = std::fs::read_to_string(&args.file).map_err(|e| Error::io(&args.file, e))?;
    let tokens = tokenizer.encode(&text)?;
    let window = args.ctx.map_or(builder.config().max_position_embeddings.min(512), |c| c as usize);
    let load = Bar::new();
    let loaded = builder.context(Some(window)).decodes(false).progress(&load).build()?;
    super::warn(&loaded.warnings);
    let mut engine = loaded.engine;
    let windows = dsrun::perplexity::windows(&tokens, window).len();
    let bar = indicatif::ProgressBar::new(windows as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} windows, {msg} eta {eta}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
    let started = Instant::now();
    let score = dsrun::perplexity::score(engine.as_mut(), &tokenizer, &tokens, window, &mut |s| {
        bar.set_message(format!("perplexity {:.4}", s.perplexity()));
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    super::print(&format!(
        "perplexity {:.4} ± {:.4} | bits per byte {:.4} | {} tokens scored in {} windows of {window} ({} tokens in {})\n",
        score.perplexity(),
        score.perplexity_error(),
        score.bits_per_byte(),
        score.tokens,
        score.windows,
        tokens.len(),
        args.file.display()
    ))?;
    eprintln!("{:.1} s on {}", started.elapsed().as_secs_f64(), engine.device_name());
    Ok(())
}
