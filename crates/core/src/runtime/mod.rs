//! The model on a GPU backend, written once for all of them: a plan is built for the backend's
//! limits, its buffers and weights are made on the device, every op is lowered once, and a step
//! is: write the per-step values and token ids, record the lowered ops (stopping at each MoE
//! layer for the router's choice when experts are streamed), read back the logits or the greedy
//! id. Prompts longer than a step's room run in chunks.

mod lab;
mod streaming;

pub use lab::Lab;
pub use streaming::{StreamedLayer, Streaming};

use crate::backend::{Backend, IntoBackend, Part, Resources, StepKind, StepValues};
use crate::config::ModelConfig;
use crate::engine::{check_batch, check_sequence, Engine};
use crate::error::Result;
use crate::expert_cache::StreamCounters;
use crate::model::weights::Matrix;
use crate::model::{check_request, Logits, Model};
use crate::plan::budget::{GpuOptions, MemoryPlan};
use crate::plan::{self, BufferId, Op, Plan, WeightSpec};
use crate::quant::QuantTarget;
use crate::util::{Choice, Progress, Silent};
use rayon::prelude::*;
use std::time::Instant;

/// The model on a wgpu device.
pub type GpuModel = Runtime<crate::backend::wgpu::WgpuBackend>;

/// The model on a CUDA device.
#[cfg(feature = "cuda")]
pub type CudaModel = Runtime<crate::backend::cuda::CudaBackend>;

/// Counters for `--verbose` stats (the backend keeps its own beside them).
#[derive(Debug, Default, Clone, Copy)]
pub struct RunCounters {
    /// Engine calls (a prompt, a decoded token).
    pub steps: u64,
    pub tokens: u64,
    pub step_seconds: f64,
    pub readback_bytes: u64,
}

/// The MTP layer's lowered ops, and how far each sequence's drafts have come.
struct MtpRuntime<B: Backend> {
    body: Vec<B::Op>,
    head_last: Vec<B::Op>,
    head_all: Vec<B::Op>,
    /// The main heads followed by the final norm into the MTP's input (`MtpPlan::keep_hidden`):
    /// none, last row, every row.
    keep: [Vec<B::Op>; 3],
    /// Per sequence: positions whose MTP cache rows come from the main model's hidden states.
    lens: Vec<usize>,
    /// Per sequence: chained drafts beyond `lens` (their rows are dropped by the next draft).
    chained: Vec<usize>,
    /// The main step whose hidden states the MTP input buffer holds, in its row order:
    /// (sequence, first position, rows) per sequence it ran.
    kept: Vec<(usize, usize, usize)>,
    /// The sequence whose last draft's output the buffer's row 0 holds (a chained draft's input).
    drafted: Option<usize>,
}

pub struct Runtime<B: Backend> {
    backend: B,
    res: Resources<B>,
    config: ModelConfig,
    body: Vec<B::Op>,
    head_last: Vec<B::Op>,
    head_all: Vec<B::Op>,
    argmax: Vec<B::Op>,
    tokens: BufferId,
    positions: BufferId,
    logits: BufferId,
    argmax_ids: BufferId,
    /// Routed experts in a device slot cache, when they do not all fit the budget.
    streaming: Option<Streaming<B>>,
    /// The main model's streamed MoE layers (the first of `streaming.layers`; the MTP layer's
    /// follows).
    main_stops: usize,
    /// The MTP layer's step, where the plan has one.
    mtp: Option<MtpRuntime<B>>,
    memory: MemoryPlan,
    max_chunk: usize,
    capacity: usize,
    /// Tokens cached per sequence; sequence s owns latent cache rows `s * capacity ..`.
    lens: Vec<usize>,
    /// The step's token ids and (position, first cache row) pairs, kept between steps so a
    /// step allocates nothing.
    step_tokens: Vec<u32>,
    step_positions: Vec<u32>,
    weight_bytes: u64,
    pub counters: RunCounters,
}

