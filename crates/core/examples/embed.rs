//! dsrun embedded in another program, with dsrun-core alone (no command line, no server):
//! `cargo run --release -p dsrun-core --example embed -- weights "This module provides"`.

use dsrun_core::{
    builder::EngineBuilder,
    generate::{generate, Stopping},
    sample::{Sampler, SamplerConfig},
};

fn main() -> dsrun_core::Result<()> {
    let mut args = std::env::args().skip(1);
    let builder = EngineBuilder::open(args.next().unwrap_or_else(|| "weights".into()))?;
    let (tokenizer, mut engine) = (builder.tokenizer()?, builder.build()?.engine);
    let prompt = tokenizer.encode(&args.next().unwrap_or_else(|| "This module provides".into()))?;
    let sampler = Sampler::new(SamplerConfig { temperature: 0.0, ..SamplerConfig::default() }, builder.config().vocab_size)?;
    let stopping = Stopping { max_tokens: 32, ..Stopping::default() };
    generate(
        engine.as_mut(),
        &tokenizer,
        &prompt,
        sampler,
        stopping,
        0,
        |text| {
            print!("{text}");
            Ok(())
        },
        &|| false,
    )?;
    println!();
    Ok(())
}
