//! `dsrun inspect`: what a checkpoint is, and (`--plan`) the forward plan a backend would run.

use super::args::{DeviceArgs, ModelArgs};
use clap::Args;
use dsrun::error::Result;
use dsrun::model::Model;

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Also print the forward plan the chosen GPU backend would run: its buffers and weights
    /// with their sizes, every op of a step, the memory plan and expert streaming.
    #[arg(long)]
    pub plan: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Context length the plan is made for (default: min(4096, max_position_embeddings)).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub ctx: Option<u64>,
}

/// Whether `dir` holds safetensors weights (else it may be a config.json alone).
fn has_weights(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir).map(|entries| entries.flatten().any(|e| e.path().extension().is_some_and(|x| x == "safetensors"))).unwrap_or(true)
}

pub fn run(args: InspectArgs) -> Result<()> {
    let dir = args.model.dir();
    let mut out = String::new();
    if dsrun::gguf::is_gguf(&dir) {
        // The file's own tables first; then what dsrun maps them to, as for any checkpoint, or
        // why it cannot (the tables are worth seeing either way).
        let (gguf, _map) = dsrun::gguf::Gguf::open(&dir)?;
        out += &gguf.describe();
        out += &dsrun::gguf::deepseek2::describe_mapping(&gguf);
        out += "\n";
        if let Err(e) = dsrun::gguf::deepseek2::open(&dir).and_then(|m| Model::from_checkpoint(m.config, &m.checkpoint)) {
            if args.plan {
                return Err(e);
            }
            out += &format!("dsrun cannot run this file: {e}\n");
            return super::print(&out);
        }
    }
    let builder = args.device.builder(&dir)?.context(args.ctx.map(|c| c as usize)).decodes(false);
    if !dsrun::gguf::is_gguf(&dir) && !has_weights(&dir) {
        // A config.json alone (downloaded to plan a deployment): the model as published,
        // divided among the --devices given, else among 1, 8 and 16.
        let world = builder.parallel_settings().world();
        out += &format!("{}: config.json only, no weights: the model as its publisher ships it (FP8 e4m3 with 128x128 block scales; embedding, head and router bf16)\n", dir.display());
        for world in if world > 1 { vec![world] } else { vec![1, 8, 16] } {
            out += &format!("  {}\n", dsrun::plan::shard::published_traffic(builder.config(), world).describe());
        }
        return super::print(&out);
    }
    let checkpoint = builder.checkpoint()?;
    let model = Model::from_checkpoint(builder.config().clone(), &checkpoint)?;
    out += &dsrun::inspect::report(&model.config, &checkpoint, &model.weights, &model.ignored);
    if args.plan {
        let options = builder.resolved_options(&model)?;
        out += &dsrun::device::describe_parallel_plan(args.device.gpu, &model, builder.capacity(), &options, builder.parallel_settings())?;
    }
    super::print(&out)
}
