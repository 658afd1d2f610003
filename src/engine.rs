//! What generation needs from a backend: run tokens through the model at the next positions
//! (appending them to its latent cache) and hand back logits or the greedy choice.

use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::{KvCache, Logits, Model};


/// An engine is `Send`: a server thread may own it.
pub trait Engine: Send {
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
