//! Speculative decoding with the checkpoint's own MTP layer (DeepSeek-V3's layer 61): the MTP
//! layer drafts the next token from the main model's last hidden state (and, chained, `k - 1`
//! more from its own), one main-model step verifies the last token and all drafts together,
//! the longest acceptable prefix is kept and the rejected positions are dropped from both
//! latent caches. Acceptance follows speculative sampling (`Sampler::accept_drafts`), so the
//! output is distributed exactly as plain decoding's; greedy output is token for token the same.

use std::time::Instant;

use crate::engine::{Engine, Pass, Span, Step, Steps, Want};
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

/// A sequence decoded speculatively, as a round sees it.
pub struct Lane<'a> {
    pub seq: usize,
    /// The token chosen last, not yet run (the round's verify step runs it first).
    pub last: u32,
    pub sampler: &'a mut Sampler,
    /// Most drafts a round verifies (`--draft`); beyond the first they are chained, which only
    /// a round of one lane does (a chained draft follows a draft step of one sequence).
    pub draft: usize,
    /// Tokens the reply may still take after `last`.
    pub max_new: usize,
    /// The next round's first draft and the distribution it was drawn from: drawn by the
    /// catch-up that ends each round (and [`start`]), None where there is no room for one.
    pub pending: &'a mut Option<(u32, Dist)>,
}

/// One lane's result of a round: the tokens to emit in order (the accepted drafts, then the
/// token after them), for each the target's logits it was chosen from, and the drafts.
pub struct Round {
    pub tokens: Vec<u32>,
    pub logits: Vec<Vec<f32>>,
    pub drafted: usize,
    pub accepted: usize,
}

/// A round over several lanes: each lane's result, in order, and the time it took; `plain`:
/// no lane drafted (the verify step alone, `verify_seconds`, is what plain decoding costs).
pub struct Rounds {
    pub lanes: Vec<Round>,
    pub emitted: usize,
    pub seconds: f64,
    pub verify_seconds: f64,
    pub plain: bool,
}

/// After a prompt run with kept hidden states and its first token chosen (`lane.last`): the
/// MTP layer catches up with the prompt's last kept positions, `next` being the tokens after
/// them (ending with `lane.last`), and draws the lane's first draft.
pub fn start(engine: &mut dyn Engine, lane: &mut Lane, next: &[u32]) -> Result<()> {
    catch_up(engine, std::slice::from_mut(lane), &[next])
}

/// The MTP layer over each lane's positions since its last catch-up (one draft step for all),
/// paired with `next` (the tokens after them); each lane with room draws its next first draft.
fn catch_up(engine: &mut dyn Engine, lanes: &mut [Lane], next: &[&[u32]]) -> Result<()> {
    let mut spans = Vec::with_capacity(lanes.len());
    for (lane, tokens) in lanes.iter().zip(next) {
        spans.push(Span { seq: lane.seq, position: engine.mtp_len(lane.seq).ok_or(Error::NoMtp)?, tokens });
    }
    // A draft needs room beside the token before it, and a reply that goes on past both.
    let room: Vec<bool> = lanes.iter().map(|l| engine.seq_len(l.seq) + 2 <= engine.capacity() && l.max_new >= 2).collect();
    let vocab = engine.config().vocab_size;
    let out = engine.step(&Step { pass: Pass::Draft, spans: &spans, want: Want::Logits(Logits::Last) })?;
    for (i, lane) in lanes.iter_mut().enumerate() {
        *lane.pending = room[i].then(|| {
            let dist = lane.sampler.distribution(&out.logits[i * vocab..(i + 1) * vocab], &[]);
            (lane.sampler.draw_from(&dist), dist)
        });
    }
    Ok(())
}

