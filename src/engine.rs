//! What generation needs from a backend: run tokens through the model at the next positions
//! (appending them to its latent cache) and hand back logits or the greedy choice.

use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::{KvCache, Logits, Model};


pub trait Engine {
    fn config(&self) -> &ModelConfig;
    /// `[n, vocab]` logits (`Logits::All`) or the last position's `[vocab]`.
    fn forward(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<f32>>;
    /// The argmax of the last position's logits. GPU engines override this to read back only the id.
    fn forward_greedy(&mut self, tokens: &[u32]) -> Result<u32> {
        let logits = self.forward(tokens, Logits::Last)?;
        Ok(crate::backend::cpu::argmax(&logits) as u32)
    }
    /// Tokens in the cache (the next token's position).
    fn len(&self) -> usize;
    fn capacity(&self) -> usize;
    fn reset(&mut self);
    /// What the engine runs on, for stats lines.
    fn device_name(&self) -> String;
    /// Work counters for `--verbose` (dispatches, submits, bytes read back), if the engine keeps any.
    fn counters(&self) -> Option<String> {
        None
    }
    /// Zeroes the work counters (benchmarks report prefill and decode apart).
    fn reset_counters(&mut self) {}
}

/// The f32 CPU reference as an engine.
pub struct CpuEngine {
    pub model: Model,
    pub cache: KvCache,
}

impl CpuEngine {
    pub fn new(model: Model, capacity: usize) -> Self {
        let cache = model.new_cache(capacity);
        CpuEngine { model, cache }
    }
}

impl Engine for CpuEngine {
    fn config(&self) -> &ModelConfig {
        &self.model.config
    }
    fn forward(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        self.model.forward(&mut self.cache, tokens, which)
    }
    fn len(&self) -> usize {
        self.cache.len()
    }
    fn capacity(&self) -> usize {
        self.cache.capacity()
    }
    fn reset(&mut self) {
        self.cache.clear()
    }
    fn device_name(&self) -> String {
        "cpu (f32 reference)".into()
    }
}

/// Runs `tokens` through a GPU engine's `step` in chunks of at most `max_chunk`: every chunk
/// computes logits when all are wanted, otherwise only the last chunk computes its last row.
/// Returns the concatenated read-back bytes.
pub fn run_in_chunks(
    tokens: &[u32],
    max_chunk: usize,
    which: Logits,
    mut step: impl FnMut(&[u32], Option<Logits>) -> Result<Vec<u8>>,
) -> Result<Vec<u8>> {
    let chunks: Vec<&[u32]> = tokens.chunks(max_chunk).collect();
    let mut out = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let head = match which {
            Logits::All => Some(Logits::All),
            Logits::Last if i + 1 == chunks.len() => Some(Logits::Last),
            Logits::Last => None,
        };
        out.extend(step(chunk, head)?);
    }
    Ok(out)
}