impl<B: Backend> Runtime<B> {
    /// `model` on `device` with room for `capacity` tokens, weights converted to `quant`
    /// unless kept, everything resident that fits the device.
    pub fn new(device: impl IntoBackend<B>, model: &Model, capacity: usize, quant: QuantTarget) -> Result<Self> {
        Self::with_options(device, model, capacity, &GpuOptions::with_quant(quant))
    }

    /// As `new`, with a memory budget (`--gpu-mem`): routed experts that do not fit stream
    /// through a device cache.
    pub fn with_options(device: impl IntoBackend<B>, model: &Model, capacity: usize, options: &GpuOptions) -> Result<Self> {
        Self::load(device, model, capacity, options, &Silent)
    }

    /// As `with_options`, reporting the weights loaded (and converted) to `progress`.
    pub fn load(device: impl IntoBackend<B>, model: &Model, capacity: usize, options: &GpuOptions, progress: &dyn Progress) -> Result<Self> {
        let mut backend: B = device.into_backend()?;
        let target = backend.target(&model.config, capacity)?;
        let plan = plan::build(model, capacity, options, &target)?;
        Self::from_plan(backend, model, &plan, progress)
    }

    /// Makes `plan` (built for `model` and this backend's target) on the device and lowers it.
    pub fn from_plan(backend: B, model: &Model, plan: &Plan, progress: &dyn Progress) -> Result<Self> {
        let mut backend = backend;
        let loaded = backend.checked(|b| Loaded::new(b, model, plan, progress))?;
        let Loaded { res, body, head_last, head_all, argmax, streaming, main_stops, mtp, weight_bytes } = loaded;
        if let Some(s) = &streaming {
            log::info!(
                "expert streaming: {} slots of {} ({} pools) for {} experts; budget {}, resident {}",
                s.slots(),
                crate::util::human_bytes(s.slot_bytes()),
                s.pools(),
                plan.memory.experts,
                crate::util::human_bytes(plan.budget),
                crate::util::human_bytes(plan.memory.resident)
            );
        }
        Ok(Runtime {
            backend,
            res,
            config: model.config.clone(),
            body,
            head_last,
            head_all,
            argmax,
            tokens: plan.tokens,
            positions: plan.positions,
            logits: plan.logits,
            argmax_ids: plan.argmax_ids,
            streaming,
            main_stops,
            mtp: mtp.map(|(body, [head_last, head_all], keep)| MtpRuntime {
                body,
                head_last,
                head_all,
                keep,
                lens: vec![0; plan.sequences],
                chained: vec![0; plan.sequences],
                kept: Vec::new(),
                drafted: None,
            }),
            memory: plan.memory,
            max_chunk: plan.max_chunk,
            capacity: plan.capacity,
            lens: vec![0; plan.sequences],
            step_tokens: Vec::with_capacity(plan.max_chunk),
            step_positions: Vec::with_capacity(2 * plan.max_chunk),
            weight_bytes,
            counters: RunCounters::default(),
        })
    }

    /// The backend the model runs on (its device, its compiled kernels).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Most tokens one step processes; longer prompts run in chunks.
    pub fn max_chunk(&self) -> usize {
        self.max_chunk
    }

    /// What the model needs on the device: resident bytes and routed-expert bytes.
    pub fn memory_plan(&self) -> MemoryPlan {
        self.memory
    }

    /// Expert-cache slots, when routed experts are streamed.
    pub fn expert_slots(&self) -> Option<usize> {
        self.streaming.as_ref().map(|s| s.slots())
    }

    /// Expert-cache pools (each fits one binding), when routed experts are streamed.
    pub fn expert_pools(&self) -> Option<usize> {
        self.streaming.as_ref().map(|s| s.pools())
    }

    pub fn stream_counters(&self) -> Option<StreamCounters> {
        self.streaming.as_ref().map(|s| s.counters)
    }

