//! Tokenizer behaviour with the bundled model's byte-level BPE tokenizer.

use dsrun::config::ModelConfig;
use dsrun::tokenizer::{StreamDecoder, Tokenizer};
use std::path::Path;

fn bundled() -> Tokenizer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights");
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    Tokenizer::load(&dir, &config).unwrap()
}

#[test]
fn bos_is_prepended_and_text_round_trips() {
    let tok = bundled();
    let ids = tok.encode("Return the value of the file.").unwrap();
    assert_eq!(ids[0], 0, "BOS first");
    assert_eq!(tok.decode(&ids).unwrap(), "Return the value of the file.");
    assert!(tok.is_eos(1));
}

#[test]
fn streaming_never_splits_multibyte_characters() {
    let tok = bundled();
    let text = "naïve café — 日本語のテキスト 😀👍🏽 Ünïcödé ∑ end";
    let ids = tok.encode(text).unwrap();
    // Byte-level BPE on an English corpus splits these characters over several tokens.
    assert!(ids.len() > text.split_whitespace().count() + 10);
    let mut decoder = StreamDecoder::new();
    let mut pieces = Vec::new();
    for &id in &ids[1..] {
        if let Some(piece) = decoder.push(&tok, id).unwrap() {
            pieces.push(piece);
        }
    }
    pieces.extend(decoder.finish(&tok).unwrap());
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "a piece holds a broken character: {pieces:?}");
    assert_eq!(pieces.concat(), text);
}

#[test]
fn an_unfinished_character_at_the_end_is_flushed_not_lost() {
    let tok = bundled();
    let ids = tok.encode("ok 😀").unwrap();
    let mut decoder = StreamDecoder::new();
    let mut out = String::new();
    // Drop the last byte-token of the emoji: what is complete must still come out.
    for &id in &ids[1..ids.len() - 1] {
        out.extend(decoder.push(&tok, id).unwrap());
    }
    out.extend(decoder.finish(&tok).unwrap());
    assert!(out.starts_with("ok "), "{out:?}");
}

/// Kimi-K2's tokenizer format: `tiktoken.model` and `tokenizer_config.json`, no tokenizer.json,
/// converted at load. `tests/fixtures/tiktoken` (tools/make_tiktoken_fixture.py) is a byte-level
/// BPE of 1,756 ranks trained in that format, with Kimi's split pattern and special tokens; its
/// ids for English, code, Chinese, mixed scripts, digits, whitespace runs, emoji and chat markup
/// are Python tiktoken's own, and dsrun must give exactly them. Every `tests/fixtures/tiktoken*`
/// directory is checked (the script's `--published` writes one from the published files).
#[test]
fn tiktoken_model_gives_tiktokens_ids() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let config = ModelConfig::from_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/config.json")).unwrap();
    let dirs: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("tiktoken")).collect();
    assert!(!dirs.is_empty());
    for dir in dirs {
        let tok = Tokenizer::load(&dir, &config).unwrap();
        let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        let ranks = expected["ranks"].as_u64().unwrap() as u32;
        for case in expected["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            assert_eq!(tok.encode_rendered(text).unwrap(), want, "{}: {text:?}", dir.display());
            if want.iter().all(|&id| id < ranks) {
                assert_eq!(tok.decode(&want).unwrap(), text, "decoding {text:?}");
            }
        }
        // 256 special ids after the ranks: tokenizer_config.json's names, else reserved names.
        assert_eq!(tok.vocab_size(), ranks as usize + 256);
        let settings: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap()).unwrap();
        let named = settings["added_tokens_decoder"].as_object().unwrap();
        for (id, token) in named {
            assert_eq!(tok.encode_rendered(token["content"].as_str().unwrap()).unwrap(), [id.parse::<u32>().unwrap()], "{token}");
        }
        let reserved = (ranks..ranks + 256).find(|id| !named.contains_key(&id.to_string())).unwrap();
        assert_eq!(tok.encode_rendered(&format!("<|reserved_token_{reserved}|>")).unwrap(), [reserved]);
        assert_eq!(tok.encode("x").unwrap()[0], ranks, "[BOS] (bos_token) first");
    }

    // A broken ranks file is refused by line.
    let bad = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(root.join("tiktoken/tiktoken.model")).unwrap();
    for (broken, says) in [
        (good.replacen(" 3\n", " 3x\n", 1), "line 4: rank `3x` is not a number"),
        (good.replacen("Aw== 3\n", "!!! 3\n", 1), "line 4: the token is not base64"),
        (good.lines().filter(|l| !l.ends_with(" 7")).collect::<Vec<_>>().join("\n"), "no token has rank 7"),
    ] {
        std::fs::write(bad.path().join("tiktoken.model"), broken).unwrap();
        let err = Tokenizer::load(bad.path(), &config).err().expect("refused").to_string();
        assert!(err.contains("tiktoken.model") && err.contains(says), "{err}");
    }
}
