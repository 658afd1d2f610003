//! `dsrun synth`: a random-weight checkpoint of a published DeepSeek shape.

use super::args::choice;
use super::progress::Bar;
use clap::Args;
use dsrun::error::{Error, Result};
use dsrun::synth::{Preset, SynthDtype};
use dsrun::util::{human_bytes, human_count};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct SynthArgs {
    /// Directory to write (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Shape to start from.
    #[arg(long, default_value = "small", value_parser = choice::<Preset>())]
    pub preset: Preset,
    /// Number of layers (the leading dense layers are kept, at most layers - 1).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub layers: Option<u64>,
    /// Routed experts per MoE layer (must divide into the preset's expert groups).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub experts: Option<u64>,
    /// Hidden size.
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..))]
    pub hidden: Option<u64>,
    #[arg(long, default_value = "bf16", value_parser = choice::<SynthDtype>())]
    pub dtype: SynthDtype,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Largest shard file in GiB.
    #[arg(long, default_value_t = 4.0, value_name = "GIB")]
    pub shard_gib: f64,
    /// Also write a multi-token-prediction layer (DeepSeek-V3's layer 61), for speculative decoding.
    #[arg(long)]
    pub mtp: bool,
    /// The deepseek-v32 preset's index_topk: positions each query attends to [default: 2048].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub index_topk: Option<u64>,
}

pub fn run(args: SynthArgs) -> Result<()> {
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
    eprintln!("writing {} parameters ({}) to {}", human_count(params), human_bytes(bytes), args.out.display());
    let started = Instant::now();
    let report = dsrun::synth::synth(&args.out, &options, &Bar::new())?;
    super::print(&format!(
        "wrote {} ({} parameters, {} in {} shard(s)) in {:.1} s\n",
        args.out.display(),
        human_count(report.params),
        human_bytes(report.bytes),
        report.shards,
        started.elapsed().as_secs_f64()
    ))
}
