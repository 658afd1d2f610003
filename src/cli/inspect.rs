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
    let checkpoint = builder.checkpoint()?;
    let model = Model::from_checkpoint(builder.config().clone(), &checkpoint)?;
    out += &dsrun::inspect::report(&model.config, &checkpoint, &model.weights, &model.ignored);
    if args.plan {
        let options = builder.resolved_options(&model)?;
        out += &dsrun::device::describe_plan(args.device.gpu, &model, builder.capacity(), &options)?;
    }
    super::print(&out)
}
