//! Generating a reply: one sequence's state from its first token to its stop (sampling, the
//! stream decoder, stop strings matched across token boundaries and never emitted, EOS,
//! the token limit, log-probabilities), and the CLI's loop that drives it on an engine.

use crate::engine::{Engine, Steps};
use crate::error::{Error, Result};
use crate::model::Logits;
use crate::sample::{logprobs, Sampler, TokenLogprob};
use crate::speculative::{self, Lane, SpecStats};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use std::collections::VecDeque;
use std::time::Instant;

/// Why generation ended.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub enum StopReason {
    #[default]
    MaxTokens,
    EndOfSequence,
    /// The stop string that matched.
    StopString(String),
    ContextFull,
    /// The client went away (server) or the user interrupted (chat).
    Cancelled,
}

impl StopReason {
    /// OpenAI's `finish_reason`.
    pub fn finish_reason(&self) -> &'static str {
        match self {
            StopReason::MaxTokens | StopReason::ContextFull => "length",
            StopReason::EndOfSequence | StopReason::StopString(_) => "stop",
            StopReason::Cancelled => "cancelled",
        }
    }

    /// "stopped at end of sequence after 43 tokens".
    pub fn describe(&self, generated: usize, capacity: usize) -> String {
        match self {
            StopReason::MaxTokens => format!("stopped at the limit of {generated} tokens"),
            StopReason::EndOfSequence => format!("stopped at end of sequence after {generated} tokens"),
            StopReason::StopString(s) => format!("stopped at stop string {s:?} after {generated} tokens"),
            StopReason::ContextFull => format!("stopped at the context limit of {capacity} tokens after {generated} tokens (raise --ctx)"),
            StopReason::Cancelled => format!("cancelled after {generated} tokens"),
        }
    }
}

/// When a reply ends, besides the model's own choice.
#[derive(Debug, Clone, Default)]
pub struct Stopping {
    pub max_tokens: usize,
    /// Text that ends the reply (not included in it).
    pub stop: Vec<String>,
    /// Keep going past EOS tokens (benchmarks, tests).
    pub ignore_eos: bool,
    /// Report each token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
}

/// Holds back text that may be the start of a stop string until it is known not to be.
#[derive(Debug, Default, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> StopMatcher {
        StopMatcher { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), held: String::new() }
    }

    /// Adds `text`; returns what can be emitted and the stop string if one is now complete
    /// (the text before it is emitted, the rest dropped).
    pub fn push(&mut self, text: &str) -> (String, Option<String>) {
        self.held.push_str(text);
        let first = self.stops.iter().filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s))).min_by_key(|(at, _)| *at);
        if let Some((at, stop)) = first {
            let out = self.held[..at].to_string();
            let stop = stop.clone();
            self.held.clear();
            return (out, Some(stop));
        }
        // The longest tail of what is held that some stop string starts with stays held.
        let keep = self.held.char_indices().map(|(i, _)| i).find(|&i| self.stops.iter().any(|s| s.starts_with(&self.held[i..]))).unwrap_or(self.held.len());
        let out = self.held[..keep].to_string();
        self.held.drain(..keep);
        (out, None)
    }

    /// What is still held when the reply ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// What one token adds to a reply.
#[derive(Debug, Default, Clone)]
pub struct Emitted {
    pub text: String,
    /// The token's log-probability, when asked for (an EOS that ends the reply has one too).
    pub logprob: Option<TokenLogprob>,
}

/// One reply being generated.
pub struct Generation {
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopMatcher,
    stopping: Stopping,
    pub generated: usize,
    pub stop: Option<StopReason>,
}

impl Generation {
    pub fn new(prompt: &[u32], mut sampler: Sampler, stopping: Stopping) -> Generation {
        sampler.start(prompt);
        Generation { sampler, decoder: StreamDecoder::after(prompt), stops: StopMatcher::new(&stopping.stop), stopping, generated: 0, stop: None }
    }

    /// Whether choosing the next token needs the logits on the host (else the engine's
    /// argmax is the choice).
    pub fn wants_logits(&self) -> bool {
        !self.sampler.is_plain_greedy() || self.stopping.logprobs.is_some()
    }

    pub fn done(&self) -> bool {
        self.stop.is_some()
    }

    /// Tokens the reply may still take.
    pub fn remaining(&self) -> usize {
        self.stopping.max_tokens.saturating_sub(self.generated)
    }

    /// The sampler, for speculative rounds (drafts and their acceptance).
    pub fn sampler(&mut self) -> &mut Sampler {
        &mut self.sampler
    }

