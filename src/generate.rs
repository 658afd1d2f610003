//! The generation loop: prefill the prompt in one pass, then decode token by token, streaming text.

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::Logits;
use crate::sample::Sampler;
use crate::tokenizer::{StreamDecoder, Tokenizer};
use std::time::Instant;

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub prompt_tokens: usize,
    pub prompt_seconds: f64,
    pub generated_tokens: usize,
    pub generate_seconds: f64,
    /// Why generation ended.
    pub stop: StopReason,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    #[default]
    MaxTokens,
    EndOfSequence,
    ContextFull,
}

impl Stats {
    pub fn summary(&self) -> String {
        let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
        format!(
            "prompt {} tok, {:.1} tok/s | generated {} tok, {:.1} tok/s",
            self.prompt_tokens,
            rate(self.prompt_tokens, self.prompt_seconds),
            self.generated_tokens,
            rate(self.generated_tokens, self.generate_seconds),
        )
    }
}

/// One step's next token: the argmax straight from the engine when greedy (only the id comes
/// back from a GPU), else sampled from the last position's logits.
fn next_token(engine: &mut dyn Engine, sampler: &mut Sampler, tokens: &[u32]) -> Result<u32> {
    if sampler.is_greedy() {
        engine.forward_greedy(tokens)
    } else {
        Ok(sampler.sample(&engine.forward(tokens, Logits::Last)?))
    }
}

/// Generates up to `max_new_tokens` after `prompt`, calling `emit` with each piece of text as soon
/// as it is complete. The engine's capacity is the context limit.
pub fn generate(
    engine: &mut dyn Engine,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    sampler: &mut Sampler,
    max_new_tokens: usize,
    mut emit: impl FnMut(&str) -> Result<()>,
) -> Result<Stats> {
    if prompt.is_empty() {
        return Err(Error::Invalid("the prompt is empty and the tokenizer adds no BOS token: give --prompt".into()));
    }
    let room = engine.capacity() - engine.len();
    if prompt.len() > room {
        return Err(Error::Invalid(format!(
            "the prompt is {} tokens, longer than the context of {room} (raise --ctx)",
            prompt.len()
        )));
    }
    let mut stats = Stats { prompt_tokens: prompt.len(), ..Default::default() };
    let mut decoder = StreamDecoder::new(tokenizer);
    if max_new_tokens == 0 {
        return Ok(stats);
    }

    let started = Instant::now();
    let mut next = next_token(engine, sampler, prompt)?;
    stats.prompt_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    loop {
        if tokenizer.is_eos(next) {
            stats.stop = StopReason::EndOfSequence;
            break;
        }
        stats.generated_tokens += 1;
        if let Some(text) = decoder.push(next)? {
            emit(&text)?;
        }
        if stats.generated_tokens == max_new_tokens {
            break;
        }
        if engine.len() == engine.capacity() {
            stats.stop = StopReason::ContextFull;
            break;
        }
        next = next_token(engine, sampler, &[next])?;
    }
    if let Some(text) = decoder.finish()? {
        emit(&text)?;
    }
    stats.generate_seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}
