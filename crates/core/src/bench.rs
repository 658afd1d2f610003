//! `dsrun bench`: prompt-processing and generation speed the way llama-bench reports it, as
//! tokens per second, mean and standard deviation over repetitions, after a warm-up.

use crate::engine::{Engine, Steps};
use crate::error::Result;
use crate::model::Logits;
use crate::speculative::{self, SpecStats};
use serde_json::json;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct BenchPlan {
    /// Prompt tokens processed in one call (0: skip the test).
    pub prompt: usize,
    /// Tokens generated one at a time from an empty context (0: skip the test).
    pub generate: usize,
    pub repetitions: usize,
    /// Sequences decoded together for the batched generation tests (`tg128x8`): one step
    /// runs one token of each. 1 is the plain generation test.
    pub parallel: Vec<usize>,
    /// Tokens already in each sequence's cache when a test starts (llama-bench's `-d`); the
    /// filling is not timed.
    pub depth: usize,
    /// Drafts per step for a speculative generation test beside the plain one (0: none; the
    /// engine must have its MTP layer loaded).
    pub draft: usize,
}

/// One test (`pp512`, `tg128`): tokens per second of each repetition.
#[derive(Debug, Clone)]
pub struct TestResult {
    pub name: String,
    pub tokens: usize,
    pub samples: Vec<f64>,
    /// Speculative decoding's counters over every repetition, and its drafts per step.
    pub speculative: Option<(SpecStats, usize)>,
}

impl TestResult {
    pub fn mean(&self) -> f64 {
        self.samples.iter().sum::<f64>() / self.samples.len().max(1) as f64
    }

    /// Sample standard deviation (0 for a single repetition).
    pub fn std(&self) -> f64 {
        let n = self.samples.len();
        if n < 2 {
            return 0.0;
        }
        let m = self.mean();
        (self.samples.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    }
}

/// Token ids that cover the vocabulary without favouring any (no tokenizer needed).
pub fn prompt_tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i as u64 * 7919 + 11) % vocab as u64) as u32).collect()
}

/// Empties every sequence and fills the first `sequences` with `depth` tokens (untimed). Each
/// fill reads back its last logits, so the device has finished it before the clock starts.
fn fill(engine: &mut dyn Engine, sequences: usize, depth: usize) -> Result<()> {
    engine.reset();
    if depth > 0 {
        let tokens = prompt_tokens(depth, engine.config().vocab_size);
        (0..sequences).try_for_each(|s| engine.forward_seq(s, &tokens, Logits::Last).map(|_| ()))?;
    }
    Ok(())
}

/// A test's name: `pp512`, `tg128x8`, with llama-bench's ` @ d4096` when at depth.
fn test_name(base: String, depth: usize) -> String {
    if depth > 0 {
        format!("{base} @ d{depth}")
    } else {
        base
    }
}

/// Runs the plan on `engine` (its capacity at least `depth + max(prompt, generate, 9)` tokens, and
/// as many sequences as the most `parallel`); work counters are reset after the warm-up, so
/// they describe the measured runs (and, at a depth, the filling). `progress` hears each
/// test's name as it starts.
pub fn run(engine: &mut dyn Engine, plan: &BenchPlan, progress: &mut dyn FnMut(&str)) -> Result<Vec<TestResult>> {
    let vocab = engine.config().vocab_size;
    let prompt = prompt_tokens(plan.prompt, vocab);
    // Warm-up: the first dispatch of each pipeline compiles on lazy drivers, an expert cache
    // starts cold, and a memory-mapped checkpoint's pages are mapped on first touch. A prompt
    // nearly as long as the longest test (up to 63 tokens, and one decoded after it: the
    // capacity holds them) routes to most experts, so a decode test run alone does not pay for
    // mapping the others' pages in its first repetition.
    let warm = plan.prompt.max(plan.generate).clamp(9, 64) - 1;
    engine.reset();
    engine.forward(&prompt_tokens(warm, vocab), Logits::Last)?;
    engine.forward_greedy(&[1 % vocab as u32])?;
    if plan.draft > 0 {
        // The MTP layer's and the verify step's pipelines.
        engine.reset();
        speculative::greedy(engine, 0, &mut vec![1 % vocab as u32], 0, 3 * (plan.draft + 1), plan.draft, &mut SpecStats::default())?;
    }
    engine.reset();
    engine.reset_counters();

    let mut results = Vec::new();
    let depth = plan.depth;
    if plan.prompt > 0 {
        let name = test_name(format!("pp{}", plan.prompt), depth);
        progress(&name);
        let mut samples = Vec::new();
        for _ in 0..plan.repetitions {
            fill(engine, 1, depth)?;
            let started = Instant::now();
            engine.forward(&prompt, Logits::Last)?;
            samples.push(plan.prompt as f64 / started.elapsed().as_secs_f64());
        }
        results.push(TestResult { name, tokens: plan.prompt, samples, speculative: None });
    }
    if plan.generate > 0 && plan.parallel.contains(&1) {
        let name = test_name(format!("tg{}", plan.generate), depth);
        progress(&name);
        let mut samples = Vec::new();
        for _ in 0..plan.repetitions {
            fill(engine, 1, depth)?;
            let mut next = 1 % vocab as u32;
            let started = Instant::now();
            for _ in 0..plan.generate {
                next = engine.forward_greedy(&[next])?;
            }
            samples.push(plan.generate as f64 / started.elapsed().as_secs_f64());
        }
        results.push(TestResult { name, tokens: plan.generate, samples, speculative: None });
    }
    if plan.generate > 0 && plan.draft > 0 {
        results.push(speculative_generation(engine, plan, progress)?);
    }
    for &sequences in plan.parallel.iter().filter(|&&p| p > 1 && plan.generate > 0) {
        let name = test_name(format!("tg{}x{sequences}", plan.generate), depth);
        progress(&name);
        let mut samples = Vec::new();
        for _ in 0..plan.repetitions {
            fill(engine, sequences, depth)?;
            let mut batch: Vec<(usize, u32)> = (0..sequences).map(|s| (s, (1 + s as u32) % vocab as u32)).collect();
            let started = Instant::now();
            for _ in 0..plan.generate {
                let ids = engine.decode_batch_greedy(&batch)?;
                batch.iter_mut().zip(ids).for_each(|(b, id)| b.1 = id);
            }
            // Aggregate: every sequence's tokens.
            samples.push((plan.generate * sequences) as f64 / started.elapsed().as_secs_f64());
        }
        results.push(TestResult { name, tokens: plan.generate * sequences, samples, speculative: None });
    }
    Ok(results)
}

