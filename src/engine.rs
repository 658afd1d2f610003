//! What generation needs from a backend: run tokens of a sequence through the model at its
//! next positions (appending them to that sequence's latent cache) and hand back logits or the
//! greedy choice; and decode one token of each of several sequences in one step.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::{KvCache, Logits, Model};

/// An engine holds `sequences()` sequences, each with its own latent cache of `capacity()`
/// tokens. It is `Send`: a server thread may own it.
pub trait Engine: Send {
    fn config(&self) -> &ModelConfig;
    /// Sequences with their own latent cache (`serve --parallel`).
    fn sequences(&self) -> usize {
        1
    }
    /// Runs `tokens` of sequence `seq` at its next positions: `[n, vocab]` logits
    /// (`Logits::All`) or the last position's `[vocab]`.
    fn forward_seq(&mut self, seq: usize, tokens: &[u32], which: Logits) -> Result<Vec<f32>>;
    /// Runs `tokens` of sequence `seq` into its cache without computing logits (a prompt chunk
    /// that is not the last).
    fn prefill_seq(&mut self, seq: usize, tokens: &[u32]) -> Result<()> {
        self.forward_seq(seq, tokens, Logits::Last).map(|_| ())
    }
    /// The argmax of the last position's logits. GPU engines override this to read back only the id.
    fn greedy_seq(&mut self, seq: usize, tokens: &[u32]) -> Result<u32> {
        let logits = self.forward_seq(seq, tokens, Logits::Last)?;
        Ok(crate::backend::cpu::argmax(&logits) as u32)
    }
    /// One token of each of several distinct sequences, `(sequence, token)`, in one step (GPU
    /// engines: one submit, each weight read once for all of them): `[batch, vocab]` logits.
    fn decode_batch(&mut self, batch: &[(usize, u32)]) -> Result<Vec<f32>> {
        check_batch(batch, self.sequences())?;
        let mut out = Vec::with_capacity(batch.len() * self.config().vocab_size);
        for &(seq, token) in batch {
            out.extend(self.forward_seq(seq, &[token], Logits::Last)?);
        }
        Ok(out)
    }
    /// `decode_batch`'s argmax per sequence.
    fn decode_batch_greedy(&mut self, batch: &[(usize, u32)]) -> Result<Vec<u32>> {
        check_batch(batch, self.sequences())?;
        batch.iter().map(|&(seq, token)| self.greedy_seq(seq, &[token])).collect()
    }
    /// Tokens in sequence `seq`'s cache (its next token's position).
    fn seq_len(&self, seq: usize) -> usize;
    /// Forgets sequence `seq`'s positions from `len` on (its cache keeps the first `len`).
    fn truncate(&mut self, seq: usize, len: usize);
    /// Context per sequence.
    fn capacity(&self) -> usize;
    /// What the engine runs on, for stats lines.
    fn device_name(&self) -> String;
    /// Work counters for `--verbose` (dispatches, submits, bytes read back), if the engine keeps any.
    fn counters(&self) -> Option<String> {
        None
    }
    /// Zeroes the work counters (benchmarks report prefill and decode apart).
    fn reset_counters(&mut self) {}
    /// Share of routed-expert lookups the device cache served, when experts are streamed.
    fn expert_cache_hit_rate(&self) -> Option<f64> {
        None
    }

    /// Sequence 0: the single-sequence engine the CLI's generation uses.
    fn forward(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        self.forward_seq(0, tokens, which)
    }
    fn forward_greedy(&mut self, tokens: &[u32]) -> Result<u32> {
        self.greedy_seq(0, tokens)
    }
    fn len(&self) -> usize {
        self.seq_len(0)
    }
    /// Empties every sequence's cache.
    fn reset(&mut self) {
        (0..self.sequences()).for_each(|s| self.truncate(s, 0));
    }
}

/// Rejects a batch that names a sequence the engine does not hold, or one sequence twice.
pub fn check_batch(batch: &[(usize, u32)], sequences: usize) -> Result<()> {
    if batch.is_empty() {
        return Err(Error::Invalid("an empty batch".into()));
    }
    for (i, &(seq, _)) in batch.iter().enumerate() {
        if seq >= sequences {
            return Err(Error::Invalid(format!("sequence {seq} does not exist: the engine holds {sequences}")));
        }
        if batch[..i].iter().any(|&(s, _)| s == seq) {
            return Err(Error::Invalid(format!("sequence {seq} appears twice in one batch")));
        }
    }
    Ok(())
}

/// Rejects a sequence index the engine does not hold.
pub fn check_sequence(seq: usize, sequences: usize) -> Result<()> {
    if seq >= sequences {
        return Err(Error::Invalid(format!("sequence {seq} does not exist: the engine holds {sequences}")));
    }
    Ok(())
}

/// The f32 CPU reference as an engine: one latent cache per sequence, sequences run one after
/// the other (it is the oracle batched GPU steps are tested against).
pub struct CpuEngine {
    pub model: Model,
    pub caches: Vec<KvCache>,
}

impl CpuEngine {
    pub fn new(model: Model, capacity: usize) -> Self {
        Self::with_sequences(model, capacity, 1)
    }

    pub fn with_sequences(model: Model, capacity: usize, sequences: usize) -> Self {
        let caches = (0..sequences.max(1)).map(|_| model.new_cache(capacity)).collect();
        CpuEngine { model, caches }
    }
}

impl Engine for CpuEngine {
    fn config(&self) -> &ModelConfig {
        &self.model.config
    }
    fn sequences(&self) -> usize {
        self.caches.len()
    }
    fn forward_seq(&mut self, seq: usize, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        check_sequence(seq, self.caches.len())?;
        self.model.forward(&mut self.caches[seq], tokens, which)
    }
    fn seq_len(&self, seq: usize) -> usize {
        self.caches.get(seq).map_or(0, KvCache::len)
    }
    fn truncate(&mut self, seq: usize, len: usize) {
        if let Some(cache) = self.caches.get_mut(seq) {
            cache.truncate(len);
        }
    }
    fn capacity(&self) -> usize {
        self.caches[0].capacity()
    }
    fn device_name(&self) -> String {
        "cpu (f32 reference)".into()
    }
}
