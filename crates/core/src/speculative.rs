//! Speculative decoding with the checkpoint's own MTP layer (DeepSeek-V3's layer 61): the MTP
//! layer drafts the next token from the main model's last hidden state (and, chained, `k - 1`
//! more from its own), one main-model step verifies the last token and all drafts together,
//! the longest acceptable prefix is kept and the rejected positions are dropped from both
//! latent caches. Acceptance follows speculative sampling (`Sampler::accept_drafts`), so the
//! output is distributed exactly as plain decoding's; greedy output is token for token the same.

use std::time::Instant;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::Logits;
use crate::sample::{Dist, Sampler};

/// `--speculative`: draft with the MTP layer or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speculative {
    /// Draft with the checkpoint's MTP layer (an error where it has none).
    Mtp,
    Off,
}

crate::util::choices!(Speculative {
    Mtp => "mtp": "draft with the checkpoint's MTP layer (an error where it has none)",
    Off => "off": "decode one token per step",
});

/// Most drafts per verify step (`--draft`).
pub const MAX_DRAFT: usize = 8;

/// Speculative decoding measures plain decoding as it goes: about one verify step in
/// `PLAIN_PROBE_EVERY` drafts nothing, and its time is what a step without speculation costs at
/// the same depth and batch, so "with" and "without" are both measured, neither estimated. A
/// probe forgoes that step's accepted drafts: under 1/16 of the speed-up.
pub const PLAIN_PROBE_EVERY: u64 = 16;

/// Steps a decode rate needs before the stats line shows it: the first plain probe runs right
/// after the prompt, on cold caches, and two such probes once read six times the speed-up.
pub const MIN_RATE_STEPS: u64 = 4;

/// Decode steps, the tokens they emitted and the seconds they took.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct DecodeRate {
    pub steps: u64,
    pub tokens: u64,
    pub seconds: f64,
}

impl DecodeRate {
    pub fn record(&mut self, tokens: usize, seconds: f64) {
        self.steps += 1;
        self.tokens += tokens as u64;
        self.seconds += seconds;
    }

    pub fn tokens_per_second(&self) -> Option<f64> {
        (self.tokens > 0 && self.seconds > 0.0).then(|| self.tokens as f64 / self.seconds)
    }

    fn add(&mut self, other: &DecodeRate) {
        self.steps += other.steps;
        self.tokens += other.tokens;
        self.seconds += other.seconds;
    }
}

/// Counters of speculative decoding.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct SpecStats {
    /// Verify steps (each emits the accepted drafts and one more token).
    pub steps: u64,
    pub drafted: u64,
    pub accepted: u64,
    /// Rounds that drafted: drafting and verifying, and the tokens they emitted (the MTP
    /// layer's catch-up in plain rounds is counted here too: it is a cost of speculating).
    pub speculating: DecodeRate,
    /// Verify steps that drafted nothing (plain probes, a round at the end of a reply): the
    /// main-model step alone, as plain decoding runs it.
    pub plain: DecodeRate,
}

