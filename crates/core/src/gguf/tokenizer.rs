//! The tokenizer a GGUF file carries (`tokenizer.ggml.*`) as the `tokenizer.json` it was
//! converted from, for the `tokenizers` crate that reads every other checkpoint's: the tokens
//! and merges of its byte-level BPE, the pre-tokenizer's split patterns by the name llama.cpp
//! stores (`tokenizer.ggml.pre`; the patterns are llama.cpp's, which are the Hugging Face
//! tokenizers' own), special tokens by their types, and the chat template.

use super::{Gguf, Value};
use crate::error::{Error, Result};
use serde_json::{json, Map, Value as Json};

/// llama.cpp's token types (`llama_token_type`).
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;

/// The split patterns of each pre-tokenizer dsrun reads, by `tokenizer.ggml.pre` (llama.cpp's
/// `llama-vocab.cpp`, which took them from the models' tokenizer.json).
fn split_patterns(pre: &str) -> Option<&'static [&'static str]> {
    match pre {
        // DeepSeek-V3, R1, V3.1, V3.2.
        "deepseek-v3" => Some(&[
            "\\p{N}{1,3}",
            "[一-龥぀-ゟ゠-ヿ]+",
            "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
        ]),
        // DeepSeek-V2, V2-Lite, V2.5 (DeepSeek LLM's tokenizer).
        "deepseek-llm" => Some(&[
            "[\r\n]",
            "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
            "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
            "\\s+$",
            "[一-龥ࠀ-一가-퟿]+",
            "\\p{N}+",
        ]),
        _ => None,
    }
}

/// What the file says about its tokenizer beyond the vocabulary.
#[derive(Debug, Clone, Default)]
pub struct Specials {
    pub bos: Option<u32>,
    pub add_bos: Option<bool>,
    /// End-of-sequence ids: `eos`, and `eot` / `eom` where the file names them.
    pub eos: Vec<u32>,
    /// The text of the BOS and EOS tokens (the chat template's `bos_token` / `eos_token`).
    pub bos_text: Option<String>,
    pub eos_text: Option<String>,
}

/// The file's tokenizer for the `tokenizers` crate, and its special ids.
pub fn load(g: &Gguf) -> Result<(tokenizers::Tokenizer, Specials)> {
    let json = tokenizer_json(g)?;
    let text = json.to_string();
    let tokenizer = text.parse::<tokenizers::Tokenizer>().map_err(|e| Error::Tokenizer(format!("the GGUF's tokenizer: {e}")))?;
    Ok((tokenizer, specials(g)?))
}

fn strings<'a>(g: &'a Gguf, key: &str) -> Result<Vec<&'a str>> {
    match g.get(key) {
        Some(Value::Array(items)) => items.iter().map(|v| v.as_str().ok_or_else(|| Error::Tokenizer(format!("`{key}` holds {}, not strings", v.summary())))).collect(),
        Some(v) => Err(Error::Tokenizer(format!("`{key}` is {}, not an array of strings", v.summary()))),
        None => Err(Error::Tokenizer(format!("no `{key}` in the GGUF: it carries no tokenizer (`dsrun logits --tokens ...` runs without one)"))),
    }
}

fn id(g: &Gguf, key: &str, vocab: usize) -> Result<Option<u32>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(id) if (id as usize) < vocab => Ok(Some(id as u32)),
            _ => Err(Error::Tokenizer(format!("`{key}` is {}, not a token id below the vocabulary's {vocab}", v.summary()))),
        },
    }
}

/// The file's special ids and their text.
pub fn specials(g: &Gguf) -> Result<Specials> {
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let n = tokens.len();
    let bos = id(g, "tokenizer.ggml.bos_token_id", n)?;
    let eos = id(g, "tokenizer.ggml.eos_token_id", n)?;
    let mut ends: Vec<u32> = [eos, id(g, "tokenizer.ggml.eot_token_id", n)?, id(g, "tokenizer.ggml.eom_token_id", n)?].into_iter().flatten().collect();
    ends.sort_unstable();
    ends.dedup();
    let add_bos = match g.get("tokenizer.ggml.add_bos_token") {
        None => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(v) => return Err(Error::Tokenizer(format!("`tokenizer.ggml.add_bos_token` is {}, not a boolean", v.summary()))),
    };
    let text = |id: Option<u32>| id.map(|i| tokens[i as usize].to_string());
    Ok(Specials { bos, add_bos, eos: ends, bos_text: text(bos), eos_text: text(eos) })
}

/// `tokenizer.json` for a byte-level BPE file (`tokenizer.ggml.model` "gpt2", as DeepSeek's are).
pub fn tokenizer_json(g: &Gguf) -> Result<Json> {
    let model = g.get("tokenizer.ggml.model").and_then(Value::as_str).unwrap_or("(none)");
    if model != "gpt2" {
        return Err(Error::Tokenizer(format!("the GGUF's tokenizer model is `{model}`: dsrun reads byte-level BPE tokenizers (`gpt2`, what DeepSeek models use)")));
    }
    let pre = g.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
    let patterns = split_patterns(pre).ok_or_else(|| Error::Tokenizer(format!("the GGUF's pre-tokenizer `{pre}` is not one dsrun knows (deepseek-v3, deepseek-llm)")))?;
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let merges = strings(g, "tokenizer.ggml.merges")?;
    let types: Vec<u64> = match g.get("tokenizer.ggml.token_type") {
        Some(Value::Array(items)) if items.len() == tokens.len() => items.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
        Some(v) => return Err(Error::Tokenizer(format!("`tokenizer.ggml.token_type` is {}, not one type per token", v.summary()))),
        None => vec![1; tokens.len()],
    };
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (i, (&token, &ty)) in tokens.iter().zip(&types).enumerate() {
        // A repeated string keeps its first id, as llama.cpp's text-to-id map does.
        vocab.entry(token.to_string()).or_insert(json!(i));
        if ty == CONTROL || ty == USER_DEFINED {
            added.push(json!({"id": i, "content": token, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": ty == CONTROL}));
        }
    }
    let mut pre_tokenizers: Vec<Json> = patterns.iter().map(|p| json!({"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": false})).collect();
    pre_tokenizers.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}));
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre_tokenizers},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    }))
}

/// `tokenizer.chat_template`, where the file has one.
pub fn chat_template(g: &Gguf) -> Result<Option<String>> {
    match g.get("tokenizer.chat_template") {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(Error::Tokenizer(format!("`tokenizer.chat_template` is {}, not a string", v.summary()))),
    }
}
