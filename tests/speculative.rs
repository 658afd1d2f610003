//! Speculative decoding with the MTP layer (`--speculative mtp`): the draft logits on the GPU
//! against the torch reference, and greedy output token for token equal to plain greedy
//! decoding on every fixture family with an MTP layer, with 1 and 2 drafts per step, on the
//! CPU reference and on wgpu, resident and with streamed experts.

mod common;
use common::*;
use dsrun::backend::wgpu::context;
use dsrun::device::GpuChoice;
use dsrun::engine::{CpuEngine, Engine, Output, Pass, Step, Steps, Want};
use dsrun::model::{Logits, Model};
use dsrun::plan::budget::{ExpertPlacement, GpuMem, GpuOptions};
use dsrun::runtime::GpuModel;
use dsrun::speculative::{self, SpecStats};

/// Tokens generated and compared per case (more than the fixtures' context of golden tokens).
const GENERATED: usize = 64;

fn ctx() -> dsrun::backend::wgpu::GpuContext {
    context::open(GpuChoice::Auto).expect("a wgpu adapter (on Debian: apt-get install mesa-vulkan-drivers)")
}

/// Plain greedy decoding: `n` tokens after `prompt`.
fn plain_greedy(engine: &mut dyn Engine, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut out = vec![engine.forward_greedy(prompt).unwrap()];
    while out.len() < n {
        let last = *out.last().unwrap();
        out.push(engine.forward_greedy(&[last]).unwrap());
    }
    out
}

/// Greedy decoding through speculative rounds of `draft` drafts each.
fn speculative_greedy(engine: &mut dyn Engine, prompt: &[u32], n: usize, draft: usize) -> (Vec<u32>, SpecStats) {
    let logits = engine.forward_keep(0, prompt, Logits::Last).unwrap();
    let mut out = vec![argmax(&logits) as u32];
    let mut history = prompt.to_vec();
    history.push(out[0]);
    let mut stats = SpecStats::default();
    out.extend(speculative::greedy(engine, 0, &mut history, 0, n - 1, draft, &mut stats).unwrap());
    assert_eq!(out.len(), n, "rounds never emit more than asked for");
    assert_eq!(engine.seq_len(0) + 1, history.len(), "the cache holds every token but the last");
    (out, stats)
}

fn check_engine(what: &str, engine: &mut dyn Engine, prompt: &[u32], want: &[u32], draft: usize) {
    let (got, stats) = speculative_greedy(engine, prompt, want.len(), draft);
    eprintln!("{what}, {draft} drafted: {}", stats.summary(draft));
    assert_eq!(got, want, "{what}, {draft} drafted: speculative greedy differs from plain greedy");
    assert!(stats.steps > 0 && stats.drafted > 0, "{what}: {stats:?}");
    // Fewer steps than tokens unless no draft was ever accepted.
    assert_eq!(stats.steps as usize + stats.accepted as usize, want.len() - 1, "{what}: every token after the first came from a round");
}

#[test]
fn greedy_speculation_equals_plain_greedy_on_every_mtp_family() {
    for family in MTP_FAMILIES {
        let dir = fixture(family);
        let g = golden(&dir);
        let prompt = &g.tokens[..8];
        let capacity = prompt.len() + GENERATED + 1;
        let want = plain_greedy(&mut CpuEngine::new(Model::load(&dir).unwrap(), capacity), prompt, GENERATED);
        for draft in [1, 2] {
            let mut cpu = CpuEngine::new(Model::load(&dir).unwrap(), capacity).with_mtp().unwrap();
            check_engine(&format!("{family} on the CPU"), &mut cpu, prompt, &want, draft);

            let model = Model::load(&dir).unwrap();
            let options = GpuOptions { mtp: true, ..Default::default() };
            let mut gpu = GpuModel::with_options(ctx(), &model, capacity, &options).unwrap();
            assert!(gpu.has_mtp());
            let plain = plain_greedy(&mut GpuModel::with_options(ctx(), &model, capacity, &options).unwrap(), prompt, GENERATED);
            assert_eq!(plain, want, "{family}: plain greedy on the GPU differs from the CPU's");
            check_engine(&format!("{family} on wgpu"), &mut gpu, prompt, &want, draft);

            // Streamed experts: the verify step's tokens route to more experts, the MTP layer's
            // experts stream through the same cache.
            let memory = gpu.memory_plan();
            let options = GpuOptions { mtp: true, gpu_mem: GpuMem::Bytes(memory.minimum()), placement: ExpertPlacement::Stream, ..Default::default() };
            let mut streamed = GpuModel::with_options(ctx(), &model, capacity, &options).unwrap();
            assert!(streamed.expert_slots().is_some(), "{family}: the minimum budget streams");
            check_engine(&format!("{family} on wgpu, experts streamed"), &mut streamed, prompt, &want, draft);

            // Routed experts on the host, the MTP layer's too: the verify step's tokens grouped
            // by expert there.
            let options = GpuOptions { mtp: true, cpu_moe: usize::MAX, ..Default::default() };
            let mut hybrid = GpuModel::with_options(ctx(), &model, capacity, &options).unwrap();
            assert!(hybrid.host_layers().is_some());
            check_engine(&format!("{family} on wgpu + the host"), &mut hybrid, prompt, &want, draft);
        }
    }
}

