//! `tokenizer.json` (or a `tiktoken.model`, converted by `tiktoken`) through the `tokenizers`
//! crate, BOS/EOS from `tokenizer_config.json`, config.json and generation_config.json, and a
//! streaming decoder that never splits a multi-byte character.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    add_bos: bool,
    eos: Vec<u32>,
}

impl Tokenizer {
    pub fn load(dir: &Path, config: &ModelConfig) -> Result<Tokenizer> {
        let (path, tiktoken) = (dir.join("tokenizer.json"), dir.join("tiktoken.model"));
        let settings = read_tokenizer_config(&dir.join("tokenizer_config.json"))?;
        let inner = if path.is_file() {
            tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?
        } else if tiktoken.is_file() {
            // Kimi-K2 and Moonlight ship their tokenizer in tiktoken's format.
            crate::tiktoken::load(&tiktoken, &settings)?
        } else {
            return Err(Error::Tokenizer(format!("no tokenizer.json (or tiktoken.model) in {} (`dsrun logits --tokens ...` runs without one)", dir.display())));
        };
        let named = |key: &str| -> Option<u32> {
            let token = settings.get(key)?;
            let text = token.as_str().or_else(|| token.get("content")?.as_str())?;
            inner.token_to_id(text)
        };
        let bos = named("bos_token").or(config.bos_token_id);
        let add_bos = settings.get("add_bos_token").and_then(Value::as_bool).unwrap_or(bos.is_some());
        // EOS: the union of config.json's, tokenizer_config.json's and generation_config.json's
        // (Kimi-K2's chat EOS is only in the last).
        let mut eos = config.eos_token_ids.clone();
        eos.extend(named("eos_token"));
        eos.extend(crate::generation_config::GenerationDefaults::load(dir)?.eos_token_ids);
        eos.sort_unstable();
        eos.dedup();
        Ok(Tokenizer { inner, bos, add_bos, eos })
    }

    /// The tokenizer a GGUF file carries (`tokenizer.ggml.*`), its special ids from the file
    /// and the config made from it.
    pub fn from_gguf(gguf: &crate::gguf::Gguf, config: &ModelConfig) -> Result<Tokenizer> {
        let (inner, specials) = crate::gguf::tokenizer::load(gguf)?;
        let bos = specials.bos.or(config.bos_token_id);
        let add_bos = specials.add_bos.unwrap_or(bos.is_some());
        let mut eos = config.eos_token_ids.clone();
        eos.extend(specials.eos);
        eos.sort_unstable();
        eos.dedup();
        Ok(Tokenizer { inner, bos, add_bos, eos })
    }

    /// Token ids of `text`, with the BOS token first when the model expects one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            ids.push(bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// The BOS token `encode` puts first, if the model expects one.
    pub fn bos_added(&self) -> Option<u32> {
        self.bos.filter(|_| self.add_bos)
    }

    /// Token ids of text that already holds its special tokens (a rendered chat template): no
    /// BOS added, special tokens in the text recognised, as transformers'
    /// `apply_chat_template(..., tokenize=True)` encodes.
    pub fn encode_rendered(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }

    /// Every id that ends a sequence.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// The text of one token (as `logprobs` lists it).
    pub fn token_text(&self, id: u32) -> String {
        self.decode(&[id]).unwrap_or_default()
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

fn read_tokenizer_config(path: &Path) -> Result<serde_json::Map<String, Value>> {
    if !path.is_file() {
        return Ok(Default::default());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    match serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_path_buf(), source })? {
        Value::Object(map) => Ok(map),
        _ => Err(Error::Tokenizer(format!("{}: not a JSON object", path.display()))),
    }
}

/// Turns generated ids into text pieces as soon as they form whole characters.
///
/// Byte-level tokenizers can split one UTF-8 character over several tokens; decoding each token
/// alone would print replacement characters. Instead the decoder re-decodes a short window of
/// recent ids and emits only the new, complete suffix. Seeded with the prompt's last tokens
/// (`after`), the first piece gets the space a word-level decoder puts between words.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Start of the window re-decoded for context (leading-space rules depend on it).
    prefix: usize,
    /// Ids before this have been emitted (or are context).
    read: usize,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder whose first piece follows `context` (the prompt's last few tokens, not emitted).
    pub fn after(context: &[u32]) -> Self {
        let tail = &context[context.len().saturating_sub(4)..];
        StreamDecoder { ids: tail.to_vec(), prefix: 0, read: tail.len() }
    }

    /// Adds one id; returns the text it completes, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let before = tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let now = tokenizer.decode(&self.ids[self.prefix..])?;
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        match now.get(before.len()..) {
            Some(piece) if now.starts_with(&before) => {
                let piece = piece.to_string();
                self.prefix = self.read;
                self.read = self.ids.len();
                Ok(Some(piece))
            }
            _ => Ok(None),
        }
    }

    /// Whatever is still held back (an incomplete character at the end of generation).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<Option<String>> {
        let before = tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let now = tokenizer.decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now.get(before.len()..).filter(|s| !s.is_empty()).map(str::to_string))
    }
}
