//! `dsrun perplexity` follows llama-perplexity's rule exactly, so a text gives comparable
//! figures in both: BOS in place of each window's first token (the bundled model expects
//! BOS), positions n/2 ..= n-2 scored, a short tail dropped. Checked against a computation
//! written here from that rule, token by token, on the CPU reference: a window scored from the
//! wrong position, a window without its BOS, or one token too many fails it. And against
//! transformers (tests/data/perplexity.json, from tools/make_perplexity_fixture.py).

mod common;
use dsrun::config::ModelConfig;
use dsrun::engine::{CpuEngine, Steps};
use dsrun::model::{Logits, Model};
use dsrun::tokenizer::Tokenizer;

#[test]
fn perplexity_follows_llama_perplexitys_rule() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("weights");
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let tokenizer = Tokenizer::load(&dir, &config).unwrap();
    let bos = tokenizer.bos_added().expect("the bundled model expects BOS");
    let text = "Return a new list containing the items of the iterable in sorted order. The optional key \
                argument specifies a function of one argument that is used to extract a comparison key.";
    let tokens = tokenizer.encode(text).unwrap();
    let n = 16;
    assert!(tokens.len() > 2 * n && !tokens.len().is_multiple_of(n), "two whole windows and a tail: {}", tokens.len());
    let mut engine = CpuEngine::new(Model::load(&dir).unwrap(), n);
    let score = dsrun::perplexity::score(&mut engine, &tokenizer, &tokens, n, &mut |_| {}).unwrap();

    // The rule, written out: chunk i is tokens[i*n .. (i+1)*n] with its first token replaced
    // by BOS; logits row j (n/2 <= j <= n-2) is scored against token j+1.
    let (mut nll, mut count, mut bytes) = (0f64, 0usize, 0usize);
    let vocab = config.vocab_size;
    for chunk in tokens.chunks_exact(n) {
        let mut input = chunk.to_vec();
        input[0] = bos;
        engine.reset();
        let logits = engine.forward(&input, Logits::All).unwrap();
        for j in n / 2..=n - 2 {
            let row = &logits[j * vocab..(j + 1) * vocab];
            let total: f64 = row.iter().map(|&l| (l as f64).exp()).sum();
            nll -= (row[chunk[j + 1] as usize] as f64).exp().ln() - total.ln();
            count += 1;
        }
        bytes += tokenizer.decode(&chunk[n / 2 + 1..]).unwrap().len();
    }
    assert_eq!((score.windows, score.tokens), (tokens.len() / n, (tokens.len() / n) * (n - 1 - n / 2)));
    assert_eq!((count, score.bytes), (score.tokens, bytes));
    // Both sum the same f64 terms from the same logits; only the log-sum-exp's shift differs.
    let ppl = (nll / count as f64).exp();
    assert!((score.perplexity() - ppl).abs() <= 1e-9 * ppl, "perplexity {} vs the rule's {ppl}", score.perplexity());
}

/// `dsrun perplexity` against an independent computation: transformers' float32 model on the
/// bundled checkpoint, the same rule applied in tools/make_perplexity_fixture.py
/// (tests/data/perplexity.json), on the CPU reference and on wgpu. The tokens, windows, scored
/// positions and bytes must be equal; perplexity and bits per byte agree within 1e-5 of their
/// value (every side sums its logits in f32, in its own order: measured 2e-7 on both engines; a
/// logit off by 1e-5 of its scale moves this text's perplexity by about that much).
#[test]
fn perplexity_matches_transformers() {
    use dsrun::backend::wgpu::context;
    use dsrun::device::GpuChoice;
    use dsrun::runtime::GpuModel;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("weights");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/perplexity.json")).unwrap()).unwrap();
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let tokenizer = Tokenizer::load(&dir, &config).unwrap();
    let tokens = tokenizer.encode(fixture["text"].as_str().unwrap()).unwrap();
    let want_tokens: Vec<u32> = fixture["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    assert_eq!(tokens, want_tokens, "the tokenizer's ids");
    let window = fixture["window"].as_u64().unwrap() as usize;
    let model = Model::load(&dir).unwrap();
    let ctx = context::open(GpuChoice::Auto).expect("a wgpu adapter (on Debian: apt-get install mesa-vulkan-drivers)");
    let mut cpu = CpuEngine::new(Model::load(&dir).unwrap(), window);
    let mut gpu = GpuModel::new(ctx, &model, window, Default::default()).unwrap();
    let engines: [(&str, &mut dyn dsrun::engine::Engine, f64); 2] = [("the CPU reference", &mut cpu, 1e-5), ("wgpu", &mut gpu, 1e-5)];
    for (name, engine, tolerance) in engines {
        let score = dsrun::perplexity::score(engine, &tokenizer, &tokens, window, &mut |_| {}).unwrap();
        let counts = |key: &str| fixture[key].as_u64().unwrap() as usize;
        assert_eq!((score.windows, score.tokens, score.bytes), (counts("windows"), counts("scored"), counts("bytes")), "{name}: windows, scored tokens, bytes");
        for (what, got, want) in [("perplexity", score.perplexity(), fixture["perplexity"].as_f64().unwrap()), ("bits per byte", score.bits_per_byte(), fixture["bits_per_byte"].as_f64().unwrap())] {
            let err = (got - want).abs() / want;
            eprintln!("{name}: {what} {got:.6} vs transformers' {want:.6} (relative error {err:e})");
            assert!(err <= tolerance, "{name}: {what} {got} vs transformers' {want}: relative error {err:e} over {tolerance:e}");
        }
    }
}
