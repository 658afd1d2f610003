//! The DeepSeek-V2/V3 forward pass (docs/forward-pass.md), over weights in their stored formats.

pub mod attention;
mod ffn;
pub mod math;
pub mod rope;
pub mod router;
pub mod weights;

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::quant::CacheFormat;
use rope::Rope;
use router::RouterParams;
use std::path::Path;
use weights::{FeedForward, Weights};

/// How latent attention is evaluated. Both give the same logits (up to rounding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionMode {
    /// Queries are mapped into the latent space; scores and values use `c_kv` directly (decode form).
    #[default]
    Absorbed,
    /// Latents are expanded into per-head keys and values first (plain multi-head attention).
    Naive,
}

/// Which positions' logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Logits {
    All,
    Last,
}

pub struct Model {
    pub config: ModelConfig,
    pub weights: Weights,
    /// Checkpoint tensors the forward pass does not use (e.g. the MTP layer).
    pub ignored: Vec<String>,
    pub attention_mode: AttentionMode,
    rope: Rope,
    router: RouterParams,
}

/// The latent KV cache: per layer, `kv_lora_rank + qk_rope_head_dim` values per token.
pub struct KvCache {
    layers: Vec<Vec<f32>>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// Tokens cached so far (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Forgets every position from `len` on (a rejected draft, a prompt that shares only a
    /// prefix with what is cached).
    pub fn truncate(&mut self, len: usize) {
        let len = len.min(self.len);
        let per_token = |layer: &Vec<f32>| layer.len() / self.len.max(1);
        for layer in &mut self.layers {
            let keep = len * per_token(layer);
            layer.truncate(keep);
        }
        self.len = len;
    }
}

/// Rejects a step that no backend can run: no tokens, an id outside the vocabulary, or more
/// tokens than the context has room for.
pub fn check_request(c: &ModelConfig, cached: usize, capacity: usize, tokens: &[u32]) -> Result<()> {
    if tokens.is_empty() {
        return Err(Error::Invalid("no tokens to run".into()));
    }
    check_tokens(c.vocab_size, tokens)?;
    if cached + tokens.len() > capacity {
        return Err(Error::ContextFull { tokens: tokens.len(), cached, room: capacity - cached });
    }
    Ok(())
}

/// Rejects a token id outside a vocabulary of `vocab` (the check every engine makes; a server
/// makes it before answering).
pub fn check_tokens(vocab: usize, tokens: &[u32]) -> Result<()> {
    match tokens.iter().find(|&&t| t as usize >= vocab) {
        Some(&token) => Err(Error::TokenOutOfRange { token, vocab }),
        None => Ok(()),
    }
}

/// The id a GPU argmax writes for a row holding a NaN or an infinity.
pub const NON_FINITE_ID: u32 = u32::MAX;

/// The error for non-finite logits at `position`.
pub fn non_finite_logits(position: usize) -> Error {
    Error::NonFiniteLogits { position }
}

/// Fails on the first row of `logits` (`[rows, vocab]`, row r at position `positions(r)`)
/// holding a NaN or an infinity.
pub fn check_logits(logits: &[f32], vocab: usize, position: impl Fn(usize) -> usize) -> Result<()> {
    match logits.chunks(vocab.max(1)).position(|row| row.iter().any(|v| !v.is_finite())) {
        Some(r) => Err(non_finite_logits(position(r))),
        None => Ok(()),
    }
}