    /// One step of the tokens in `step_tokens`, at the positions in `step_positions` (at most
    /// `max_chunk`), of the main model or the MTP layer (`part`). `head`: which logits to
    /// compute, if any (the MTP layer: only the last row's); `greedy`: also take the argmax of
    /// each computed row. Returns the read-back bytes.
    fn step(&mut self, part: Part, head: Option<Logits>, greedy: bool) -> Result<&[u8]> {
        let n = self.step_tokens.len() as u32;
        let b = &mut self.backend;
        b.begin_step(StepValues::new(n))?;
        b.write(self.res.buf(self.tokens), bytemuck::cast_slice(&self.step_tokens))?;
        b.write(self.res.buf(self.positions), bytemuck::cast_slice(&self.step_positions))?;
        let rows = match head {
            None => 0,
            Some(Logits::Last) => 1,
            Some(Logits::All) => n,
        };
        let mtp = self.mtp.as_ref();
        let missing = || crate::Error::Invalid("this engine was built without the MTP layer (--speculative off)".into());
        let (body, head_ops, stops) = match part {
            Part::Main => {
                let head_ops = match head {
                    None => &[][..],
                    Some(Logits::Last) => &self.head_last[..],
                    Some(Logits::All) => &self.head_all[..],
                };
                (&self.body, head_ops, 0..self.main_stops)
            }
            Part::MainKeepingHidden => {
                let keep = &mtp.ok_or_else(missing)?.keep;
                let head_ops = match head {
                    None => &keep[0],
                    Some(Logits::Last) => &keep[1],
                    Some(Logits::All) => &keep[2],
                };
                (&self.body, &head_ops[..], 0..self.main_stops)
            }
            Part::Mtp => {
                let m = mtp.ok_or_else(missing)?;
                let head_ops = match head {
                    None => &[][..],
                    Some(Logits::Last) => &m.head_last[..],
                    Some(Logits::All) => &m.head_all[..],
                };
                (&m.body, head_ops, self.main_stops..self.streaming.as_ref().map_or(0, |s| s.layers.len()))
            }
        };
        let argmax = if greedy { &self.argmax[..] } else { &[][..] };
        match &mut self.streaming {
            None => b.record_step(StepKind { head, greedy, part }, [(body, n), (head_ops, n), (argmax, rows)])?,
            Some(streaming) => {
                // The step stops at each MoE layer's router for its choice.
                let mut done = 0;
                for layer in stops {
                    let at = streaming.layers[layer].at;
                    b.record(&body[done..at], n)?;
                    streaming.sync(b, &self.res, layer, n)?;
                    done = at;
                }
                b.record(&body[done..], n)?;
                b.record(head_ops, n)?;
                b.record(argmax, rows)?;
            }
        }
        let bytes = rows as usize * if greedy { 4 } else { self.config.vocab_size * 4 };
        self.counters.readback_bytes += bytes as u64;
        if bytes == 0 {
            b.flush()?;
            return Ok(&[]);
        }
        let src = self.res.buf(if greedy { self.argmax_ids } else { self.logits });
        let read = b.read(&[(src, bytes)])?;
        // Non-finite logits are an error naming their position, never a token: the argmax
        // flags a row holding one, read-back logits are scanned here (a pass over what came
        // back, small beside the step).
        let first = n - rows;
        let position = |r: usize| self.step_positions[2 * (first as usize + r)] as usize;
        if greedy {
            if let Some(r) = read.chunks_exact(4).position(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == crate::model::NON_FINITE_ID) {
                return Err(crate::model::non_finite_logits(position(r)));
            }
        } else if read.chunks_exact(4).any(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()) {
            let floats: Vec<f32> = f32s(read).collect();
            crate::model::check_logits(&floats, self.config.vocab_size, position)?;
        }
        Ok(read)
    }

