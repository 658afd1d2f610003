//! `dsrun logits`: every position's logits of a token sequence, as a `.npy` file.

use super::args::{DeviceArgs, ModelArgs};
use clap::Args;
use dsrun::engine::Steps;
use dsrun::error::Result;
use dsrun::model::Logits;
use dsrun::plan::layout::CacheFormat;
use std::path::PathBuf;

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Comma-separated token ids, e.g. 0,5,17.
    #[arg(long, value_delimiter = ',', required = true, num_args = 1..)]
    pub tokens: Vec<u32>,
    /// Output file (.npy, little-endian f32, shape [n_tokens, vocab_size]).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

pub fn run(args: LogitsArgs) -> Result<()> {
    // An exact f32 cache unless asked otherwise: logits exist to compare implementations.
    let builder = args.device.builder(&args.model.dir())?.default_kv_cache(CacheFormat::F32).context(Some(args.tokens.len())).decodes(false);
    let loaded = builder.build()?;
    super::warn(&loaded.warnings);
    let mut engine = loaded.engine;
    let logits = engine.forward(&args.tokens, Logits::All)?;
    let vocab = engine.config().vocab_size;
    dsrun::npy::write_f32(&args.out, &[args.tokens.len(), vocab], &logits)?;
    eprintln!("wrote {} x {vocab} logits to {} ({})", args.tokens.len(), args.out.display(), engine.device_name());
    Ok(())
}