impl Model {
    /// Reads `config.json` and the safetensors in `dir` and checks every tensor the model needs.
    pub fn load(dir: &Path) -> Result<Model> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let checkpoint = Checkpoint::open(dir)?;
        Self::from_checkpoint(config, &checkpoint)
    }

    pub fn from_checkpoint(config: ModelConfig, checkpoint: &Checkpoint) -> Result<Model> {
        if !config.unused_keys.is_empty() {
            log::warn!("{}: config.json keys dsrun does not use (the forward pass ignores them): {}", checkpoint.dir.display(), config.unused_keys.join(", "));
        }
        let (weights, ignored) = Weights::load(&config, checkpoint)?;
        Ok(Model { rope: Rope::new(&config), router: RouterParams::from_config(&config), config, weights, ignored, attention_mode: AttentionMode::default() })
    }

    /// An empty cache that holds up to `capacity` tokens (memory grows as tokens arrive).
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache { layers: vec![Vec::new(); self.config.num_hidden_layers], len: 0, capacity }
    }

    /// Runs `tokens` at positions `cache.len()..` (a whole prompt at once, or one token to decode),
    /// appends them to the cache, and returns `[n, vocab]` logits (`Logits::All`) or `[vocab]`.
    pub fn forward(&self, cache: &mut KvCache, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        let (n, d) = (tokens.len(), self.config.hidden_size);
        let h = self.body(cache, tokens)?;
        let mut last = match which {
            Logits::All => h,
            Logits::Last => h[(n - 1) * d..].to_vec(),
        };
        math::rms_norm(&mut last, &self.weights.final_norm, self.config.rms_norm_eps);
        let logits = math::matmul(&self.weights.lm_head, &last, last.len() / d);
        let first = cache.len
            - match which {
                Logits::All => n,
                Logits::Last => 1,
            };
        check_logits(&logits, self.config.vocab_size, |r| first + r)?;
        Ok(logits)
    }

    /// As `forward` with every position's logits, also returning the hidden states after the
    /// final norm (`[n, hidden]`, what the lm_head reads): the MTP layer's input.
    pub fn forward_hidden(&self, cache: &mut KvCache, tokens: &[u32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut h = self.body(cache, tokens)?;
        math::rms_norm(&mut h, &self.weights.final_norm, self.config.rms_norm_eps);
        let logits = math::matmul(&self.weights.lm_head, &h, tokens.len());
        let first = cache.len - tokens.len();
        check_logits(&logits, self.config.vocab_size, |r| first + r)?;
        Ok((logits, h))
    }

    /// The embedding and the decoder layers for `tokens` at positions `cache.len()..`.
    fn body(&self, cache: &mut KvCache, tokens: &[u32]) -> Result<Vec<f32>> {
        check_request(&self.config, cache.len, cache.capacity, tokens)?;
        let mut h = math::embed(&self.weights.embed, tokens);
        for (layer, layer_cache) in self.weights.layers.iter().zip(cache.layers.iter_mut()) {
            self.layer(layer, &mut h, tokens.len(), cache.len, layer_cache);
        }
        cache.len += tokens.len();
        Ok(h)
    }

    /// One decoder layer on the residual stream `h` of `n` tokens from position `start`.
    fn layer(&self, layer: &weights::Layer, h: &mut [f32], n: usize, start: usize, layer_cache: &mut Vec<f32>) {
        let c = &self.config;
        let attention_ctx = attention::AttentionCtx { config: c, rope: &self.rope, softmax_scale: c.softmax_scale() as f32, mode: self.attention_mode, cache: CacheFormat::F32 };
        let mut x = h.to_vec();
        math::rms_norm(&mut x, &layer.input_norm, c.rms_norm_eps);
        math::add_in_place(h, &attention::forward(&attention_ctx, &layer.attention, &x, n, start, layer_cache));
        let mut x = h.to_vec();
        math::rms_norm(&mut x, &layer.post_attention_norm, c.rms_norm_eps);
        let y = match &layer.ffn {
            FeedForward::Dense(mlp) => ffn::mlp(mlp, &x, n),
            FeedForward::Moe(moe) => ffn::moe(moe, &self.router, &x, n),
        };
        math::add_in_place(h, &y);
    }

    /// An empty cache for the MTP layer (one layer), or None where the model has no MTP layer.
    pub fn new_mtp_cache(&self, capacity: usize) -> Option<KvCache> {
        self.weights.mtp.as_ref().map(|_| KvCache { layers: vec![Vec::new()], len: 0, capacity })
    }

    /// The MTP layer (`weights::Mtp`) at positions `cache.len()..`: row i pairs `tokens[i]`
    /// (the token after that position) with `hidden[i]` (the main model's hidden state there,
    /// after its final norm, or a previous draft's output). Returns the draft logits `[n,
    /// vocab]` and the output after `shared_head.norm` (`[n, hidden]`, a chained draft's input).
    pub fn mtp_forward(&self, cache: &mut KvCache, tokens: &[u32], hidden: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let (c, n) = (&self.config, tokens.len());
        let mtp = self.weights.mtp.as_ref().ok_or_else(|| Error::Invalid("this checkpoint has no MTP layer".into()))?;
        check_request(c, cache.len, cache.capacity, tokens)?;
        if hidden.len() != n * c.hidden_size {
            return Err(Error::Invalid(format!("MTP: {} hidden values for {n} tokens of {}", hidden.len(), c.hidden_size)));
        }
        let mut e = math::embed(&mtp.embed, tokens);
        math::rms_norm(&mut e, &mtp.enorm, c.rms_norm_eps);
        let mut hn = hidden.to_vec();
        math::rms_norm(&mut hn, &mtp.hnorm, c.rms_norm_eps);
        let mut h = math::matmul(&mtp.eh_embed, &e, n);
        math::add_in_place(&mut h, &math::matmul(&mtp.eh_hidden, &hn, n));
        self.layer(&mtp.layer, &mut h, n, cache.len, &mut cache.layers[0]);
        cache.len += n;
        math::rms_norm(&mut h, &mtp.head_norm, c.rms_norm_eps);
        let logits = math::matmul(&mtp.head, &h, n);
        let first = cache.len - n;
        check_logits(&logits, c.vocab_size, |r| first + r)?;
        Ok((logits, h))
    }
}
