//! Helpers shared by the integration tests: golden fixtures and logits comparison.
#![allow(dead_code)]

pub mod conformance;

use dsrun::engine::Steps;
use std::path::{Path, PathBuf};

/// Every fixture family; `v32` is DeepSeek-V3.2 (sparse attention: its indexer picks 5 positions).
pub const FAMILIES: [&str; 6] = ["v3_noaux", "v3_yarn", "v3_fp8", "v2_lite", "v2_glg", "v32"];

/// A fixture directory. `DSRUN_FIXTURES=DIR` points the tests at fixtures made elsewhere, e.g.
/// `tools/make_fixtures.py --out DIR --seed 7 --scale 1.5`, to check nothing is tuned to these.
pub fn fixture(name: &str) -> PathBuf {
    match std::env::var_os("DSRUN_FIXTURES") {
        Some(dir) => PathBuf::from(dir).join(name),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name),
    }
}

/// transformers' float32 logits for a fixture: `(tokens, logits [n, vocab])`.
pub struct Golden {
    pub tokens: Vec<u32>,
    pub logits: Vec<f32>,
    pub vocab: usize,
}

pub fn golden(dir: &Path) -> Golden {
    let bytes = std::fs::read(dir.join("golden.safetensors")).expect("golden.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("golden parses");
    let tokens = st.tensor("tokens").unwrap();
    let tokens = tokens.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect();
    let logits = st.tensor("logits").unwrap();
    let vocab = logits.shape()[1];
    let logits = logits.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    Golden { tokens, logits, vocab }
}

/// The MTP layer's golden draft (tools/make_mtp_fixtures.py), where the fixture has an MTP
/// layer: the tokens, the main model's hidden states after its final norm (`[n-1, hidden]`) and
/// the draft logits (`[n-1, vocab]`; row i drafts token i+2 from hidden row i and token i+1).
pub struct GoldenMtp {
    pub tokens: Vec<u32>,
    pub hidden: Vec<f32>,
    pub logits: Vec<f32>,
}

pub fn golden_mtp(dir: &Path) -> Option<GoldenMtp> {
    let bytes = std::fs::read(dir.join("golden_mtp.safetensors")).ok()?;
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("golden_mtp parses");
    let floats = |name: &str| st.tensor(name).unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let tokens = st.tensor("tokens").unwrap().data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect();
    Some(GoldenMtp { tokens, hidden: floats("hidden"), logits: floats("mtp_logits") })
}

/// The fixture families with an MTP layer.
pub const MTP_FAMILIES: [&str; 2] = ["v3_noaux", "v3_fp8"];

/// `max |a - b| / max |b|`: the error relative to the reference's scale.
pub fn relative_error(a: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(a.len(), reference.len());
    let scale = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = a.iter().zip(reference).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

pub fn argmax(x: &[f32]) -> usize {
    dsrun::model::math::argmax(x)
}

/// Asserts the stated tolerance and the same argmax at every position.
pub fn assert_logits_match(what: &str, got: &[f32], reference: &[f32], vocab: usize, tolerance: f32) {
    let err = relative_error(got, reference);
    assert!(err <= tolerance, "{what}: relative error {err:e} exceeds {tolerance:e}");
    for (pos, (g, r)) in got.chunks(vocab).zip(reference.chunks(vocab)).enumerate() {
        assert_eq!(argmax(g), argmax(r), "{what}: argmax differs at position {pos}");
    }
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn random(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// A quantised GGUF fixture's golden tokens and logits (`tests/fixtures/gguf/<file>.golden.safetensors`:
/// transformers on gguf-py's dequantisation of the file).
#[allow(dead_code)]
pub fn golden_of(file: &str) -> (Vec<u32>, Vec<f32>) {
    let bytes = std::fs::read(fixture("gguf").join(format!("{file}.golden.safetensors"))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tokens = st.tensor("tokens").unwrap().data().chunks(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect();
    let logits = st.tensor("logits").unwrap().data().chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    (tokens, logits)
}

/// A `rows x cols` matrix of GGUF block format `dtype` (cols whole blocks) of random blocks:
/// every code byte random, so every code, bit pair and scale pattern occurs, and the f16 fields
/// (ggml's block structs: the scale `d`, and `dmin` or `m` where the format has one) set to
/// random values of a few thousandths (a random f16 pattern would be inf or NaN at times).
#[allow(dead_code)]
pub fn random_blocks(name: &str, dtype: dsrun::quant::DType, rows: usize, cols: usize, seed: u64) -> dsrun::model::weights::Matrix {
    use dsrun::quant::DType;
    let format = dtype.format();
    let halves: &[usize] = match dtype {
        DType::Q8_0 | DType::Q4_0 | DType::Q5_0 | DType::IQ4_NL | DType::IQ4_XS => &[0],
        DType::IQ2_XXS | DType::IQ2_XS | DType::IQ2_S | DType::IQ3_XXS | DType::IQ3_S | DType::IQ1_S => &[0],
        // IQ1_M's f16 is the top nibbles of its four scale words (48..56), set below.
        DType::IQ1_M => &[],
        DType::Q4_1 | DType::Q5_1 | DType::Q4_K | DType::Q5_K => &[0, 2],
        DType::Q2_K => &[80, 82],
        DType::Q3_K => &[108],
        DType::Q6_K => &[208],
        _ => panic!("{dtype:?}: not a GGUF block format"),
    };
    assert!(cols.is_multiple_of(format.values as usize), "{dtype:?}: rows of whole blocks");
    let size = format.bytes(rows * cols);
    let noise = random(seed, size);
    let mut bytes: Vec<u8> = noise.iter().map(|v| ((v + 1.0) * 128.0) as u8).collect();
    let scales = random(seed + 1, size);
    for (b, block) in bytes.chunks_exact_mut(format.bytes as usize).enumerate() {
        for (k, &at) in halves.iter().enumerate() {
            let d = half::f16::from_f32(0.002 + 0.004 * scales[2 * b + k].abs());
            block[at..at + 2].copy_from_slice(&d.to_bits().to_le_bytes());
        }
        if dtype == DType::IQ1_M {
            let d = half::f16::from_f32(0.002 + 0.004 * scales[2 * b].abs()).to_bits();
            for k in 0..4 {
                let word = u16::from_le_bytes([block[48 + 2 * k], block[49 + 2 * k]]) & 0x0fff | ((d >> (4 * k)) & 0xf) << 12;
                block[48 + 2 * k..50 + 2 * k].copy_from_slice(&word.to_le_bytes());
            }
        }
    }
    dsrun::model::weights::Matrix { name: name.into(), rows, cols, dtype, data: dsrun::checkpoint::TensorBytes::from_vec(bytes), scales: None }
}

/// Router cases for GPU kernel tests: every scoring function and top-k method, with and without
/// a correction bias, and a token whose logits all tie.
pub struct RouterCase {
    pub params: dsrun::model::router::RouterParams,
    pub experts: usize,
    pub tokens: usize,
    pub logits: Vec<f32>,
    pub bias: Option<Vec<f32>>,
}

#[allow(dead_code)]
pub fn router_cases() -> Vec<RouterCase> {
    use dsrun::config::{ScoringFunc, TopkMethod};
    use dsrun::model::router::RouterParams;
    let configs = [
        (ScoringFunc::Sigmoid, TopkMethod::NoauxTc, 8, 4, 8, true, 2.5, 256),
        (ScoringFunc::Sigmoid, TopkMethod::NoauxTc, 4, 2, 4, true, 1.0, 20),
        (ScoringFunc::Softmax, TopkMethod::Greedy, 1, 1, 6, false, 1.0, 64),
        (ScoringFunc::Softmax, TopkMethod::GroupLimitedGreedy, 4, 2, 3, false, 16.0, 36),
    ];
    configs
        .iter()
        .enumerate()
        .map(|(i, &(scoring, method, n_group, topk_group, top_k, normalize, scaling, experts))| {
            let tokens = 5;
            let mut logits: Vec<f32> = random(40 + i as u64, tokens * experts).iter().map(|v| v * 4.0).collect();
            // The last token: all logits equal, so every choice is a tie broken by index.
            logits[4 * experts..].iter_mut().for_each(|v| *v = 0.25);
            let bias = (method == TopkMethod::NoauxTc).then(|| random(50 + i as u64, experts).iter().map(|v| v * 0.6).collect());
            RouterCase { params: RouterParams { scoring, method, n_group, topk_group, top_k, normalize, scaling }, experts, tokens, logits, bias }
        })
        .collect()
}

impl RouterCase {
    /// Asserts a GPU's ids and weights (`[tokens, top_k]`) are the CPU reference's choice.
    #[allow(dead_code)]
    pub fn check(&self, what: &str, ids: &[u32], weights: &[f32]) {
        let k = self.params.top_k;
        for t in 0..self.tokens {
            let want = dsrun::model::router::route(&self.logits[t * self.experts..][..self.experts], self.bias.as_deref(), &self.params);
            let want_ids: Vec<u32> = want.iter().map(|w| w.0 as u32).collect();
            assert_eq!(&ids[t * k..][..k], &want_ids[..], "{what} token {t}: expert ids");
            for (j, w) in want.iter().enumerate() {
                assert!((weights[t * k + j] - w.1).abs() <= 1e-5 * w.1.abs().max(1.0), "{what} token {t}: weight {j}");
            }
        }
    }
}

/// Prefill of the first half of `tokens`, then decode of the rest one by one, twice (the second
/// time with warm caches), all logits concatenated: the expert-streaming tests' workload.
#[allow(dead_code)]
pub fn prefill_then_decode_twice(engine: &mut dyn dsrun::engine::Engine, tokens: &[u32]) -> Vec<f32> {
    use dsrun::model::Logits;
    let half = tokens.len() / 2;
    let mut out = Vec::new();
    for _ in 0..2 {
        engine.reset();
        out.extend(engine.forward(&tokens[..half], Logits::All).unwrap());
        for &t in &tokens[half..] {
            out.extend(engine.forward(&[t], Logits::Last).unwrap());
        }
    }
    out
}

/// `prompt`, then greedy decoding token by token: the first `n` tokens chosen.
#[allow(dead_code)]
pub fn greedy_tokens(engine: &mut dyn dsrun::engine::Engine, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut out = vec![engine.forward_greedy(prompt).unwrap()];
    while out.len() < n {
        out.push(engine.forward_greedy(&[*out.last().unwrap()]).unwrap());
    }
    out
}

/// Sequences in the order batches take them (batch b decodes the first b): not 0, 1, 2.. so
/// a sequence's cache rows are not its place in the batch.
#[allow(dead_code)]
pub const BATCH_ORDER: [usize; 8] = [5, 1, 6, 0, 7, 2, 4, 3];
/// Decode steps of every batched-decoding check.
#[allow(dead_code)]
pub const BATCH_STEPS: usize = 4;

/// Batches of 1, 3 and 8 sequences with prompts of different lengths (1 to 9 tokens),
/// prefilled one by one and then decoded together greedily for `BATCH_STEPS` steps:
/// each sequence's logits in the batch must equal what `alone` (a one-sequence engine of the
/// same backend) computes for it (bitwise: every kernel computes a row the same way whatever
/// the rows beside it), and be within 1e-3 of the CPU reference's; the greedy ids the batched
/// argmax reads back must be those of the logits.
#[allow(dead_code)]
pub fn batched_decode_matches_alone(what: &str, batched: &mut dyn dsrun::engine::Engine, alone: &mut dyn dsrun::engine::Engine, cpu: &mut dyn dsrun::engine::Engine) {
    batched_decode_near_alone(what, batched, alone, cpu, 0.0)
}

/// As [`batched_decode_matches_alone`], the batch's logits within `tolerance` (relative) of
/// each sequence's alone instead of bitwise: for engines whose kernels sum one token's rows in
/// another order than several tokens' (the CPU's mat-vec against its grouped GEMM).
#[allow(dead_code)]
pub fn batched_decode_near_alone(what: &str, batched: &mut dyn dsrun::engine::Engine, alone: &mut dyn dsrun::engine::Engine, cpu: &mut dyn dsrun::engine::Engine, tolerance: f32) {
    use dsrun::model::Logits;
    let vocab = batched.config().vocab_size;
    let prompt = |seq: usize| -> Vec<u32> { (0..1 + (seq * 5) % 9).map(|j| ((seq * 7 + j * 13 + 1) % vocab) as u32).collect() };
    for b in [1usize, 3, 8] {
        batched.reset();
        let seqs = &BATCH_ORDER[..b];
        let mut next: Vec<u32> = seqs.iter().map(|&s| batched.greedy_seq(s, &prompt(s)).unwrap()).collect();
        let mut batch_logits = vec![Vec::new(); b];
        for step in 0..BATCH_STEPS {
            let batch: Vec<(usize, u32)> = seqs.iter().copied().zip(next.iter().copied()).collect();
            let logits = if step % 2 == 0 {
                batched.decode_batch(&batch).unwrap()
            } else {
                // Replayed on sequences truncated back one step, through the greedy path.
                let ids = batched.decode_batch_greedy(&batch).unwrap();
                seqs.iter().for_each(|&s| batched.truncate(s, batched.seq_len(s) - 1));
                let logits = batched.decode_batch(&batch).unwrap();
                let want: Vec<u32> = logits.chunks(vocab).map(|row| argmax(row) as u32).collect();
                assert_eq!(ids, want, "{what}: batch of {b}, step {step}: greedy ids are the logits' argmax");
                logits
            };
            for (i, row) in logits.chunks(vocab).enumerate() {
                batch_logits[i].extend_from_slice(row);
                next[i] = argmax(row) as u32;
            }
        }
        for (i, &seq) in seqs.iter().enumerate() {
            let mut tokens = prompt(seq);
            let (mut own, mut reference) = (Vec::new(), Vec::new());
            alone.reset();
            cpu.reset();
            let mut input = tokens.clone();
            for _ in 0..=BATCH_STEPS {
                let got = alone.forward(&input, Logits::Last).unwrap();
                let want = cpu.forward(&input, Logits::Last).unwrap();
                let t = argmax(&got) as u32;
                tokens.push(t);
                input = vec![t];
                own.push(got);
                reference.push(want);
            }
            let own: Vec<f32> = own[1..].concat();
            let reference: Vec<f32> = reference[1..].concat();
            let label = format!("{what}: sequence {seq} of a batch of {b}");
            let differ = if tolerance == 0.0 { own != batch_logits[i] } else { relative_error(&batch_logits[i], &own) > tolerance };
            assert!(!differ, "{label}: logits differ from decoding it alone (relative error {:e})", relative_error(&batch_logits[i], &own));
            assert_logits_match(&label, &batch_logits[i], &reference, vocab, 1e-3);
        }
    }
}

/// A test that cannot run its checks here says so in one place: stderr, and the file named by
/// `DSRUN_SKIPPED` (`.ci/run` sets it, prints it after the tests and fails on any `SKIPPED`
/// line: a test CI is meant to run never passes by returning early). `needs_nvidia`: what it
/// could not run needs hardware CI does not have (an NVIDIA GPU), reported as `NOT RUN`.
pub fn skip(test: &str, why: &str, needs_nvidia: bool) {
    let line = format!("{} {test}: {why}", if needs_nvidia { "NOT RUN" } else { "SKIPPED" });
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("DSRUN_SKIPPED") {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path).expect("DSRUN_SKIPPED is writable");
        writeln!(file, "{line}").expect("DSRUN_SKIPPED is writable");
    }
}