/// The generation test with speculative decoding (greedy, `plan.draft` MTP drafts per step):
/// the same tokens as the plain test, in fewer steps where drafts are accepted.
fn speculative_generation(engine: &mut dyn Engine, plan: &BenchPlan, progress: &mut dyn FnMut(&str)) -> Result<TestResult> {
    let vocab = engine.config().vocab_size;
    let name = test_name(format!("tg{} mtp", plan.generate), plan.depth);
    progress(&name);
    let mut samples = Vec::new();
    let mut total = SpecStats::default();
    for _ in 0..plan.repetitions {
        engine.reset();
        let mut history = prompt_tokens(plan.depth, vocab);
        if plan.depth > 0 {
            engine.forward_keep(0, &history, Logits::Last)?;
        }
        history.push(1 % vocab as u32);
        let mut stats = SpecStats::default();
        let started = Instant::now();
        speculative::greedy(engine, 0, &mut history, 0, plan.generate, plan.draft, &mut stats)?;
        samples.push(plan.generate as f64 / started.elapsed().as_secs_f64());
        total.add(&stats);
    }
    Ok(TestResult { name, tokens: plan.generate, samples, speculative: Some((total, plan.draft)) })
}

/// What was measured, for the report's header.
pub struct BenchSetup {
    pub model: String,
    pub params: u64,
    pub weights: String,
    pub device: String,
    pub quant: String,
    pub gpu_mem: String,
    pub kv_cache: String,
    pub counters: Option<String>,
}

pub fn table(setup: &BenchSetup, results: &[TestResult]) -> String {
    let mut out = format!(
        "model {} ({} params, {}) | {} | quant {} | gpu-mem {} | kv-cache {}\n",
        setup.model,
        crate::util::human_count(setup.params),
        setup.weights,
        setup.device,
        setup.quant,
        setup.gpu_mem,
        setup.kv_cache
    );
    out += &format!("{:<18} {:>12} {:>10} {:>5}\n", "test", "tok/s", "± std", "reps");
    for r in results {
        out += &format!("{:<18} {:>12.2} {:>10.2} {:>5}\n", r.name, r.mean(), r.std(), r.samples.len());
    }
    for r in results {
        if let Some((spec, draft)) = &r.speculative {
            out += &format!("{}: {}\n", r.name, spec.summary(*draft));
        }
    }
    if let Some(c) = &setup.counters {
        out += c;
        out += "\n";
    }
    out
}

pub fn json(setup: &BenchSetup, results: &[TestResult]) -> serde_json::Value {
    json!({
        "model": setup.model,
        "params": setup.params,
        "weights": setup.weights,
        "device": setup.device,
        "quant": setup.quant,
        "gpu_mem": setup.gpu_mem,
        "kv_cache": setup.kv_cache,
        "tests": results.iter().map(|r| json!({
            "name": r.name,
            "tokens": r.tokens,
            "tok_per_s_mean": r.mean(),
            "tok_per_s_std": r.std(),
            "samples": r.samples,
            "speculative": r.speculative.map(|(s, draft)| json!({
                "draft": draft,
                "acceptance": s.acceptance(),
                "tokens_per_step": s.tokens_per_step(),
                "steps": s.steps,
                "drafted": s.drafted,
                "accepted": s.accepted,
            })),
        })).collect::<Vec<_>>(),
        "counters": setup.counters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_std() {
        let r = TestResult { name: "pp4".into(), tokens: 4, samples: vec![2.0, 4.0, 6.0], speculative: None };
        assert_eq!(r.mean(), 4.0);
        assert_eq!(r.std(), 2.0);
        assert_eq!(TestResult { samples: vec![5.0], ..r }.std(), 0.0);
    }

    #[test]
    fn prompt_tokens_stay_in_the_vocabulary() {
        assert!(prompt_tokens(1000, 37).iter().all(|&t| t < 37));
    }
}