    /// The next token from the last position's logits.
    pub fn choose(&mut self, logits: &[f32]) -> u32 {
        self.sampler.sample(logits)
    }

    /// Takes the chosen token (`logits`: what it was chosen from, for its log-probability).
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32, logits: Option<&[f32]>) -> Result<Emitted> {
        // `max_tokens` 0 only scores the prompt: the reply ends before its first token.
        if self.stopping.max_tokens == 0 {
            self.stop = Some(StopReason::MaxTokens);
            return Ok(Emitted::default());
        }
        let logprob = match (self.stopping.logprobs, logits) {
            (Some(n), Some(l)) => Some(logprobs(l, token, n)),
            _ => None,
        };
        if tokenizer.is_eos(token) && !self.stopping.ignore_eos {
            // The EOS is not part of the reply's text, but it is the token chosen: its
            // log-probability is reported (lm-evaluation-harness drops the last one it gets).
            self.stop = Some(StopReason::EndOfSequence);
            return Ok(Emitted { text: String::new(), logprob });
        }
        self.generated += 1;
        self.sampler.accept(token);
        let piece = self.decoder.push(tokenizer, token)?.unwrap_or_default();
        let (text, stopped) = self.stops.push(&piece);
        if let Some(stop) = stopped {
            self.stop = Some(StopReason::StopString(stop));
        } else if self.generated >= self.stopping.max_tokens {
            self.stop = Some(StopReason::MaxTokens);
        }
        Ok(Emitted { text, logprob })
    }

    /// Ends the reply for `reason` unless it has ended already; returns the text still held.
    pub fn finish(&mut self, tokenizer: &Tokenizer, reason: StopReason) -> Result<String> {
        if matches!(self.stop, Some(StopReason::StopString(_))) {
            return Ok(String::new());
        }
        self.stop.get_or_insert(reason);
        let tail = self.decoder.finish(tokenizer)?.unwrap_or_default();
        let (mut text, stopped) = self.stops.push(&tail);
        if let Some(stop) = stopped {
            self.stop = Some(StopReason::StopString(stop));
        } else {
            text += &self.stops.finish();
        }
        Ok(text)
    }
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub prompt_tokens: usize,
    pub prompt_seconds: f64,
    pub generated_tokens: usize,
    pub generate_seconds: f64,
    /// Why generation ended.
    pub stop: StopReason,
    /// Speculative decoding's counters and draft length, when it ran.
    pub speculative: Option<(SpecStats, usize)>,
}

impl Stats {
    pub fn summary(&self) -> String {
        let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
        let mut line = format!(
            "prompt {} tok, {:.1} tok/s | generated {} tok, {:.1} tok/s",
            self.prompt_tokens,
            rate(self.prompt_tokens, self.prompt_seconds),
            self.generated_tokens,
            rate(self.generated_tokens, self.generate_seconds),
        );
        if let Some((spec, draft)) = &self.speculative {
            line += &format!(" | {} | {}", spec.summary(*draft), spec.rates());
        }
        line
    }
}

/// One step's next token: the argmax straight from the engine when nothing else is needed
/// (only the id comes back from a GPU), else chosen from the last position's logits.
fn next_token(engine: &mut dyn Engine, generation: &mut Generation, tokens: &[u32]) -> Result<(u32, Option<Vec<f32>>)> {
    if generation.wants_logits() {
        let logits = engine.forward(tokens, Logits::Last)?;
        Ok((generation.choose(&logits), Some(logits)))
    } else {
        Ok((engine.forward_greedy(tokens)?, None))
    }
}

