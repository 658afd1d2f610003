//! Tokenizers shipped as `tiktoken.model` instead of `tokenizer.json` (Kimi-K2, Moonlight),
//! converted at load into the byte-level BPE the `tokenizers` crate runs, so the rest of dsrun
//! sees one tokenizer type.
//!
//! `tiktoken.model` holds one `base64(token bytes) rank` line per token. tiktoken encodes a
//! pre-tokenized piece by repeatedly merging the adjacent pair whose concatenation has the lowest
//! rank, and takes a piece found whole in the ranks as one token; a BPE whose merges are every
//! (left, right) split of each token into two ranked tokens, ordered by the token's rank (then
//! by the halves' ranks), with `ignore_merges`, does the same (transformers' `TikTokenConverter`
//! derives its merges this way). The split pattern and the special tokens follow Moonshot's
//! `tokenization_kimi.py`: 256 special ids after the ranks, named by `tokenizer_config.json`'s
//! `added_tokens_decoder`, the unnamed ones `<|reserved_token_{id}|>`.

use crate::error::{Error, Result};
use base64::Engine as _;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// Kimi-K2's pre-tokenizer (`tokenization_kimi.py`'s `pat_str`): runs of Han characters; words
/// by case class (Han excluded) with English contractions; 1-3 digits; punctuation runs; newlines;
/// spaces. `&&` is character-class intersection, as in tiktoken's regex engine.
pub const KIMI_PATTERN: &str = concat!(
    r"[\p{Han}]+",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"|\s*[\r\n]+",
    r"|\s+(?!\S)",
    r"|\s+",
);

/// Special-token ids reserved after the ranks (`num_reserved_special_tokens`).
const RESERVED_SPECIAL: usize = 256;

/// The tokenizer of `path` (a `tiktoken.model`), with the special tokens `settings` (the
/// directory's tokenizer_config.json) names.
pub fn load(path: &Path, settings: &serde_json::Map<String, Value>) -> Result<tokenizers::Tokenizer> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let tokens = parse_ranks(&text).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
    let chars = byte_chars();
    let piece = |bytes: &[u8]| -> String { bytes.iter().map(|&b| chars[b as usize]).collect() };
    let rank: HashMap<&[u8], u32> = tokens.iter().enumerate().map(|(r, t)| (t.as_slice(), r as u32)).collect();

    // Every split of each token into two ranked tokens, in the token's rank order.
    let mut merges = Vec::new();
    for token in tokens.iter().filter(|t| t.len() > 1) {
        let mut splits: Vec<(u32, u32, usize)> = (1..token.len()).filter_map(|i| Some((*rank.get(&token[..i])?, *rank.get(&token[i..])?, i))).collect();
        splits.sort_unstable();
        merges.extend(splits.into_iter().map(|(_, _, i)| (piece(&token[..i]), piece(&token[i..]))));
    }
    let mut vocab: Vocab = tokens.iter().enumerate().map(|(r, t)| (piece(t), r as u32)).collect();
    let special = special_tokens(settings, tokens.len())?;
    for (id, name) in &special {
        vocab.insert(name.clone(), *id);
    }
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).ignore_merges(true).build().map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    let split = Split::new(SplitPattern::Regex(KIMI_PATTERN.into()), SplitDelimiterBehavior::Isolated, false).map_err(|e| Error::Tokenizer(format!("the tiktoken split pattern: {e}")))?;
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()])));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let added: Vec<AddedToken> = special.into_iter().map(|(_, name)| AddedToken::from(name, true)).collect();
    tokenizer.add_special_tokens(&added);
    Ok(tokenizer)
}

/// The tokens by rank: every rank from 0 once, each token once.
fn parse_ranks(text: &str) -> std::result::Result<Vec<Vec<u8>>, String> {
    let mut by_rank: Vec<Option<Vec<u8>>> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |what: &str| format!("line {}: {what} (want `base64-token rank`)", i + 1);
        let (token, rank) = line.trim().split_once(' ').ok_or_else(|| bad("no rank"))?;
        let token = base64::engine::general_purpose::STANDARD.decode(token).map_err(|e| bad(&format!("the token is not base64 ({e})")))?;
        let rank: usize = rank.trim().parse().map_err(|_| bad(&format!("rank `{rank}` is not a number")))?;
        if token.is_empty() || !seen.insert(token.clone()) {
            return Err(bad("an empty or repeated token"));
        }
        if rank >= 1 << 24 {
            return Err(bad(&format!("rank {rank} is beyond any tokenizer's vocabulary")));
        }
        if by_rank.len() <= rank {
            by_rank.resize(rank + 1, None);
        }
        if by_rank[rank].replace(token).is_some() {
            return Err(bad(&format!("rank {rank} given twice")));
        }
    }
    let missing = by_rank.iter().position(Option::is_none);
    if let Some(rank) = missing {
        return Err(format!("no token has rank {rank} (ranks must run from 0 without gaps)"));
    }
    if by_rank.len() < 256 {
        return Err(format!("{} tokens, fewer than the 256 single bytes a byte-level BPE needs", by_rank.len()));
    }
    Ok(by_rank.into_iter().flatten().collect())
}

/// (id, text) of the special tokens after `ranks` ranks: `added_tokens_decoder`'s names, the
/// reserved rest `<|reserved_token_{id}|>`.
fn special_tokens(settings: &serde_json::Map<String, Value>, ranks: usize) -> Result<Vec<(u32, String)>> {
    let mut named = std::collections::BTreeMap::new();
    if let Some(Value::Object(added)) = settings.get("added_tokens_decoder") {
        for (id, entry) in added {
            let content = entry.get("content").and_then(Value::as_str);
            let (Ok(id), Some(content)) = (id.parse::<usize>(), content) else {
                return Err(Error::Tokenizer(format!("tokenizer_config.json: added_tokens_decoder entry `{id}` needs a numeric id and a `content`")));
            };
            if id < ranks || id >= 1 << 24 {
                return Err(Error::Tokenizer(format!("tokenizer_config.json: added token `{content}` has id {id}, but tiktoken.model's {ranks} ranks end where special tokens start")));
            }
            named.insert(id, content.to_string());
        }
    }
    let end = (ranks + RESERVED_SPECIAL).max(named.keys().next_back().map_or(0, |&id| id + 1));
    Ok((ranks..end).map(|id| (id as u32, named.get(&id).cloned().unwrap_or_else(|| format!("<|reserved_token_{id}|>")))).collect())
}

/// GPT-2's printable stand-in for each byte (what byte-level BPE vocabularies are written in).
fn byte_chars() -> [char; 256] {
    let mut chars = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        chars[b as usize] = if printable {
            b as char
        } else {
            next += 1;
            char::from_u32(next - 1).expect("256..512 are characters")
        };
    }
    chars
}
