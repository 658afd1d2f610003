//! What generation needs from a backend: run tokens of a sequence through the model at its
//! next positions (appending them to that sequence's latent cache) and hand back logits or the
//! greedy choice; and decode one token of each of several sequences in one step.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::{KvCache, Logits, Model};

/// An engine holds `sequences()` sequences, each with its own latent cache of `capacity()`
/// tokens. It is `Send`: a server thread may own it.
#[allow(clippy::len_without_is_empty)] // `len` is sequence 0's cached tokens, not a container's size
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
        Ok(crate::model::math::argmax(&logits) as u32)
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

    /// Whether the engine drafts with the checkpoint's MTP layer (`draft`).
    fn has_mtp(&self) -> bool {
        false
    }
    /// `forward_seq` that also keeps each row's hidden state for the MTP layer: a prompt (the
    /// MTP layer runs over every chunk but the last as it goes) or a verify step (`Logits::All`
    /// over the last token and the drafts). The MTP layer must hold every earlier position.
    fn forward_keep(&mut self, _seq: usize, _tokens: &[u32], _which: Logits) -> Result<Vec<f32>> {
        Err(no_mtp())
    }
    /// Positions of sequence `seq` the MTP layer holds (drafted from real hidden states).
    fn mtp_len(&self, _seq: usize) -> usize {
        0
    }
    /// The MTP layer over the positions `mtp_len(seq)..seq_len(seq)` of the last
    /// `forward_keep`, position p paired with `next[p - mtp_len]`, the token at p + 1 (the
    /// prompt's or the sequence's tokens, ending with the one sampled last): the draft logits
    /// `[vocab]` for the token after the last. Drops the rows of earlier chained drafts.
    fn draft(&mut self, _seq: usize, _next: &[u32]) -> Result<Vec<f32>> {
        Err(no_mtp())
    }
    /// One more draft position, chained on the last draft of `seq` (whose chosen token is
    /// `token`): its draft logits. Its cache row is dropped by the next `draft`.
    fn draft_chained(&mut self, _seq: usize, _token: u32) -> Result<Vec<f32>> {
        Err(no_mtp())
    }

    /// Most tokens one step runs (a batch's rows together).
    fn max_step_tokens(&self) -> usize {
        usize::MAX
    }
    /// Verify steps of several sequences at once (the server's batches): each sequence's
    /// tokens (its last token and drafts) at its next positions, keeping the hidden states;
    /// every row's logits, sequence after sequence.
    fn verify_batch(&mut self, batch: &[(usize, Vec<u32>)]) -> Result<Vec<f32>> {
        check_batch(&batch.iter().map(|(s, _)| (*s, 0)).collect::<Vec<_>>(), self.sequences())?;
        let mut out = Vec::new();
        for (seq, tokens) in batch {
            out.extend(self.forward_keep(*seq, tokens, Logits::All)?);
        }
        Ok(out)
    }
    /// After `verify_batch` (and truncating each sequence to what it accepted), `draft` for
    /// each of its sequences in the same order: one draft logits row per sequence.
    fn draft_batch(&mut self, batch: &[(usize, Vec<u32>)]) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for (seq, next) in batch {
            out.extend(self.draft(*seq, next)?);
        }
        Ok(out)
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

fn no_mtp() -> Error {
    Error::NoMtp
}