impl SpecStats {
    /// Whether the next round should be a plain probe ([`PLAIN_PROBE_EVERY`]): the first after
    /// one speculative round, then one in every `PLAIN_PROBE_EVERY`.
    pub fn probe_due(&self) -> bool {
        self.speculating.steps > 0 && self.plain.steps * (PLAIN_PROBE_EVERY - 1) < self.speculating.steps
    }

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
        self.speculating.add(&other.speculating);
        self.plain.add(&other.plain);
    }

    /// "MTP draft acceptance 86.4% (1.86 tokens per step, 1 drafted)".
    pub fn summary(&self, draft: usize) -> String {
        format!("MTP draft acceptance {:.1}% ({:.2} tokens per step, {draft} drafted)", 100.0 * self.acceptance(), self.tokens_per_step())
    }

    /// "decode 14.2 tok/s with speculation, 11.0 without (4 plain steps)": both measured, each
    /// over at least [`MIN_RATE_STEPS`] steps ("unmeasured" below).
    pub fn rates(&self) -> String {
        let rate = |r: &DecodeRate| r.tokens_per_second().filter(|_| r.steps >= MIN_RATE_STEPS).map_or("unmeasured".to_string(), |x| format!("{x:.1}"));
        format!("decode {} tok/s with speculation, {} without ({} plain steps)", rate(&self.speculating), rate(&self.plain), self.plain.steps)
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
/// one step and keeps the accepted positions in the caches. `probe`: draft nothing this round
/// and time the step as plain decoding ([`PLAIN_PROBE_EVERY`]).
#[allow(clippy::too_many_arguments)]
pub fn round(engine: &mut dyn Engine, seq: usize, sampler: &mut Sampler, history: &[u32], base: usize, draft: usize, max_new: usize, probe: bool, stats: &mut SpecStats) -> Result<Round> {
    let (len, drafted_from) = (engine.seq_len(seq), engine.mtp_len(seq));
    if history.len() != len + 1 - base || drafted_from < base || drafted_from > len {
        return Err(Error::Invalid(format!("speculative decoding: {} tokens of history from position {base} for a sequence of {len}", history.len())));
    }
    let last = history[history.len() - 1];
    let started = Instant::now();
    // The MTP layer catches up with the positions the last step ran (pairing each with the
    // token after it); its draft is for the token after `last`.
    let next = &history[drafted_from + 1 - base..];
    // Nothing to draft from before the first position has run (an empty cache).
    let (mut draft_logits, k) = match next.is_empty() {
        true => (Vec::new(), 0),
        false => (engine.draft(seq, next)?, if probe { 0 } else { draft }.min(engine.capacity().saturating_sub(len + 1)).min(max_new.saturating_sub(1))),
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
    let verifying = Instant::now();
    let logits = engine.forward_keep(seq, &step, Logits::All)?;
    let vocab = engine.config().vocab_size;
    let rows: Vec<&[f32]> = logits.chunks(vocab).collect();
    let (accepted, token) = sampler.accept_drafts(&drafts, &q, &rows);
    engine.truncate(seq, len + accepted + 1);
    stats.steps += 1;
    stats.drafted += k as u64;
    stats.accepted += accepted as u64;
    if k == 0 {
        stats.plain.record(1, verifying.elapsed().as_secs_f64());
        stats.speculating.seconds += (verifying - started).as_secs_f64();
    } else {
        stats.speculating.record(accepted + 1, started.elapsed().as_secs_f64());
    }
    let mut tokens = drafts[..accepted].to_vec();
    tokens.push(token);
    Ok(Round { tokens, logits: rows[..=accepted].iter().map(|r| r.to_vec()).collect() })
}

/// Greedy speculative decoding of `n` tokens on sequence `seq` (benchmarks, tests): `history`
/// as for [`round`], extended with every token emitted; returns those tokens. No plain probes:
/// `bench` measures plain decoding in its own test.
pub fn greedy(engine: &mut dyn Engine, seq: usize, history: &mut Vec<u32>, base: usize, n: usize, draft: usize, stats: &mut SpecStats) -> Result<Vec<u32>> {
    let mut sampler = Sampler::new(crate::sample::SamplerConfig::default(), engine.config().vocab_size)?;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let round = round(engine, seq, &mut sampler, history, base, draft, n - out.len(), false, stats)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain probes: the second round, then one round in `PLAIN_PROBE_EVERY`.
    #[test]
    fn plain_probes_are_one_round_in_sixteen() {
        let mut stats = SpecStats::default();
        let mut probes = Vec::new();
        for round in 0..64 {
            if stats.probe_due() {
                probes.push(round);
                stats.plain.record(1, 0.01);
            } else {
                stats.speculating.record(2, 0.03);
            }
        }
        assert_eq!(probes, [1, 17, 33, 49]);
        assert_eq!(stats.rates(), "decode 66.7 tok/s with speculation, 100.0 without (4 plain steps)");
        assert_eq!(SpecStats::default().rates(), "decode unmeasured tok/s with speculation, unmeasured without (0 plain steps)");
        // Too few plain steps (two probes, the first of them cold) give no rate.
        let mut few = stats;
        few.plain = DecodeRate { steps: MIN_RATE_STEPS - 1, tokens: 3, seconds: 0.01 };
        assert_eq!(few.rates(), "decode 66.7 tok/s with speculation, unmeasured without (3 plain steps)");
    }
}
