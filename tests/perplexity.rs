//! `dsrun perplexity` follows llama-perplexity's rule exactly, so a text gives comparable
//! figures in both: BOS in place of each window's first token (the bundled model expects
//! BOS), positions n/2 ..= n-2 scored, a short tail dropped. Checked against a computation
//! written here from that rule, token by token, on the CPU reference: a window scored from the
//! wrong position, a window without its BOS, or one token too many fails it.

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
    assert!(tokens.len() > 2 * n && tokens.len() % n != 0, "two whole windows and a tail: {}", tokens.len());
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