    /// Runs `tokens` of sequence `seq` in chunks, handing each chunk's read-back bytes to
    /// `sink`; only the last chunk computes the head unless all logits are wanted (`which`
    /// None: no head at all). `keep`: the chunks also keep their hidden states for the MTP
    /// layer, which runs over every chunk but the last as soon as the next tokens are known
    /// (the last chunk's rows wait for `draft`, which brings the token after the prompt).
    fn run(&mut self, seq: usize, tokens: &[u32], which: Option<Logits>, greedy: bool, keep: bool, mut sink: impl FnMut(&[u8])) -> Result<()> {
        check_sequence(seq, self.lens.len())?;
        check_request(&self.config, self.lens[seq], self.capacity, tokens)?;
        if keep {
            self.check_mtp_caught_up(seq)?;
        }
        let started = Instant::now();
        self.counters.steps += 1;
        self.counters.tokens += tokens.len() as u64;
        let chunks = tokens.len().div_ceil(self.max_chunk);
        let first_row = (seq * self.capacity) as u32;
        for (i, chunk) in tokens.chunks(self.max_chunk).enumerate() {
            let head = match which {
                Some(Logits::All) => Some(Logits::All),
                Some(Logits::Last) if i + 1 == chunks => Some(Logits::Last),
                _ => None,
            };
            let start = self.lens[seq];
            self.set_step(chunk, start, first_row);
            let part = if keep { Part::MainKeepingHidden } else { Part::Main };
            sink(self.step(part, head, greedy)?);
            self.lens[seq] += chunk.len();
            if let Some(m) = &mut self.mtp {
                if keep {
                    m.kept = vec![(seq, start, chunk.len())];
                    m.drafted = None;
                }
            }
            if keep && i + 1 < chunks {
                let offset = i * self.max_chunk;
                let next = tokens[offset + 1..offset + chunk.len() + 1].to_vec();
                self.draft_step(seq, &next, None)?;
            }
        }
        self.counters.step_seconds += started.elapsed().as_secs_f64();
        Ok(())
    }

    /// The step's tokens and their (position, first cache row) pairs, from position `start`.
    fn set_step(&mut self, tokens: &[u32], start: usize, first_row: u32) {
        self.step_tokens.clear();
        self.step_tokens.extend_from_slice(tokens);
        self.step_positions.clear();
        let start = start as u32;
        self.step_positions.extend((start..start + tokens.len() as u32).flat_map(|p| [p, first_row]));
    }

    /// The MTP layer holds every position of `seq` the main model has run (kept steps need it).
    fn check_mtp_caught_up(&self, seq: usize) -> Result<()> {
        let m = self.mtp.as_ref().ok_or_else(|| crate::Error::Invalid("this engine was built without the MTP layer (--speculative off)".into()))?;
        if m.lens[seq] != self.lens[seq] {
            return Err(crate::Error::Invalid(format!(
                "sequence {seq}: the MTP layer has run {} of its {} positions (their hidden states are gone); truncate it to a common length first",
                m.lens[seq], self.lens[seq]
            )));
        }
        Ok(())
    }

    /// The MTP layer over the positions of `seq` the last kept main step ran and the MTP has
    /// not, row i paired with `next[i]` (`chain`: None), or one chained draft from the last
    /// draft's output at the position after it (`chain`: Some(token)). Returns the last row's
    /// draft logits where `chain` is set or `next` ends at the main model's length.
    fn draft_step(&mut self, seq: usize, next: &[u32], chain: Option<u32>) -> Result<Vec<f32>> {
        check_sequence(seq, self.lens.len())?;
        let main_len = self.lens[seq];
        let m = self.mtp.as_mut().ok_or_else(|| crate::Error::Invalid("this engine was built without the MTP layer (--speculative off)".into()))?;
        let (tokens, start) = match chain {
            None => {
                let start = m.lens[seq];
                // This sequence's rows must be the kept step's first (the MTP step reads from row 0).
                let ok = matches!(m.kept.first(), Some(&(s, first, rows)) if s == seq && first == start && main_len <= first + rows);
                if !ok || next.len() != main_len - start || next.is_empty() {
                    return Err(crate::Error::Invalid(format!(
                        "sequence {seq}: a draft needs the hidden states of positions {start}..{main_len} from the last main step and one next token for each ({} given)",
                        next.len()
                    )));
                }
                m.chained[seq] = 0;
                (next.to_vec(), start)
            }
            Some(token) => {
                if m.drafted != Some(seq) {
                    return Err(crate::Error::Invalid(format!("sequence {seq}: a chained draft follows a draft of the same sequence")));
                }
                (vec![token], m.lens[seq] + m.chained[seq])
            }
        };
        check_request(&self.config, start, self.capacity, &tokens)?;
        self.set_step(&tokens, start, (seq * self.capacity) as u32);
        let bytes = self.step(Part::Mtp, Some(Logits::Last), false)?;
        let logits: Vec<f32> = f32s(bytes).collect();
        let m = self.mtp.as_mut().expect("checked above");
        match chain {
            None => m.lens[seq] = start + tokens.len(),
            Some(_) => m.chained[seq] += 1,
        }
        m.kept.clear();
        m.drafted = Some(seq);
        Ok(logits)
    }

