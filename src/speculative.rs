//! Speculative decoding with the checkpoint's own MTP layer (DeepSeek-V3's layer 61): the MTP
//! layer drafts the next token from the main model's last hidden state (and, chained, `k - 1`
//! more from its own), one main-model step verifies the last token and all drafts together,
//! the longest acceptable prefix is kept and the rejected positions are dropped from both
//! latent caches. Acceptance follows speculative sampling (`Sampler::accept_drafts`), so the
//! output is distributed exactly as plain decoding's; greedy output is token for token the same.

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::Logits;
use crate::sample::{Dist, Sampler};

/// `--speculative`: draft with the MTP layer or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Speculative {
    /// Draft with the checkpoint's MTP layer (an error where it has none).
    Mtp,
    Off,
}

/// Most drafts per verify step (`--draft`).
pub const MAX_DRAFT: usize = 8;

/// Counters of speculative decoding.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct SpecStats {
    /// Verify steps (each emits the accepted drafts and one more token).
    pub steps: u64,
    pub drafted: u64,
    pub accepted: u64,
}

impl SpecStats {
    /// Share of drafted tokens accepted.
    pub fn acceptance(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }

    /// Tokens each verify step emits: the accepted drafts plus the target's own next token.
    pub fn tokens_per_step(&self) -> f64 {
        (self.accepted + self.steps) as f64 / self.steps.max(1) as f64
    }

    pub fn add(&mut self, other: &SpecStats) {
        self.steps += other.steps;
        self.drafted += other.drafted;
        self.accepted += other.accepted;
    }

    /// "draft acceptance 86.4% (1.86 tokens per step, 1 drafted)".
    pub fn summary(&self, draft: usize) -> String {
        format!("MTP draft acceptance {:.1}% ({:.2} tokens per step, {draft} drafted)", 100.0 * self.acceptance(), self.tokens_per_step())
    }
}

/// One round's result: the tokens to emit in order (the accepted drafts, then the token
/// after them) and, for each, the target's logits it was chosen from.
pub struct Round {
    pub tokens: Vec<u32>,
    pub logits: Vec<Vec<f32>>,
}

/// One speculative round on sequence `seq`. `history` holds the sequence's tokens from
/// position `base` on, ending with the token chosen last (not yet run through the model);
/// every earlier position has been run with `forward_keep`. Drafts up to `draft` tokens
/// (fewer near the end of the context or of `max_new` tokens still wanted), verifies them with
/// one step and keeps the accepted positions in the caches.
pub fn round(engine: &mut dyn Engine, seq: usize, sampler: &mut Sampler, history: &[u32], base: usize, draft: usize, max_new: usize, stats: &mut SpecStats) -> Result<Round> {
    let (len, drafted_from) = (engine.seq_len(seq), engine.mtp_len(seq));
    if history.len() != len + 1 - base || drafted_from < base || drafted_from > len {
        return Err(Error::Invalid(format!("speculative decoding: {} tokens of history from position {base} for a sequence of {len}", history.len())));
    }
    let last = history[history.len() - 1];
    // The MTP layer catches up with the positions the last step ran (pairing each with the
    // token after it); its draft is for the token after `last`.
    let next = &history[drafted_from + 1 - base..];
    // Nothing to draft from before the first position has run (an empty cache).
    let (mut draft_logits, k) = match next.is_empty() {
        true => (Vec::new(), 0),
        false => (engine.draft(seq, next)?, draft.min(engine.capacity().saturating_sub(len + 1)).min(max_new.saturating_sub(1))),
    };
    let mut drafts = Vec::with_capacity(k);
    let mut q = Vec::with_capacity(k);
    for j in 0..k {
        if j > 0 {
            draft_logits = engine.draft_chained(seq, drafts[j - 1])?;
        }
        let dist: Dist = sampler.distribution(&draft_logits, &drafts);
        drafts.push(sampler.draw_from(&dist));
        q.push(dist);
    }
    let mut step = Vec::with_capacity(k + 1);
    step.push(last);
    step.extend_from_slice(&drafts);
    let logits = engine.forward_keep(seq, &step, Logits::All)?;
    let vocab = engine.config().vocab_size;
    let rows: Vec<&[f32]> = logits.chunks(vocab).collect();
    let (accepted, token) = sampler.accept_drafts(&drafts, &q, &rows);
    engine.truncate(seq, len + accepted + 1);
    stats.steps += 1;
    stats.drafted += k as u64;
    stats.accepted += accepted as u64;
    let mut tokens = drafts[..accepted].to_vec();
    tokens.push(token);
    Ok(Round { tokens, logits: rows[..=accepted].iter().map(|r| r.to_vec()).collect() })
}

/// Greedy speculative decoding of `n` tokens on sequence `seq` (benchmarks, tests): `history`
/// as for [`round`], extended with every token emitted; returns those tokens.
pub fn greedy(engine: &mut dyn Engine, seq: usize, history: &mut Vec<u32>, base: usize, n: usize, draft: usize, stats: &mut SpecStats) -> Result<Vec<u32>> {
    let mut sampler = Sampler::new(crate::sample::SamplerConfig::default(), engine.config().vocab_size)?;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let round = round(engine, seq, &mut sampler, history, base, draft, n - out.len(), stats)?;
        history.extend(&round.tokens);
        out.extend(round.tokens);
    }
    Ok(out)
}

/// Leaves sequence `seq` as plain decoding would after a reply that ended: the cache holds
/// `history` but its last token (accepted drafts past an end are dropped), and the MTP layer
/// has caught up with every cached position, so the sequence can go on (a chat's next turn).
pub fn finish(engine: &mut dyn Engine, seq: usize, history: &[u32], base: usize) -> Result<()> {
    let len = base + history.len() - 1;
    engine.truncate(seq, len);
    let drafted_from = engine.mtp_len(seq);
    if drafted_from < len && drafted_from >= base {
        engine.draft(seq, &history[drafted_from + 1 - base..])?;
    }
    Ok(())
}
