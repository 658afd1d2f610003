//! `dsrun chat`: a conversation in the terminal through the model's chat template.

use super::args::{DeviceArgs, ModelArgs, SamplingArgs, StoppingArgs};
use super::progress::Bar;
use clap::Args;
use dsrun::error::{Error, Result};
use dsrun::sample::{Sampler, SamplerConfig};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// A system message to start the conversation with.
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Longest reply in tokens.
    #[arg(short = 'n', long = "n-predict", default_value_t = 1024, value_name = "N")]
    pub n: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub stopping: StoppingArgs,
    /// Context length in tokens: the whole conversation (default: min(4096, max_position_embeddings)).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub ctx: Option<u64>,
    /// Print speed after every reply (also toggled by /stats).
    #[arg(long)]
    pub stats: bool,
}

pub fn run(args: ChatArgs) -> Result<()> {
    let load = Bar::new();
    let builder = args.device.builder(&args.model.dir())?.context(args.ctx.map(|c| c as usize)).progress(&load);
    let vocab = builder.config().vocab_size;
    let tokenizer = builder.tokenizer()?;
    let template = builder
        .chat_template()?
        .ok_or_else(|| Error::Invalid(format!("{} has no chat template (tokenizer_config.json's chat_template): use `dsrun --prompt` to continue text", builder.dir().display())))?;
    let base = args.sampling.checked_config(&builder.generation_defaults()?, vocab)?;
    let loaded = builder.build()?;
    super::warn(&loaded.warnings);
    let mut engine = loaded.engine;
    let draft = args.device.draft(engine.as_ref());
    let chat = dsrun::chat::Chat { engine: engine.as_mut(), tokenizer: &tokenizer, template: &template, draft };
    let settings = dsrun::chat::Settings { system: args.system.clone(), stopping: args.stopping.stopping(args.n), stats: args.stats };
    // Each reply draws from its own seed, reproducible from --seed.
    let sampler = |turn: u64| Sampler::new(SamplerConfig { seed: base.seed.wrapping_add(turn), ..base.clone() }, vocab);
    dsrun::chat::run(chat, settings, &sampler)
}