    /// One verify step of several sequences (`Engine::verify_batch`): each sequence's tokens at
    /// its next positions, every row's logits, the hidden states kept for `draft_rows`.
    fn verify_rows(&mut self, batch: &[(usize, Vec<u32>)]) -> Result<Vec<f32>> {
        let total: usize = batch.iter().map(|(_, t)| t.len()).sum();
        if batch.is_empty() || total > self.max_chunk {
            return Err(crate::Error::Invalid(format!("a verify step of {total} tokens: 1 to {} per step", self.max_chunk)));
        }
        for (i, (seq, tokens)) in batch.iter().enumerate() {
            check_sequence(*seq, self.lens.len())?;
            check_request(&self.config, self.lens[*seq], self.capacity, tokens)?;
            self.check_mtp_caught_up(*seq)?;
            if batch[..i].iter().any(|(s, _)| s == seq) {
                return Err(crate::Error::Invalid(format!("sequence {seq} appears twice in one batch")));
            }
        }
        let started = Instant::now();
        self.counters.steps += 1;
        self.counters.tokens += total as u64;
        self.step_tokens.clear();
        self.step_positions.clear();
        let mut kept = Vec::with_capacity(batch.len());
        for (seq, tokens) in batch {
            let start = self.lens[*seq];
            self.step_tokens.extend_from_slice(tokens);
            self.step_positions.extend((start..start + tokens.len()).flat_map(|p| [p as u32, (seq * self.capacity) as u32]));
            kept.push((*seq, start, tokens.len()));
        }
        let logits: Vec<f32> = f32s(self.step(Part::MainKeepingHidden, Some(Logits::All), false)?).collect();
        for (seq, tokens) in batch {
            self.lens[*seq] += tokens.len();
        }
        let m = self.mtp.as_mut().expect("checked by check_mtp_caught_up");
        m.kept = kept;
        m.drafted = None;
        self.counters.step_seconds += started.elapsed().as_secs_f64();
        Ok(logits)
    }

    /// The MTP layer over every row of the last verify step (`Engine::draft_batch`): sequence
    /// s's rows up to its (possibly truncated) length pair with `next`, the rows past it (its
    /// rejected drafts, whose cache rows the next step overwrites before anything reads them)
    /// repeat its last token; one draft row per sequence comes back.
    fn draft_rows(&mut self, batch: &[(usize, Vec<u32>)]) -> Result<Vec<f32>> {
        let m = self.mtp.as_ref().ok_or_else(|| crate::Error::Invalid("this engine was built without the MTP layer (--speculative off)".into()))?;
        let kept = m.kept.clone();
        let same = kept.len() == batch.len() && kept.iter().zip(batch).all(|(k, (s, _))| k.0 == *s);
        if !same {
            return Err(crate::Error::Invalid("a batched draft takes the sequences of the last verify step, in its order".into()));
        }
        self.step_tokens.clear();
        self.step_positions.clear();
        let mut wanted = Vec::with_capacity(batch.len());
        for (&(seq, first, rows), (_, next)) in kept.iter().zip(batch) {
            let ran = self.lens[seq];
            if m.lens[seq] != first || next.len() != ran - first || next.is_empty() || ran > first + rows {
                return Err(crate::Error::Invalid(format!("sequence {seq}: a draft needs one next token for each of positions {first}..{ran} ({} given)", next.len())));
            }
            check_request(&self.config, first, self.capacity, next)?;
            wanted.push(self.step_tokens.len() + next.len() - 1);
            self.step_tokens.extend_from_slice(next);
            self.step_tokens.extend(std::iter::repeat(next[next.len() - 1]).take(rows - next.len()));
            self.step_positions.extend((first..first + rows).flat_map(|p| [p as u32, (seq * self.capacity) as u32]));
        }
        let vocab = self.config.vocab_size;
        let all: Vec<f32> = f32s(self.step(Part::Mtp, Some(Logits::All), false)?).collect();
        let m = self.mtp.as_mut().expect("checked above");
        for (seq, _) in batch {
            m.lens[*seq] = self.lens[*seq];
            m.chained[*seq] = 0;
        }
        m.kept.clear();
        m.drafted = None;
        Ok(wanted.iter().flat_map(|&r| all[r * vocab..(r + 1) * vocab].iter().copied()).collect())
    }

