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
