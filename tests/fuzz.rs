//! Seeded mutation fuzzing of what a checkpoint brings: config.json values and the
//! safetensors header. Every case must end, within a deadline, in an error or in finite
//! logits: no panic, no hang, never silently wrong numbers. Deterministic (fixed seeds), a few
//! thousand cases, a few seconds.

mod common;
use dsrun::checkpoint::Checkpoint;
use dsrun::config::ModelConfig;
use dsrun::model::{Logits, Model};
use serde_json::{json, Value};
use std::time::Duration;

/// xorshift64*: the cases' random choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Runs `cases` on a worker thread; the test fails if they do not all finish in `deadline`
/// (a hang) or if one panics (the panic's message comes through).
fn within(deadline: Duration, cases: impl FnOnce() + Send + 'static) {
    let (done, wait) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        cases();
        let _ = done.send(());
    });
    match wait.recv_timeout(deadline) {
        Ok(()) => worker.join().unwrap(),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => std::panic::resume_unwind(worker.join().unwrap_err()),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("fuzz cases did not finish in {deadline:?}: a hang"),
    }
}

/// How far a case got: refused as a config, refused at load, failed in the forward pass, or
/// ran to finite logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Outcome {
    Config,
    Load,
    Forward,
    Finite,
}

/// A case ran: either an error, or a model whose logits for a short prompt are finite.
fn run_case(what: &str, config: Result<ModelConfig, dsrun::error::Error>, checkpoint: &Checkpoint) -> Outcome {
    let Ok(config) = config else { return Outcome::Config };
    let Ok(model) = Model::from_checkpoint(config, checkpoint) else { return Outcome::Load };
    let mut cache = model.new_cache(8);
    let tokens = [1u32, 2, 3];
    match model.forward(&mut cache, &tokens, Logits::All) {
        Ok(logits) => {
            assert!(logits.iter().all(|v| v.is_finite()), "{what}: non-finite logits returned as a success");
            Outcome::Finite
        }
        Err(_) => Outcome::Forward,
    }
}

/// Counts of each outcome, printed, and checked to cover both ends (the fuzz is not vacuous).
fn report(what: &str, outcomes: &[Outcome]) {
    let count = |o: Outcome| outcomes.iter().filter(|&&x| x == o).count();
    eprintln!(
        "{what}: {} cases: {} refused as config, {} at load, {} in the forward pass, {} finite",
        outcomes.len(),
        count(Outcome::Config),
        count(Outcome::Load),
        count(Outcome::Forward),
        count(Outcome::Finite)
    );
    assert!(count(Outcome::Finite) + count(Outcome::Forward) > outcomes.len() / 50, "{what}: too few cases ran the model");
}

#[test]
fn mutated_configs_end_in_an_error_or_finite_logits() {
    let dir = common::fixture("v3_noaux");
    let base: Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    within(Duration::from_secs(240), move || {
        let checkpoint = Checkpoint::open(&dir).unwrap();
        let keys: Vec<String> = base.as_object().unwrap().keys().cloned().collect();
        let values = [
            json!(0),
            json!(1),
            json!(2),
            json!(-1),
            json!(3),
            json!(7),
            json!(1u64 << 31),
            json!(1u64 << 62),
            json!(1_000_000_000_000_000_000u64),
            json!(u64::MAX),
            json!(0.5),
            json!(1e-30),
            json!(1e308),
            json!(-1e308),
            json!(null),
            json!(true),
            json!("x"),
            json!("NaN"),
            json!([]),
            json!({}),
            json!({"type": "yarn", "factor": 0}),
            json!({"type": "yarn", "factor": 4, "original_max_position_embeddings": 16, "beta_fast": 0}),
        ];
        let mut rng = Rng(0x5eed);
        let mut outcomes = Vec::new();
        for case in 0..3000 {
            let mut config = base.clone();
            // One to three keys changed per case.
            for _ in 0..1 + rng.below(3) {
                let key = &keys[rng.below(keys.len())];
                config[key] = values[rng.below(values.len())].clone();
            }
            outcomes.push(run_case(&format!("config case {case}: {config}"), ModelConfig::from_json(&config), &checkpoint));
        }
        report("config.json", &outcomes);
    });
}

#[test]
fn mutated_safetensors_headers_end_in_an_error_or_finite_logits() {
    let fixture = common::fixture("v3_noaux");
    let bytes = std::fs::read(fixture.join("model.safetensors")).unwrap();
    let config = ModelConfig::from_file(&fixture.join("config.json")).unwrap();
    within(Duration::from_secs(240), move || {
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let mut rng = Rng(0xfeed);
        let mut outcomes = Vec::new();
        for case in 0..1500 {
            let mut mutated = bytes.clone();
            match rng.below(6) {
                // A few bytes of the header replaced: digits, quotes, brackets or anything.
                0 | 1 => {
                    for _ in 0..1 + rng.below(4) {
                        let at = 8 + rng.below(header_len);
                        mutated[at] = b"0123456789[]{}\",:-eE \x00\xff"[rng.below(22)];
                    }
                }
                // The header length itself.
                2 => {
                    let len = [0u64, 1, 7, header_len as u64 - 1, header_len as u64 + 1, u64::MAX, 1 << 40][rng.below(7)];
                    mutated[..8].copy_from_slice(&len.to_le_bytes());
                }
                // Bytes of tensor data (weights, norms, biases) replaced: non-finite values
                // among them must be refused at load or reported by the forward pass.
                4 | 5 => {
                    for _ in 0..1 + rng.below(8) {
                        let at = 8 + header_len + rng.below(mutated.len() - 8 - header_len);
                        mutated[at] = [0x7f, 0xff, 0x80, 0x00, rng.below(256) as u8][rng.below(5)];
                    }
                }
                // The file cut short or grown.
                _ => {
                    let cut = rng.below(mutated.len());
                    if rng.below(2) == 0 {
                        mutated.truncate(cut);
                    } else {
                        mutated.extend(std::iter::repeat_n(0u8, cut % 4096 + 1));
                    }
                }
            }
            std::fs::write(&path, &mutated).unwrap();
            outcomes.push(match Checkpoint::open(dir.path()) {
                Err(_) => Outcome::Load,
                Ok(checkpoint) => run_case(&format!("header case {case}"), Ok(config.clone()), &checkpoint),
            });
        }
        report("safetensors header", &outcomes);
    });
}