    /// One token of each sequence in `batch` as one step: every row's logits (or argmax).
    fn run_batch(&mut self, batch: &[(usize, u32)], greedy: bool, sink: impl FnOnce(&[u8])) -> Result<()> {
        check_batch(batch, self.lens.len())?;
        if batch.len() > self.max_chunk {
            return Err(crate::Error::Invalid(format!("a batch of {} sequences: at most {} per step", batch.len(), self.max_chunk)));
        }
        for &(seq, token) in batch {
            check_request(&self.config, self.lens[seq], self.capacity, &[token])?;
        }
        let started = Instant::now();
        self.counters.steps += 1;
        self.counters.tokens += batch.len() as u64;
        self.step_tokens.clear();
        self.step_positions.clear();
        for &(seq, token) in batch {
            self.step_tokens.push(token);
            self.step_positions.extend([self.lens[seq] as u32, (seq * self.capacity) as u32]);
        }
        sink(self.step(Part::Main, Some(Logits::All), greedy)?);
        for &(seq, _) in batch {
            self.lens[seq] += 1;
        }
        self.counters.step_seconds += started.elapsed().as_secs_f64();
        Ok(())
    }
}

/// Little-endian f32s of read-back bytes.
fn f32s(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl<B: Backend> Engine for Runtime<B> {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn sequences(&self) -> usize {
        self.lens.len()
    }

    fn forward_seq(&mut self, seq: usize, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        let rows = if which == Logits::All { tokens.len() } else { 1 };
        let mut out = Vec::with_capacity(rows * self.config.vocab_size);
        self.run(seq, tokens, Some(which), false, false, |bytes| out.extend(f32s(bytes)))?;
        Ok(out)
    }

    fn prefill_seq(&mut self, seq: usize, tokens: &[u32]) -> Result<()> {
        self.run(seq, tokens, None, false, false, |_| {})
    }

    fn greedy_seq(&mut self, seq: usize, tokens: &[u32]) -> Result<u32> {
        let mut id = 0;
        self.run(seq, tokens, Some(Logits::Last), true, false, |bytes| {
            if let Some(b) = bytes.get(..4) {
                id = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        })?;
        Ok(id)
    }

    fn decode_batch(&mut self, batch: &[(usize, u32)]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(batch.len() * self.config.vocab_size);
        self.run_batch(batch, false, |bytes| out.extend(f32s(bytes)))?;
        Ok(out)
    }

    fn decode_batch_greedy(&mut self, batch: &[(usize, u32)]) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(batch.len());
        self.run_batch(batch, true, |bytes| ids.extend(bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))))?;
        Ok(ids)
    }

    fn seq_len(&self, seq: usize) -> usize {
        self.lens.get(seq).copied().unwrap_or(0)
    }

    fn truncate(&mut self, seq: usize, len: usize) {
        if let Some(l) = self.lens.get_mut(seq) {
            *l = len.min(*l);
        }
        if let Some(m) = &mut self.mtp {
            if let Some(l) = m.lens.get_mut(seq) {
                *l = len.min(*l);
                m.chained[seq] = 0;
            }
        }
    }

    fn has_mtp(&self) -> bool {
        self.mtp.is_some()
    }

    fn forward_keep(&mut self, seq: usize, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        let rows = if which == Logits::All { tokens.len() } else { 1 };
        let mut out = Vec::with_capacity(rows * self.config.vocab_size);
        self.run(seq, tokens, Some(which), false, true, |bytes| out.extend(f32s(bytes)))?;
        Ok(out)
    }

    fn mtp_len(&self, seq: usize) -> usize {
        self.mtp.as_ref().and_then(|m| m.lens.get(seq).copied()).unwrap_or(0)
    }

    fn draft(&mut self, seq: usize, next: &[u32]) -> Result<Vec<f32>> {
        self.draft_step(seq, next, None)
    }

    fn draft_chained(&mut self, seq: usize, token: u32) -> Result<Vec<f32>> {
        self.draft_step(seq, &[], Some(token))
    }

    fn verify_batch(&mut self, batch: &[(usize, Vec<u32>)]) -> Result<Vec<f32>> {
        self.verify_rows(batch)
    }

    fn max_step_tokens(&self) -> usize {
        self.max_chunk
    }

    fn draft_batch(&mut self, batch: &[(usize, Vec<u32>)]) -> Result<Vec<f32>> {
        self.draft_rows(batch)
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn device_name(&self) -> String {
        self.backend.describe()
    }

    fn expert_cache_hit_rate(&self) -> Option<f64> {
        let c = self.streaming.as_ref()?.counters;
        (c.hits + c.misses > 0).then(|| c.hits as f64 / (c.hits + c.misses) as f64)
    }

    fn reset_counters(&mut self) {
        self.counters = RunCounters::default();
        self.backend.reset_work();
        if let Some(s) = &mut self.streaming {
            s.counters = Default::default();
        }
    }

    fn counters(&self) -> Option<String> {
        if let Some(profile) = self.backend.profile_report() {
            eprintln!("{profile}");
        }
        let c = self.counters;
        let per = |x: u64| x as f64 / c.steps.max(1) as f64;
        let work = self.backend.work();
        let ([first, second], [a, b]) = (work.names, work.counts);
        let mut lines = format!(
            "{} steps: {:.1} {first}, {:.2} {second}, {:.0} bytes read back per step; weights on GPU {}",
            c.steps,
            per(a),
            per(b),
            per(c.readback_bytes),
            crate::util::human_bytes(self.weight_bytes)
        );
        if let Some(s) = &self.streaming {
            lines += "\n";
            lines += &s.summary(c.tokens, c.step_seconds);
        }
        Some(lines)
    }
}