/// The GPU's draft logits (fed the GPU's own hidden states) against the torch reference.
#[test]
fn gpu_draft_logits_match_the_reference() {
    for family in MTP_FAMILIES {
        let dir = fixture(family);
        let g = golden_mtp(&dir).unwrap();
        let model = Model::load(&dir).unwrap();
        let vocab = model.config.vocab_size;
        let n = g.tokens.len();
        let options = GpuOptions { mtp: true, ..Default::default() };
        let mut gpu = GpuModel::with_options(ctx(), &model, n, &options).unwrap();
        // Position by position: each prefix's main step, then the draft for its last row.
        let mut drafts = Vec::new();
        gpu.forward_keep(0, &g.tokens[..1], Logits::Last).unwrap();
        for i in 0..n - 1 {
            drafts.extend(gpu.draft(0, &g.tokens[i + 1..i + 2]).unwrap());
            if i + 2 < n {
                gpu.forward_keep(0, &g.tokens[i + 1..i + 2], Logits::Last).unwrap();
            }
        }
        eprintln!("{family}: GPU draft relative error {:e}", relative_error(&drafts, &g.logits));
        assert_logits_match(&format!("{family} GPU drafts"), &drafts, &g.logits, vocab, 1e-3);
    }
}

/// An engine whose drafts know the answer three times in four: the inner engine's MTP layer
/// still runs (its caches advance and roll back as in real use) but its logits are replaced by
/// a one-hot at the plain-greedy token, or at a wrong one. Random-weight MTP layers almost never
/// agree with their main model; this exercises accepting, rejecting and rolling back mixed
/// drafts in every position of a round.
struct Oracle<'a> {
    inner: &'a mut dyn Engine,
    /// The plain-greedy continuation and where it starts.
    want: Vec<u32>,
    prompt: usize,
    /// The last draft step's output.
    logits: Vec<f32>,
}

impl Oracle<'_> {
    fn one_hot(&self, position: usize) -> Vec<f32> {
        let vocab = self.inner.config().vocab_size;
        let i = position - self.prompt;
        let token = match self.want.get(i) {
            Some(&t) if (position as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 62 != 0 => t,
            Some(&t) => (t + 1) % vocab as u32,
            None => 0,
        };
        let mut logits = vec![0.0; vocab];
        logits[token as usize] = 10.0;
        logits
    }
}

impl Engine for Oracle<'_> {
    fn config(&self) -> &dsrun::config::ModelConfig {
        self.inner.config()
    }
    fn sequences(&self) -> usize {
        self.inner.sequences()
    }
    fn seq_len(&self, seq: usize) -> usize {
        self.inner.seq_len(seq)
    }
    fn truncate(&mut self, seq: usize, len: usize) {
        self.inner.truncate(seq, len)
    }
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }
    fn device_name(&self) -> String {
        self.inner.device_name()
    }
    fn mtp_len(&self, seq: usize) -> Option<usize> {
        self.inner.mtp_len(seq)
    }
    fn max_step_rows(&self) -> usize {
        self.inner.max_step_rows()
    }
    /// Draft steps: the inner engine's, then each span's last row replaced by the one-hot for
    /// the token it drafts (two positions after that row's).
    fn step(&mut self, step: &Step) -> dsrun::error::Result<Output<'_>> {
        if step.pass != Pass::Draft {
            return self.inner.step(step);
        }
        assert_eq!(step.want, Want::Logits(Logits::Last), "speculative decoding drafts from each span's last row");
        self.inner.step(step)?;
        self.logits.clear();
        for span in step.spans {
            let drafted = self.one_hot(span.position + span.tokens.len() + 1);
            self.logits.extend(drafted);
        }
        Ok(Output { logits: &self.logits, ids: &[] })
    }
}

#[test]
fn mixed_accepted_and_rejected_drafts_keep_greedy_output_exact() {
    for family in MTP_FAMILIES {
        let dir = fixture(family);
        let prompt = &golden(&dir).tokens[..8];
        let capacity = prompt.len() + GENERATED + 1;
        let want = plain_greedy(&mut CpuEngine::new(Model::load(&dir).unwrap(), capacity), prompt, GENERATED);
        for draft in [1, 2, 3] {
            let model = Model::load(&dir).unwrap();
            let mut cpu = CpuEngine::new(Model::load(&dir).unwrap(), capacity).with_mtp().unwrap();
            let mut gpu = GpuModel::with_options(ctx(), &model, capacity, &GpuOptions { mtp: true, ..Default::default() }).unwrap();
            let engines: [(&str, &mut dyn Engine); 2] = [("CPU", &mut cpu), ("wgpu", &mut gpu)];
            for (name, inner) in engines {
                let mut oracle = Oracle { inner, want: want.clone(), prompt: prompt.len(), logits: Vec::new() };
                let (got, stats) = speculative_greedy(&mut oracle, prompt, GENERATED, draft);
                let what = format!("{family} on {name}, {draft} drafted");
                eprintln!("{what}: {}", stats.summary(draft));
                assert_eq!(got, want, "{what}");
                assert!(stats.acceptance() > 0.3 && stats.accepted < stats.drafted, "{what}: {stats:?}");
            }
        }
    }
}
