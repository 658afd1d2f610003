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
        // Kimi-K2 (llama.cpp splits it in custom code, unicode.cpp's K2 handler, after the
        // tiktoken pattern of Moonshot's tokenization_kimi.py, which dsrun's tiktoken reader uses).
        "kimi-k2" => Some(&[crate::tiktoken::KIMI_PATTERN]),
        _ => None,
    }
}

/// GPT-2's byte-level pre-tokenizer with its own split pattern (llama.cpp's `gpt-2`; the
/// bundled model's).
static GPT2_PRE_TOKENIZER: std::sync::LazyLock<Json> = std::sync::LazyLock::new(|| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}));

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
    let pre_tokenizer = match (pre, split_patterns(pre)) {
        // GPT-2's own split, which the byte-level pre-tokenizer applies itself.
        ("gpt-2", _) => GPT2_PRE_TOKENIZER.clone(),
        (_, Some(patterns)) => {
            let mut steps: Vec<Json> = patterns.iter().map(|p| json!({"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": false})).collect();
            steps.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}));
            json!({"type": "Sequence", "pretokenizers": steps})
        }
        _ => return Err(Error::Tokenizer(format!("the GGUF's pre-tokenizer `{pre}` is not one dsrun knows (deepseek-v3, deepseek-llm, kimi-k2, gpt-2)"))),
    };
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
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
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

/// llama.cpp's token type for ids a tokenizer.json leaves out (the converter's `[PAD{id}]`).
const UNUSED: i32 = 5;

/// The `tokenizer.*` keys llama.cpp's converter writes for a checkpoint's byte-level BPE
/// `tokenizer.json` (and its `tokenizer_config.json`'s chat template and BOS/EOS flags), the
/// inverse of [`tokenizer_json`]: every id below `vocab_size` (ids the tokenizer leaves out as
/// `[PAD{id}]`, unused), its added tokens as control (special) or user-defined tokens, the
/// pre-tokenizer named by its split patterns.
pub fn from_checkpoint(dir: &std::path::Path, config: &crate::config::ModelConfig) -> Result<Vec<(String, Value)>> {
    let read = |name: &str| -> Result<Option<Json>> {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path, e)),
        }
    };
    let settings = read("tokenizer_config.json")?.unwrap_or(Json::Null);
    let tiktoken = dir.join("tiktoken.model");
    let t = match read("tokenizer.json")? {
        Some(t) => t,
        // Kimi-K2's tiktoken.model, as dsrun reads it: the same byte-level BPE.
        None if tiktoken.is_file() => {
            let tokenizer = crate::tiktoken::load(&tiktoken, settings.as_object().unwrap_or(&Map::new()))?;
            let text = tokenizer.to_string(false).map_err(|e| Error::Tokenizer(format!("{}: {e}", tiktoken.display())))?;
            serde_json::from_str(&text).map_err(|e| Error::Tokenizer(format!("{}: {e}", tiktoken.display())))?
        }
        None => return Err(Error::Tokenizer(format!("{}: no tokenizer.json or tiktoken.model: dsrun quantize writes the checkpoint's tokenizer into the file", dir.display()))),
    };
    let model = &t["model"];
    if model["type"] != "BPE" {
        return Err(Error::Tokenizer(format!("tokenizer.json's model is {}: dsrun quantize writes byte-level BPE tokenizers", model["type"])));
    }
    let patterns: Vec<&str> = t["pre_tokenizer"]["pretokenizers"].as_array().map_or(vec![], |p| p.iter().filter_map(|p| p["pattern"]["Regex"].as_str()).collect());
    let gpt2 = t["pre_tokenizer"]["type"] == "ByteLevel" && t["pre_tokenizer"]["use_regex"] == true;
    let pre =
        ["deepseek-v3", "deepseek-llm", "kimi-k2"].into_iter().find(|name| split_patterns(name).is_some_and(|want| want == patterns.as_slice())).or(gpt2.then_some("gpt-2")).ok_or_else(|| {
            Error::Tokenizer("tokenizer.json's pre-tokenizer is not DeepSeek-V3's, DeepSeek LLM's, Kimi-K2's or GPT-2's (what llama.cpp names deepseek-v3, deepseek-llm, kimi-k2 and gpt-2)".into())
        })?;
    let vocab = config.vocab_size;
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; vocab];
    let mut place = |id: u64, text: &str, ty: i32| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| Error::Tokenizer(format!("token `{text}` has id {id}, past the model's vocabulary of {vocab}")))?;
        *slot = Some((text.to_string(), ty));
        Ok(())
    };
    for (text, id) in model["vocab"].as_object().into_iter().flatten() {
        place(id.as_u64().unwrap_or(u64::MAX), text, 1)?;
    }
    for added in t["added_tokens"].as_array().into_iter().flatten() {
        let ty = if added["special"].as_bool().unwrap_or(false) { CONTROL as i32 } else { USER_DEFINED as i32 };
        place(added["id"].as_u64().unwrap_or(u64::MAX), added["content"].as_str().unwrap_or(""), ty)?;
    }
    let (tokens, types): (Vec<Value>, Vec<Value>) = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| {
            let (text, ty) = t.unwrap_or_else(|| (format!("[PAD{id}]"), UNUSED));
            (Value::String(text), Value::I32(ty))
        })
        .unzip();
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Json::Array(pair) => Value::String(pair.iter().filter_map(Json::as_str).collect::<Vec<_>>().join(" ")),
            other => Value::String(other.as_str().unwrap_or("").to_string()),
        })
        .collect();
    let mut out = vec![
        ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
    ];
    if let Some(bos) = config.bos_token_id {
        out.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(bos)));
    }
    if let Some(&eos) = config.eos_token_ids.first() {
        out.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)));
    }
    out.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(settings["add_bos_token"].as_bool().unwrap_or(true))));
    out.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(settings["add_eos_token"].as_bool().unwrap_or(false))));
    // A template is a string, or a list of named ones (the default is the one used).
    let template = match &settings["chat_template"] {
        Json::String(s) => Some(s.clone()),
        Json::Array(named) => named.iter().find(|t| t["name"] == "default").or(named.first()).and_then(|t| t["template"].as_str()).map(str::to_string),
        _ => None,
    };
    if let Some(template) = template {
        out.push(("tokenizer.chat_template".into(), Value::String(template)));
    }
    Ok(out)
}