/// What loading makes on the device.
struct Loaded<B: Backend> {
    res: Resources<B>,
    body: Vec<B::Op>,
    head_last: Vec<B::Op>,
    head_all: Vec<B::Op>,
    argmax: Vec<B::Op>,
    streaming: Option<Streaming<B>>,
    main_stops: usize,
    /// The MTP step's body, heads (last row, every row), and the main heads keeping hidden states.
    mtp: Option<(Vec<B::Op>, [Vec<B::Op>; 2], [Vec<B::Op>; 3])>,
    weight_bytes: u64,
}

impl<B: Backend> Loaded<B> {
    fn new(b: &mut B, model: &Model, plan: &Plan, progress: &dyn Progress) -> Result<Self> {
        let progress = load_progress(plan, progress);
        let mut res = Resources::default();
        for spec in &plan.buffers {
            let buffer = match &spec.init {
                Some(values) => b.upload(&spec.name, values)?,
                None => b.alloc(&spec.name, spec.words)?,
            };
            res.buffers.push(buffer);
        }
        let mut weight_bytes = 0;
        for spec in &plan.weights {
            let m = upload_weight(b, spec, plan.quant, progress)?;
            weight_bytes += B::matrix_bytes(&m);
            res.weights.push(m);
        }
        let mut streaming = match &plan.streaming {
            Some(s) => Some(Streaming::new(b, &mut res, model, plan.quant, s, progress)?),
            None => None,
        };
        progress.finish();

        let body = lower_body(b, &res, &plan.body, &mut streaming)?;
        let main_stops = streaming.as_ref().map_or(0, |s| s.layers.len());
        let mtp_body = match &plan.mtp {
            Some(m) => Some(lower_body(b, &res, &m.body, &mut streaming)?),
            None => None,
        };
        let mut lower_all = |ops: &[Op]| -> Result<Vec<B::Op>> {
            let mut out = Vec::new();
            ops.iter().try_for_each(|op| b.lower(op, &res, &mut out))?;
            Ok(out)
        };
        let head_last = lower_all(&plan.head_last)?;
        let head_all = lower_all(&plan.head_all)?;
        let argmax = lower_all(std::slice::from_ref(&plan.argmax))?;
        let mtp = match (&plan.mtp, mtp_body) {
            (Some(m), Some(body)) => {
                let keep = [lower_all(&m.keep_hidden)?, lower_all(&[&plan.head_last[..], &m.keep_hidden[..]].concat())?, lower_all(&[&plan.head_all[..], &m.keep_hidden[..]].concat())?];
                Some((body, [lower_all(&m.head_last)?, lower_all(&m.head_all)?], keep))
            }
            _ => None,
        };
        Ok(Loaded { res, body, head_last, head_all, argmax, streaming, main_stops, mtp, weight_bytes })
    }
}

