//! Chat templates against transformers: the published templates of DeepSeek-V3, DeepSeek-R1,
//! DeepSeek-V2-Lite-Chat and Kimi-K2 (crates/core/templates), rendered and tokenised as
//! `apply_chat_template(..., tokenize=True)` does, must give the same text and the same ids
//! (tests/data/chat/expected.json, made by tools/make_chat_fixtures.py).

use dsrun::chat_template::{ChatTemplate, Message};
use dsrun::config::ModelConfig;
use dsrun::tokenizer::Tokenizer;
use serde_json::Value;
use std::path::Path;

fn data(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(path)
}

/// A checkpoint directory as a user's would hold it: tokenizer.json and tokenizer_config.json
/// with the template and its special tokens.
fn checkpoint_dir(template: &str, bos: &str, eos: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(data("chat/tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    let source = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("crates/core/templates/{template}.jinja"))).unwrap();
    let config = serde_json::json!({"bos_token": bos, "eos_token": {"content": eos}, "add_bos_token": false, "chat_template": source});
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/config.json"), dir.path().join("config.json")).unwrap();
    dir
}

#[test]
fn published_templates_give_transformers_ids() {
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(data("chat/expected.json")).unwrap()).unwrap();
    assert_eq!(cases.len(), 24);
    for case in cases {
        let name = case["template"].as_str().unwrap();
        let dir = checkpoint_dir(name, case["bos_token"].as_str().unwrap(), case["eos_token"].as_str().unwrap());
        let config = ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
        let tokenizer = Tokenizer::load(dir.path(), &config).unwrap();
        let template = ChatTemplate::load(dir.path()).unwrap().expect("the template is found");
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
        let text = template.render(&messages, generation_prompt).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "{name}: rendered text of {messages:?}");
        let ids = template.tokens(&tokenizer, &messages, generation_prompt).unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(ids, want, "{name}: ids of {messages:?}");
    }
}

#[test]
fn a_checkpoint_without_a_template_has_none_and_a_broken_one_names_its_line() {
    let dir = checkpoint_dir("deepseek-v3", "<s>", "</s>");
    let plain = tempfile::tempdir().unwrap();
    std::fs::write(plain.path().join("tokenizer_config.json"), r#"{"bos_token": "<s>"}"#).unwrap();
    assert!(ChatTemplate::load(plain.path()).unwrap().is_none());

    std::fs::write(dir.path().join("chat_template.jinja"), "{% for m in messages %}\n{{ m.content | nosuchfilter }}\n{% endfor %}").unwrap();
    let template = ChatTemplate::load(dir.path()).unwrap().unwrap();
    let e = template.render(&[Message::new("user", "hi")], true).unwrap_err().to_string();
    assert!(e.contains("chat_template.jinja") && e.contains("line 2") && e.contains("nosuchfilter"), "{e}");
}
