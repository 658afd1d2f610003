//! `dsrun quantize`: write a checkpoint as a GGUF file (llama.cpp's `deepseek2` layout), once,
//! in the format mix given, for dsrun and llama.cpp alike (as `llama-quantize IN OUT TYPE`).

use super::args::{choice, ModelArgs};
use super::progress::Bar;
use clap::Args;
use dsrun::error::Result;
use dsrun::quantize::FileType;
use dsrun::util::human_bytes;
use std::path::PathBuf;

#[derive(Args)]
pub struct QuantizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The GGUF file to write (replaced if it exists, once the new one is whole).
    #[arg(value_name = "OUT.gguf")]
    pub out: PathBuf,
    /// The formats to write the weights in.
    #[arg(value_name = "TYPE", value_parser = choice::<FileType>())]
    pub file_type: FileType,
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    let source = args.model.dir();
    let written = dsrun::quantize::quantize(&source, &args.out, args.file_type, &Bar::new())?;
    let formats: Vec<String> = written.formats.iter().map(|(d, b)| format!("{} {}", d.name(), human_bytes(*b))).collect();
    eprintln!("wrote {}: {} tensors, {} ({})", args.out.display(), written.tensors, human_bytes(written.bytes), formats.join(", "));
    Ok(())
}