/// Lowers a program's ops; each streamed MoE layer's expert ops go to `streaming.layers` (in
/// order, with where in the program it stops) instead of the program.
fn lower_body<B: Backend>(b: &mut B, res: &Resources<B>, ops: &[Op], streaming: &mut Option<Streaming<B>>) -> Result<Vec<B::Op>> {
    let mut body = Vec::new();
    for op in ops {
        match (op, &mut *streaming) {
            (Op::Streamed { predicts_next, ops, .. }, Some(s)) => {
                let mut lowered = Vec::new();
                ops.iter().try_for_each(|op| b.lower(op, res, &mut lowered))?;
                s.layers.push(StreamedLayer { at: body.len(), predicts_next: *predicts_next, ops: lowered });
            }
            (Op::Streamed { .. }, None) => return Err(crate::Error::Invalid("a plan streams experts the runtime has no cache for".into())),
            _ => b.lower(op, res, &mut body)?,
        }
    }
    Ok(body)
}

/// Uploads one weight of the plan in the format `quant` gives it (converted on all cores).
fn upload_weight<B: Backend>(b: &mut B, spec: &WeightSpec, quant: QuantTarget, progress: &dyn Progress) -> Result<B::Matrix> {
    progress.advance(spec.stack.len() as u64);
    if !spec.convert || quant == QuantTarget::Keep {
        return b.upload_matrix(&spec.stack, spec.chunked);
    }
    let converted: Vec<Matrix> = spec.stack.par_iter().map(|m| m.quantized(quant)).collect();
    b.upload_matrix(&converted.iter().collect::<Vec<_>>(), spec.chunked)
}

/// Weights below this load without reporting progress (the bundled model, test fixtures).
const QUIET_LOAD_BYTES: u64 = 256 << 20;

/// Where loading reports the matrices it uploads (and `--quant` converts): `progress`, or
/// nowhere for small models without conversion.
fn load_progress<'p>(plan: &Plan, progress: &'p dyn Progress) -> &'p dyn Progress {
    let bytes = plan.resident_weight_bytes() + plan.memory.experts * plan.memory.expert_bytes;
    if plan.quant == QuantTarget::Keep && bytes < QUIET_LOAD_BYTES {
        return &Silent;
    }
    let weights: usize = plan.weights.iter().map(|w| w.stack.len()).sum();
    let streamed = plan.streaming.as_ref().map_or(0, |_| plan.memory.experts as usize * 3);
    let size = crate::util::human_bytes(bytes);
    let message = match plan.quant {
        QuantTarget::Keep => format!("loading {size}"),
        q => format!("loading {size}, quantising to {}", q.name()),
    };
    progress.start(&message, (weights + streamed) as u64, false);
    progress
}