/// Generates a reply to `prompt` on sequence 0 of `engine`, calling `emit` with each piece of
/// text as soon as it is complete; `cancelled` is polled between tokens. The engine's
/// capacity is the context limit. `draft` > 0: speculative decoding with the engine's MTP
/// layer, `draft` tokens per step (ignored where the engine has none loaded).
#[allow(clippy::too_many_arguments)]
pub fn generate(
    engine: &mut dyn Engine,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    sampler: Sampler,
    stopping: Stopping,
    draft: usize,
    mut emit: impl FnMut(&str) -> Result<()>,
    cancelled: &dyn Fn() -> bool,
) -> Result<Stats> {
    if prompt.is_empty() {
        return Err(Error::Invalid("the prompt is empty and the tokenizer adds no BOS token: give --prompt".into()));
    }
    let room = engine.capacity() - engine.len();
    if prompt.len() > room {
        return Err(Error::Invalid(format!("the prompt is {} tokens, longer than the context of {room} (raise --ctx)", prompt.len())));
    }
    let mut stats = Stats { prompt_tokens: prompt.len(), ..Default::default() };
    if stopping.max_tokens == 0 {
        return Ok(stats);
    }
    let mut generation = Generation::new(prompt, sampler, stopping);
    let speculate = draft > 0 && engine.has_mtp();
    let base = engine.len();

    let started = Instant::now();
    // Speculation: the next round's first draft, drawn as the MTP layer catches up.
    let mut pending = None;
    let (mut next, mut logits) = if speculate {
        let logits = engine.forward_keep(0, prompt, Logits::Last)?;
        let first = generation.choose(&logits);
        // The MTP layer catches up with the prompt's last chunk, paired with the tokens after
        // each position (the last with the first token).
        let from = engine.mtp_len(0).ok_or(Error::NoMtp)?;
        let mut after = prompt[from + 1 - base..].to_vec();
        after.push(first);
        let max_new = generation.remaining().saturating_sub(1);
        speculative::start(engine, &mut Lane { seq: 0, last: first, sampler: generation.sampler(), draft, max_new, pending: &mut pending }, &after)?;
        (first, Some(logits))
    } else {
        next_token(engine, &mut generation, prompt)?
    };
    stats.prompt_seconds = started.elapsed().as_secs_f64();

    // The tokens a round accepted beyond the first, waiting their turn.
    let mut queued: VecDeque<(u32, Vec<f32>)> = VecDeque::new();
    let mut spec = SpecStats::default();
    let started = Instant::now();
    let mut reason = StopReason::MaxTokens;
    // Tokens chosen: the cache holds all but the last.
    let mut chosen = 0;
    loop {
        let emitted = generation.push(tokenizer, next, logits.as_deref())?;
        chosen += 1;
        emit(&emitted.text)?;
        if generation.done() {
            break;
        }
        if cancelled() {
            reason = StopReason::Cancelled;
            break;
        }
        if speculate {
            if queued.is_empty() {
                if engine.len() == engine.capacity() {
                    reason = StopReason::ContextFull;
                    break;
                }
                let probe = spec.probe_due();
                let max_new = generation.remaining();
                let mut lane = Lane { seq: 0, last: next, sampler: generation.sampler(), draft, max_new, pending: &mut pending };
                let round = speculative::round(engine, std::slice::from_mut(&mut lane), probe, &mut spec)?.lanes.remove(0);
                queued.extend(round.tokens.into_iter().zip(round.logits));
            }
            // A round's accepted drafts already sit in the cache; its last token is run by the
            // next round.
            let (token, row) = queued.pop_front().expect("a round emits at least one token");
            (next, logits) = (token, Some(row));
            continue;
        }
        if engine.len() == engine.capacity() {
            reason = StopReason::ContextFull;
            break;
        }
        (next, logits) = next_token(engine, &mut generation, &[next])?;
    }
    if speculate {
        // Leave the sequence as plain decoding would: the cache holds every token emitted but
        // the last (accepted drafts past the end are dropped); the MTP layer has kept up.
        engine.truncate(0, base + prompt.len() + chosen - 1);
    }
    let tail = generation.finish(tokenizer, reason)?;
    emit(&tail)?;
    stats.generated_tokens = generation.generated;
    stats.generate_seconds = started.elapsed().as_secs_f64();
    stats.stop = generation.stop.unwrap_or_default();
    stats.speculative = speculate.then_some((spec, draft));
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<String>) {
        let mut m = StopMatcher::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let mut out = String::new();
        for p in pieces {
            let (text, stop) = m.push(p);
            out += &text;
            if stop.is_some() {
                return (out, stop);
            }
        }
        out += &m.finish();
        (out, None)
    }

    #[test]
    fn stop_strings_match_across_pieces_and_are_never_emitted() {
        assert_eq!(run(&["END"], &["abc E", "N", "D more"]), ("abc ".into(), Some("END".into())));
        assert_eq!(run(&["\n\n"], &["a\n", "\nb"]), ("a".into(), Some("\n\n".into())));
        // A false start is released once it cannot match.
        assert_eq!(run(&["END"], &["EN", "x"]), ("ENx".into(), None));
        // Held text comes out at the end when nothing matched.
        assert_eq!(run(&["END"], &["fin E"]), ("fin E".into(), None));
        // The earliest of several matches wins; multi-byte text is cut on character boundaries.
        assert_eq!(run(&["二", "b"], &["a世b二"]), ("a世".into(), Some("b".into())));
        assert_eq!(run(&[], &["x", "y"]), ("xy".into(), None));
    }
}
