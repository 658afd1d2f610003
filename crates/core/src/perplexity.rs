//! `dsrun perplexity`: perplexity and bits per byte of a text, by llama-perplexity's rule so the
//! same file gives comparable figures in both: the text's tokens (BOS first where the model
//! expects one) cut into windows of the context length `n`, each run from an empty cache with
//! BOS in place of its first token (where the model expects one), and the logits of positions
//! `n/2 ..= n-2` scored against the tokens after them (`n - 1 - n/2` per window: every scored
//! token sees at least half a window).

use crate::engine::{Engine, Steps};
use crate::error::{Error, Result};
use crate::model::Logits;
use crate::tokenizer::Tokenizer;

/// Negative log-likelihood totals over the scored tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Score {
    /// Sum of -ln p(token) over the scored tokens, in nats.
    pub nll: f64,
    /// Sum of the squares (for the standard error).
    pub nll_squares: f64,
    pub tokens: usize,
    /// UTF-8 bytes of the scored tokens' text.
    pub bytes: usize,
    pub windows: usize,
}

impl Score {
    pub fn perplexity(&self) -> f64 {
        (self.nll / self.tokens.max(1) as f64).exp()
    }

    /// The standard error of the perplexity (from the per-token NLL's spread, as llama-perplexity).
    pub fn perplexity_error(&self) -> f64 {
        let n = self.tokens.max(1) as f64;
        let mean = self.nll / n;
        let variance = (self.nll_squares / n - mean * mean).max(0.0);
        self.perplexity() * (variance / (n - 1.0).max(1.0)).sqrt()
    }

    pub fn bits_per_byte(&self) -> f64 {
        self.nll / std::f64::consts::LN_2 / self.bytes.max(1) as f64
    }
}

/// Windows of `window` tokens over `tokens` (a last short one is dropped unless it is the only one).
pub fn windows(tokens: &[u32], window: usize) -> Vec<&[u32]> {
    let full: Vec<&[u32]> = tokens.chunks_exact(window).collect();
    if full.is_empty() {
        vec![tokens]
    } else {
        full
    }
}

/// Scores `tokens` in windows of `window` on sequence 0 of `engine` (its capacity at least
/// `window`), calling `progress` after each window with the running score.
pub fn score(engine: &mut dyn Engine, tokenizer: &Tokenizer, tokens: &[u32], window: usize, progress: &mut dyn FnMut(&Score)) -> Result<Score> {
    if tokens.len() < 3 {
        return Err(Error::Invalid(format!("the text is {} token(s): perplexity needs at least 3", tokens.len())));
    }
    if window < 3 || window > engine.capacity() {
        return Err(Error::Invalid(format!("a window of {window} tokens: it must be 3 to the context of {}", engine.capacity())));
    }
    let vocab = engine.config().vocab_size;
    let mut total = Score::default();
    let mut input = Vec::with_capacity(window);
    for w in windows(tokens, window) {
        engine.reset();
        input.clear();
        input.extend_from_slice(w);
        if let Some(bos) = tokenizer.bos_added() {
            input[0] = bos;
        }
        let logits = engine.forward(&input, Logits::All)?;
        // Position i predicts token i + 1; positions n/2 .. n-2 are scored.
        let first = w.len() / 2;
        for i in first..w.len() - 1 {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let log_total = max + row.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
            let nll = log_total - row[w[i + 1] as usize] as f64;
            total.nll += nll;
            total.nll_squares += nll * nll;
            total.tokens += 1;
        }
        total.bytes += tokenizer.decode(&w[first + 1..])?.len();
        total.windows += 1;
        progress(&total);
    }
    Ok(total)
}