/// Rejects a batch that names a sequence the engine does not hold, or one sequence twice.
pub fn check_batch(batch: &[(usize, u32)], sequences: usize) -> Result<()> {
    if batch.is_empty() {
        return Err(Error::Invalid("an empty batch".into()));
    }
    for (i, &(seq, _)) in batch.iter().enumerate() {
        if seq >= sequences {
            return Err(Error::UnknownSequence { seq, sequences });
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
        return Err(Error::UnknownSequence { seq, sequences });
    }
    Ok(())
}

/// The f32 CPU reference as an engine: one latent cache per sequence, sequences run one after
/// the other (it is the oracle batched GPU steps are tested against).
pub struct CpuEngine {
    pub model: Model,
    pub caches: Vec<KvCache>,
    /// Speculative decoding with the MTP layer (`with_mtp`).
    mtp: Option<CpuMtp>,
}

/// The MTP layer's state on the CPU: a cache per sequence, the last kept main step's hidden
/// states, the last draft's output.
struct CpuMtp {
    caches: Vec<KvCache>,
    chained: Vec<usize>,
    /// Per sequence: (first position, hidden states `[rows, hidden]`) of its last `forward_keep`.
    kept: Vec<Option<(usize, Vec<f32>)>>,
    /// (sequence, output `[hidden]`) of the last draft.
    drafted: Option<(usize, Vec<f32>)>,
}

impl CpuEngine {
    pub fn new(model: Model, capacity: usize) -> Self {
        Self::with_sequences(model, capacity, 1)
    }

    pub fn with_sequences(model: Model, capacity: usize, sequences: usize) -> Self {
        let caches = (0..sequences.max(1)).map(|_| model.new_cache(capacity)).collect();
        CpuEngine { model, caches, mtp: None }
    }

    /// Also drafts with the checkpoint's MTP layer (an error where it has none).
    pub fn with_mtp(mut self) -> Result<Self> {
        let capacity = self.capacity();
        let caches = (0..self.caches.len()).map(|_| self.model.new_mtp_cache(capacity)).collect::<Option<Vec<_>>>();
        let caches = caches.ok_or_else(no_mtp)?;
        self.mtp = Some(CpuMtp { chained: vec![0; caches.len()], kept: vec![None; caches.len()], caches, drafted: None });
        Ok(self)
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
        if let Some(m) = &mut self.mtp {
            if let Some(cache) = m.caches.get_mut(seq) {
                cache.truncate((cache.len() - m.chained[seq]).min(len));
                m.chained[seq] = 0;
            }
        }
    }
    fn has_mtp(&self) -> bool {
        self.mtp.is_some()
    }
    fn forward_keep(&mut self, seq: usize, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        check_sequence(seq, self.caches.len())?;
        let m = self.mtp.as_mut().ok_or_else(no_mtp)?;
        let start = self.caches[seq].len();
        if m.caches[seq].len() - m.chained[seq] != start {
            return Err(Error::Invalid(format!("sequence {seq}: the MTP layer has run {} of its {start} positions; truncate it to a common length first", m.caches[seq].len())));
        }
        let (logits, hidden) = self.model.forward_hidden(&mut self.caches[seq], tokens)?;
        m.kept[seq] = Some((start, hidden));
        m.drafted = None;
        Ok(match which {
            Logits::All => logits,
            Logits::Last => logits[(tokens.len() - 1) * self.model.config.vocab_size..].to_vec(),
        })
    }
    fn mtp_len(&self, seq: usize) -> usize {
        self.mtp.as_ref().and_then(|m| Some(m.caches.get(seq)?.len() - m.chained[seq])).unwrap_or(0)
    }
    fn draft(&mut self, seq: usize, next: &[u32]) -> Result<Vec<f32>> {
        check_sequence(seq, self.caches.len())?;
        let main_len = self.caches[seq].len();
        let m = self.mtp.as_mut().ok_or_else(no_mtp)?;
        let cache = &mut m.caches[seq];
        cache.truncate(cache.len() - m.chained[seq]);
        m.chained[seq] = 0;
        let start = cache.len();
        let d = self.model.config.hidden_size;
        let hidden = match &m.kept[seq] {
            Some((first, h)) if *first == start && main_len <= first + h.len() / d && next.len() == main_len - start && !next.is_empty() => &h[..next.len() * d],
            _ => {
                return Err(Error::Invalid(format!(
                    "sequence {seq}: a draft needs the hidden states of positions {start}..{main_len} from the last main step and one next token for each ({} given)",
                    next.len()
                )))
            }
        };
        let (logits, out) = self.model.mtp_forward(cache, next, hidden)?;
        m.chained[seq] = 0;
        m.kept[seq] = None;
        m.drafted = Some((seq, out[(next.len() - 1) * d..].to_vec()));
        Ok(logits[(next.len() - 1) * self.model.config.vocab_size..].to_vec())
    }
    fn draft_chained(&mut self, seq: usize, token: u32) -> Result<Vec<f32>> {
        check_sequence(seq, self.caches.len())?;
        let m = self.mtp.as_mut().ok_or_else(no_mtp)?;
        let hidden = match m.drafted.take() {
            Some((s, h)) if s == seq => h,
            _ => return Err(Error::Invalid(format!("sequence {seq}: a chained draft follows a draft of the same sequence"))),
        };
        let (logits, out) = self.model.mtp_forward(&mut m.caches[seq], &[token], &hidden)?;
        m.chained[seq] += 1;
        m.drafted = Some((seq, out));
        Ok(logits)
    }
    fn capacity(&self) -> usize {
        self.caches[0].capacity()
    }
    fn device_name(&self) -> String {
        "cpu (f32 reference)".into()
    }
}
