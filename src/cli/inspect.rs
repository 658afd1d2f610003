//! `dsrun inspect`: what a checkpoint is, and (`--plan`) the forward plan a backend would run.

use super::args::{DeviceArgs, ModelArgs};
use clap::Args;
use dsrun::checkpoint::Checkpoint;
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
    if dsrun::gguf::is_gguf(&dir) {
        // A GGUF's tables; running one is the GGUF work still to come.
        if args.plan {
            return Err(dsrun::error::Error::Invalid(format!("{}: --plan needs a model dsrun runs, and it does not run GGUF files yet", dir.display())));
        }
        let (gguf, _map) = dsrun::gguf::Gguf::open(&dir)?;
        return super::print(&gguf.describe());
    }
    let builder = args.device.builder(&args.model.dir())?.context(args.ctx.map(|c| c as usize)).decodes(false);
    let checkpoint = Checkpoint::open(builder.dir())?;
    let model = Model::from_checkpoint(builder.config().clone(), &checkpoint)?;
    let mut out = dsrun::inspect::report(&model.config, &checkpoint, &model.weights, &model.ignored);
    if args.plan {
        let options = builder.resolved_options(&model)?;
        out += &dsrun::device::describe_plan(args.device.gpu, &model, builder.capacity(), &options)?;
    }
    super::print(&out)
}
