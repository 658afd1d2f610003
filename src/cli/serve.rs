//! `dsrun serve`: the OpenAI-compatible HTTP server (`dsrun::server`), decoding up to
//! `--parallel` requests together.

use super::args::{DeviceArgs, ModelArgs, SamplingArgs};
use super::progress::Bar;
use clap::Args;
use dsrun::error::{Error, Result};
use dsrun::sample::SamplerConfig;
use std::path::Path;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Address to listen on (loopback by default: other machines cannot connect).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences decoded together (continuous batching); each has the full --ctx.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub parallel: u64,
    /// Context length per sequence in tokens (default: min(4096, max_position_embeddings)).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub ctx: Option<u64>,
    /// Require `Authorization: Bearer KEY` on /v1/ routes.
    #[arg(long, value_name = "KEY", env = "DSRUN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The model name /v1/models lists and responses carry (default: the model directory's name).
    #[arg(long, value_name = "NAME")]
    pub alias: Option<String>,
    /// Largest request body, in bytes (413 beyond).
    #[arg(long, default_value_t = 4 << 20, value_name = "BYTES")]
    pub body_limit: usize,
    /// Requests that may wait for a free sequence before new ones get 503.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub queue: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let dir = args.model.dir();
    let load = Bar::new();
    let builder = args.device.builder(&dir)?.context(args.ctx.map(|c| c as usize)).sequences(args.parallel as usize).progress(&load);
    // Requests bring their own seed (or one from the clock).
    let sampling = SamplerConfig { seed: 0, ..args.sampling.checked_config(&builder.generation_defaults()?, builder.config().vocab_size)? };
    let tokenizer = builder.tokenizer()?;
    let template = builder.chat_template()?;
    if template.is_none() {
        eprintln!("note: {} has no chat template: /v1/chat/completions answers 400, /v1/completions works", dir.display());
    }
    let loaded = builder.build()?;
    super::warn(&loaded.warnings);
    let engine = loaded.engine;
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

/// The checkpoint directory's name ("DeepSeek-V3"), or "dsrun-default" for the bundled model.
fn model_name(dir: &Path) -> String {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    match canonical.file_name().and_then(|n| n.to_str()) {
        Some("weights") | None => "dsrun-default".into(),
        Some(name) => name.to_string(),
    }
}