/// One speculative round over `lanes` (distinct sequences whose MTP layer has caught up, as
/// [`start`] and every round leave it): each lane's pending draft (and, in a round of one
/// lane, up to `draft - 1` more chained on it, fewer near the end of the context, of the reply
/// or of the step's rows), one verify step of every lane's last token and drafts, the
/// acceptance rule per lane (`Sampler::accept_drafts`: output distributed as plain decoding's),
/// the rejected positions dropped, then the MTP layer's catch-up drawing the next round's first
/// drafts. `probe`: verify no drafts this round and time it as plain decoding
/// ([`PLAIN_PROBE_EVERY`]).
pub fn round(engine: &mut dyn Engine, lanes: &mut [Lane], probe: bool, stats: &mut SpecStats) -> Result<Rounds> {
    let started = Instant::now();
    let (vocab, capacity) = (engine.config().vocab_size, engine.capacity());
    let mut room = if probe { 0 } else { engine.max_step_rows().saturating_sub(lanes.len()) };
    let chain = lanes.len() == 1;
    let mut steps: Vec<Vec<u32>> = Vec::with_capacity(lanes.len());
    let mut dists: Vec<Vec<Dist>> = Vec::with_capacity(lanes.len());
    for lane in lanes.iter_mut() {
        let len = engine.seq_len(lane.seq);
        if engine.mtp_len(lane.seq) != Some(len) {
            return Err(Error::Invalid(format!("speculative decoding: sequence {}'s MTP layer has not caught up with its {len} positions", lane.seq)));
        }
        let k = lane.draft.min(capacity.saturating_sub(len + 1)).min(lane.max_new.saturating_sub(1)).min(room);
        let mut tokens = vec![lane.last];
        let mut q = Vec::with_capacity(k);
        if let Some((first, dist)) = lane.pending.take().filter(|_| k > 0) {
            tokens.push(first);
            q.push(dist);
            while chain && q.len() < k {
                let logits = engine.draft_chained(lane.seq, len + q.len() - 1, tokens[tokens.len() - 1])?;
                let dist = lane.sampler.distribution(&logits, &tokens[1..]);
                tokens.push(lane.sampler.draw_from(&dist));
                q.push(dist);
            }
        }
        room -= q.len();
        steps.push(tokens);
        dists.push(q);
    }
    let verifying = Instant::now();
    let spans: Vec<Span> = lanes.iter().zip(&steps).map(|(l, t)| Span { seq: l.seq, position: engine.seq_len(l.seq), tokens: t }).collect();
    let logits = engine.step(&Step { pass: Pass::MainKeepingHidden, spans: &spans, want: Want::Logits(Logits::All) })?.logits.to_vec();
    let verify_seconds = verifying.elapsed().as_secs_f64();
    let mut rounds = Vec::with_capacity(lanes.len());
    let mut row = 0;
    for ((lane, tokens), q) in lanes.iter_mut().zip(&steps).zip(&dists) {
        let rows: Vec<&[f32]> = logits[row * vocab..(row + tokens.len()) * vocab].chunks(vocab).collect();
        row += tokens.len();
        let drafts = &tokens[1..];
        let (accepted, token) = lane.sampler.accept_drafts(drafts, q, &rows);
        let len = engine.seq_len(lane.seq);
        engine.truncate(lane.seq, len - tokens.len() + accepted + 1);
        stats.steps += 1;
        stats.drafted += drafts.len() as u64;
        stats.accepted += accepted as u64;
        let mut emitted = drafts[..accepted].to_vec();
        emitted.push(token);
        lane.last = token;
        lane.max_new = lane.max_new.saturating_sub(emitted.len());
        rounds.push(Round { tokens: emitted, logits: rows[..=accepted].iter().map(|r| r.to_vec()).collect(), drafted: drafts.len(), accepted });
    }
    let next: Vec<&[u32]> = rounds.iter().map(|r| &r.tokens[..]).collect();
    catch_up(engine, lanes, &next)?;
    let seconds = started.elapsed().as_secs_f64();
    let emitted = rounds.iter().map(|r| r.tokens.len()).sum();
    let plain = rounds.iter().all(|r| r.drafted == 0);
    // A round without drafts is a plain step (its verify step alone, as plain decoding runs
    // it); the MTP layer's catch-up after it is a cost of speculating.
    if plain {
        stats.plain.record(emitted, verify_seconds);
        stats.speculating.seconds += seconds - verify_seconds;
    } else {
        stats.speculating.record(emitted, seconds);
    }
    Ok(Rounds { lanes: rounds, emitted, seconds, verify_seconds, plain })
}

/// Greedy speculative decoding of `n` tokens on sequence `seq` (benchmarks, tests): `history`
/// holds the sequence's tokens from position `base` on, ending with the token chosen last (not
/// yet run), every earlier position run with kept hidden states; it is extended with every
/// token emitted, which are returned. No plain probes: `bench` measures plain decoding apart.
pub fn greedy(engine: &mut dyn Engine, seq: usize, history: &mut Vec<u32>, base: usize, n: usize, draft: usize, stats: &mut SpecStats) -> Result<Vec<u32>> {
    let mut sampler = Sampler::new(crate::sample::SamplerConfig::default(), engine.config().vocab_size)?;
    let (len, from) = (engine.seq_len(seq), engine.mtp_len(seq).ok_or(Error::NoMtp)?);
    let last = *history.last().ok_or_else(|| Error::Invalid("speculative decoding: no token to continue from".into()))?;
    if history.len() != len + 1 - base || from < base {
        return Err(Error::Invalid(format!("speculative decoding: {} tokens of history from position {base} for a sequence of {len}", history.len())));
    }
    let mut pending = None;
    let mut lane = Lane { seq, last, sampler: &mut sampler, draft, max_new: n, pending: &mut pending };
    if from < len {
        start(engine, &mut lane, &history[from + 1 - base..])?;
    }
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        lane.max_new = n - out.len();
        let mut rounds = round(engine, std::slice::from_mut(&mut lane), false, stats)?;
        let tokens = rounds.lanes.remove(0).tokens;
        history.extend(&tokens);
        out.extend(tokens);
    }
    out.truncate(n);
    Ok(out)
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
