//! What generation, serving and benchmarks run on. An engine holds sequences, each with its own
//! latent cache, and has one primitive, [`Engine::step`]: a batch of rows (sequence, position,
//! token), given as [`Span`]s of consecutive positions of one sequence, through the main model
//! or its MTP layer ([`Pass`]), with a statement of what comes back ([`Want`]: logits or ids, of
//! every row or of each span's last). Prefill chunks, batched decode and speculative decoding's
//! verify and draft steps are ways of building that batch ([`Steps`], `speculative`).

mod cpu;
mod mtp;

pub use cpu::CpuEngine;
pub(crate) use mtp::{DraftSource, MtpState};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::{check_request, Logits};

/// Rows of one sequence: `tokens[i]` at position `position + i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span<'a> {
    pub seq: usize,
    pub position: usize,
    pub tokens: &'a [u32],
}

/// The program a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// The main model: each span starts at its sequence's length and is appended to its cache.
    Main,
    /// The main model, keeping each row's hidden state for the MTP layer (a prompt under
    /// speculative decoding, a verify step). Each sequence's MTP layer must have caught up with
    /// its cache first (`mtp_len == seq_len`): the hidden states of earlier steps are gone.
    MainKeepingHidden,
    /// The MTP layer. A span from `mtp_len(seq)` to `seq_len(seq)` catches up with the last
    /// kept step: the row at position p pairs the hidden state kept at p with its token, the
    /// token at p + 1. A span of one token at the position after the last draft of a step of
    /// one sequence chains on that draft's output (a second draft before verifying).
    Draft,
}

/// What a step hands back: nothing, logits (`[rows, vocab]`) or the argmax id of each row;
/// `Logits::Last` is each span's last row, `Logits::All` every row, in the step's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Nothing,
    Logits(Logits),
    Ids(Logits),
}

/// One step: `spans` through `pass`, `want` back.
#[derive(Debug, Clone, Copy)]
pub struct Step<'a> {
    pub pass: Pass,
    pub spans: &'a [Span<'a>],
    pub want: Want,
}

/// What a step handed back, borrowed from the engine until its next call: the logits or the
/// ids `Want` asked for (the other is empty).
#[derive(Debug, Clone, Copy)]
pub struct Output<'a> {
    pub logits: &'a [f32],
    pub ids: &'a [u32],
}

/// An engine holds `sequences()` sequences, each with its own latent cache of `capacity()`
/// tokens. It is `Send`: a server thread may own it. What a backend must provide is these
/// seven required methods; everything else is built on `step` ([`Steps`]).
pub trait Engine: Send {
    fn config(&self) -> &ModelConfig;
    /// Sequences with their own latent cache (`serve --parallel`).
    fn sequences(&self) -> usize;
    /// Context per sequence.
    fn capacity(&self) -> usize;
    /// Tokens in sequence `seq`'s cache (its next token's position).
    fn seq_len(&self, seq: usize) -> usize;
    /// Forgets sequence `seq`'s positions from `len` on, in its cache and its MTP layer's.
    fn truncate(&mut self, seq: usize, len: usize);
    /// Runs one step (checked with [`check_step`]). A step of one span may be longer than
    /// `max_step_rows` (a prompt: the engine runs it in chunks); a step of several may not.
    fn step(&mut self, step: &Step) -> Result<Output<'_>>;
    /// What the engine runs on, for stats lines.
    fn device_name(&self) -> String;

    /// Most rows a step of several spans may hold.
    fn max_step_rows(&self) -> usize {
        usize::MAX
    }
    /// Positions of sequence `seq` the MTP layer holds (drafted from real hidden states), or
    /// None where the engine drafts with no MTP layer.
    fn mtp_len(&self, _seq: usize) -> Option<usize> {
        None
    }
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
}

/// A boxed engine is an engine (a distributed engine wraps whichever rank 0 opened).
impl<E: Engine + ?Sized> Engine for Box<E> {
    fn config(&self) -> &ModelConfig {
        (**self).config()
    }
    fn sequences(&self) -> usize {
        (**self).sequences()
    }
    fn capacity(&self) -> usize {
        (**self).capacity()
    }
    fn seq_len(&self, seq: usize) -> usize {
        (**self).seq_len(seq)
    }
    fn truncate(&mut self, seq: usize, len: usize) {
        (**self).truncate(seq, len)
    }
    fn step(&mut self, step: &Step) -> Result<Output<'_>> {
        (**self).step(step)
    }
    fn device_name(&self) -> String {
        (**self).device_name()
    }
    fn max_step_rows(&self) -> usize {
        (**self).max_step_rows()
    }
    fn mtp_len(&self, seq: usize) -> Option<usize> {
        (**self).mtp_len(seq)
    }
    fn counters(&self) -> Option<String> {
        (**self).counters()
    }
    fn reset_counters(&mut self) {
        (**self).reset_counters()
    }
    fn expert_cache_hit_rate(&self) -> Option<f64> {
        (**self).expert_cache_hit_rate()
    }
}

