//! dsrun: DeepSeek-V3-architecture Mixture-of-Experts models (Multi-head Latent Attention,
//! DeepSeekMoE routing, FP8 block-quantised weights) from Hugging Face checkpoints.

pub mod backend;
pub mod bench;
pub mod builder;
pub mod chat_template;
pub mod check;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod format;
pub mod hot_path;
pub mod model;
pub mod perplexity;
pub mod plan;
pub mod quant;
pub mod runtime;

pub use error::{Error, Result};
pub mod device;
pub mod engine;
pub mod expert_cache;
pub mod generate;
pub mod generation_config;
pub mod inspect;
pub mod mapped;
pub mod npy;
pub mod sample;
pub mod speculative;
pub mod synth;
pub mod tiktoken;
pub mod tokenizer;
pub mod util;
