//! dsrun: DeepSeek-V3-architecture Mixture-of-Experts models (Multi-head Latent Attention,
//! DeepSeekMoE routing, FP8 block-quantised weights) from Hugging Face checkpoints.
//!
//! Start with [`builder::EngineBuilder`] (load a checkpoint onto a device) and
//! [`engine::Engine`] (run steps); `generate`, `speculative`, `perplexity` and `bench` work over
//! any engine. `crates/core/examples/embed.rs` shows the whole of it in ten lines.

/// A module that is implementation, not API: dsrun's own tests and benches reach it with the
/// `internals` feature (the root crate's dev-dependency turns it on); without it the module is
/// private to the crate.
macro_rules! internal_mod {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[cfg(feature = "internals")]
        pub mod $name;
        $(#[$meta])*
        #[cfg(not(feature = "internals"))]
        #[allow(dead_code, unused_imports)]
        pub(crate) mod $name;
    };
}

pub mod backend;
pub mod bench;
pub mod builder;
pub mod chat_template;
pub mod check;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod engine;
pub mod error;
mod expert_cache;
internal_mod!(format);
pub mod generate;
pub mod generation_config;
pub mod gguf;
internal_mod!(hot_path);
pub mod inspect;
mod mapped;
pub mod model;
pub mod npy;
pub mod perplexity;
pub mod plan;
pub mod quant;
pub mod quantize;
pub mod runtime;
pub mod sample;
pub mod speculative;
pub mod synth;
mod tiktoken;
pub mod tokenizer;
pub mod util;

pub use error::{Error, Result};