/// The steps callers build most, over any engine.
#[allow(clippy::len_without_is_empty)] // `len` is sequence 0's cached tokens, not a container's size
pub trait Steps: Engine {
    /// Runs `tokens` of sequence `seq` at its next positions: `[n, vocab]` logits
    /// (`Logits::All`) or the last position's `[vocab]`.
    fn forward_seq(&mut self, seq: usize, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        let position = self.seq_len(seq);
        let spans = [Span { seq, position, tokens }];
        Ok(self.step(&Step { pass: Pass::Main, spans: &spans, want: Want::Logits(which) })?.logits.to_vec())
    }
    /// Runs `tokens` of sequence `seq` into its cache without computing logits (a prompt chunk
    /// that is not the last).
    fn prefill_seq(&mut self, seq: usize, tokens: &[u32]) -> Result<()> {
        let position = self.seq_len(seq);
        self.step(&Step { pass: Pass::Main, spans: &[Span { seq, position, tokens }], want: Want::Nothing }).map(|_| ())
    }
    /// The argmax of the last position's logits (a GPU reads back only the id).
    fn greedy_seq(&mut self, seq: usize, tokens: &[u32]) -> Result<u32> {
        let position = self.seq_len(seq);
        let spans = [Span { seq, position, tokens }];
        let out = self.step(&Step { pass: Pass::Main, spans: &spans, want: Want::Ids(Logits::Last) })?;
        out.ids.first().copied().ok_or_else(|| Error::Invalid("a greedy step returned no id".into()))
    }
    /// One token of each of several distinct sequences, `(sequence, token)`, as one step (on a
    /// GPU each weight is read once for all of them): `[batch, vocab]` logits.
    fn decode_batch(&mut self, batch: &[(usize, u32)]) -> Result<Vec<f32>> {
        let spans = decode_spans(self, batch);
        Ok(self.step(&Step { pass: Pass::Main, spans: &spans, want: Want::Logits(Logits::All) })?.logits.to_vec())
    }
    /// `decode_batch`'s argmax per sequence.
    fn decode_batch_greedy(&mut self, batch: &[(usize, u32)]) -> Result<Vec<u32>> {
        let spans = decode_spans(self, batch);
        Ok(self.step(&Step { pass: Pass::Main, spans: &spans, want: Want::Ids(Logits::All) })?.ids.to_vec())
    }
    /// `forward_seq` that also keeps each row's hidden state for the MTP layer
    /// ([`Pass::MainKeepingHidden`]).
    fn forward_keep(&mut self, seq: usize, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        let position = self.seq_len(seq);
        let spans = [Span { seq, position, tokens }];
        Ok(self.step(&Step { pass: Pass::MainKeepingHidden, spans: &spans, want: Want::Logits(which) })?.logits.to_vec())
    }
    /// The MTP layer catching up with sequence `seq`'s last kept step, position p paired with
    /// `next[p - mtp_len]`, the token at p + 1 (ending with the one sampled last): the draft
    /// logits `[vocab]` for the token after the last.
    fn draft(&mut self, seq: usize, next: &[u32]) -> Result<Vec<f32>> {
        let position = self.mtp_len(seq).ok_or(Error::NoMtp)?;
        let spans = [Span { seq, position, tokens: next }];
        Ok(self.step(&Step { pass: Pass::Draft, spans: &spans, want: Want::Logits(Logits::Last) })?.logits.to_vec())
    }
    /// One more draft chained on the last draft of `seq` (`position`: the one after it, whose
    /// token is that draft's choice `token`): its draft logits.
    fn draft_chained(&mut self, seq: usize, position: usize, token: u32) -> Result<Vec<f32>> {
        let spans = [Span { seq, position, tokens: &[token] }];
        Ok(self.step(&Step { pass: Pass::Draft, spans: &spans, want: Want::Logits(Logits::Last) })?.logits.to_vec())
    }
    /// Whether the engine drafts with the checkpoint's MTP layer.
    fn has_mtp(&self) -> bool {
        self.mtp_len(0).is_some()
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

impl<E: Engine + ?Sized> Steps for E {}

/// A decode step's spans: each sequence's token at its next position.
fn decode_spans<'a, E: Engine + ?Sized>(engine: &E, batch: &'a [(usize, u32)]) -> Vec<Span<'a>> {
    batch.iter().map(|(seq, token)| Span { seq: *seq, position: engine.seq_len(*seq), tokens: std::slice::from_ref(token) }).collect()
}

/// Rejects a step an engine cannot run, whatever its backend: no spans, an empty span, a
/// sequence it does not hold or twice in one step, several spans beyond `max_rows`; for the
/// main model, a span not at its sequence's length, beyond the context or with a token outside
/// the vocabulary (the MTP layer's spans are checked by `MtpState::draft_sources`).
pub fn check_step(step: &Step, config: &ModelConfig, sequences: usize, capacity: usize, max_rows: usize, seq_len: impl Fn(usize) -> usize) -> Result<()> {
    if step.spans.is_empty() {
        return Err(Error::Invalid("a step with no rows".into()));
    }
    let rows: usize = step.spans.iter().map(|s| s.tokens.len()).sum();
    if step.spans.len() > 1 && rows > max_rows {
        return Err(Error::Invalid(format!("a step of {rows} rows over {} sequences: at most {max_rows} per step", step.spans.len())));
    }
    for (i, span) in step.spans.iter().enumerate() {
        if span.seq >= sequences {
            return Err(Error::UnknownSequence { seq: span.seq, sequences });
        }
        if step.spans[..i].iter().any(|s| s.seq == span.seq) {
            return Err(Error::Invalid(format!("sequence {} appears twice in one step", span.seq)));
        }
        let len = seq_len(span.seq);
        if step.pass != Pass::Draft && span.position != len {
            return Err(Error::Invalid(format!("sequence {}: a step at position {} of a sequence of {len} (truncate it first)", span.seq, span.position)));
        }
        check_request(config, span.position, capacity, span.tokens)?;
    }
    Ok(())
}

/// Rows of each span a step wants back, as (first row, rows) in the step's row order.
pub(crate) fn wanted_rows<'s>(spans: &'s [Span<'s>], which: Logits) -> impl Iterator<Item = (usize, usize)> + 's {
    spans.iter().scan(0, move |row, span| {
        let first = *row;
        *row += span.tokens.len();
        Some(match which {
            Logits::All => (first, span.tokens.len()),
            Logits::Last => (first + span.tokens.len() - 1, 1),
        })
    })
}
