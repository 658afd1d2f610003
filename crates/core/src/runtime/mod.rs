//! The model on a GPU backend, written once for all of them: a plan is built for the backend's
//! limits, its buffers and weights are made on the device, every op is lowered once, and a step
//! is: write the per-step values and token ids, record the lowered ops (stopping at each MoE
//! layer for the router's choice when experts are streamed), read back the logits or the greedy
//! id. Prompts longer than a step's room run in chunks.

pub mod comm;
mod hybrid;
internal_mod!(lab);
mod parallel;
mod shard;
mod streaming;

pub use hybrid::{HostCounters, HostExperts};
/// Plan ops run one by one on a backend: the conformance harness's tool (tests and benches).
#[cfg(feature = "internals")]
pub use lab::Lab;
pub use parallel::{follow, Leader};
pub use shard::{ShardCounters, ShardExperts};
pub use streaming::{StreamedLayer, Streaming};

use crate::backend::{Backend, IntoBackend, Part, Resources, StepKind, StepValues};
use crate::config::ModelConfig;
use crate::engine::{check_step, wanted_rows, DraftSource, Engine, MtpState, Output, Pass, Span, Step, Want};
use crate::error::Result;
use crate::expert_cache::StreamCounters;
use crate::model::weights::Matrix;
use crate::model::{Logits, Model};
use crate::plan::budget::{GpuOptions, MemoryPlan};
use crate::plan::{self, BufferId, Op, Plan, WeightSpec};
use crate::quant::QuantTarget;
use crate::util::{Choice, Progress, Silent};
use comm::Communicator;
use rayon::prelude::*;
use std::sync::Arc;
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
    /// How far each sequence's drafts have come, and which rows of the MTP input buffer hold
    /// kept hidden states (row 0 holds the last draft's output after a one-row head).
    state: MtpState,
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
    /// Routed experts computed on the host's CPU (hybrid placement).
    host: Option<HostExperts>,
    /// This device's share of the routed experts (expert parallelism).
    shard: Option<ShardExperts>,
    /// Where the main program and the MTP program stop for the host.
    stops: [Vec<(usize, Stop)>; 2],
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
    /// The last step's output (`Engine::step` lends it out).
    out_logits: Vec<f32>,
    out_ids: Vec<u32>,
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

    /// One rank of a model divided among devices (`options.shard` says which routed experts
    /// this device holds): its MoE layers all-reduce their partial sums through `comm`.
    pub fn load_rank(device: impl IntoBackend<B>, model: &Model, capacity: usize, options: &GpuOptions, comm: Arc<dyn Communicator>, progress: &dyn Progress) -> Result<Self> {
        let mut backend: B = device.into_backend()?;
        let target = backend.target(&model.config, capacity)?;
        let plan = plan::build(model, capacity, options, &target)?;
        Self::from_parts(backend, model, &plan, Some(comm), progress)
    }

    /// Makes `plan` (built for `model` and this backend's target) on the device and lowers it.
    pub fn from_plan(backend: B, model: &Model, plan: &Plan, progress: &dyn Progress) -> Result<Self> {
        Self::from_parts(backend, model, plan, None, progress)
    }

    fn from_parts(backend: B, model: &Model, plan: &Plan, comm: Option<Arc<dyn Communicator>>, progress: &dyn Progress) -> Result<Self> {
        let mut backend = backend;
        let loaded = backend.checked(|b| Loaded::new(b, model, plan, comm, progress))?;
        let Loaded { res, body, head_last, head_all, argmax, streaming, host, shard, stops, mtp, weight_bytes } = loaded;
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
        if let Some(h) = &host {
            log::info!("hybrid placement: the routed experts of {} MoE layer(s) on the host ({})", h.layers(), h.describe());
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
            host,
            shard,
            stops,
            mtp: mtp.map(|(body, [head_last, head_all], keep)| MtpRuntime { body, head_last, head_all, keep, state: MtpState::new(plan.sequences) }),
            memory: plan.memory,
            max_chunk: plan.max_chunk,
            capacity: plan.capacity,
            lens: vec![0; plan.sequences],
            step_tokens: Vec::with_capacity(plan.max_chunk),
            step_positions: Vec::with_capacity(2 * plan.max_chunk),
            out_logits: Vec::new(),
            out_ids: Vec::new(),
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

    /// MoE layers whose routed experts the host computes (hybrid placement), if any.
    pub fn host_layers(&self) -> Option<usize> {
        self.host.as_ref().map(|h| h.layers())
    }

    /// Experts the GPU holds of MoE layers split between it and the host, if any.
    pub fn split_experts(&self) -> Option<usize> {
        self.host.as_ref().map(|h| h.split_experts()).filter(|&n| n > 0)
    }

    /// The router's counts so far (earlier runs' and this one's), where the host sees them.
    pub fn expert_counts(&self) -> Option<crate::plan::placement::ExpertCounts> {
        self.host.as_ref().map(|h| h.counts())
    }

    pub fn host_counters(&self) -> Option<HostCounters> {
        self.host.as_ref().map(|h| h.counters)
    }

    pub fn stream_counters(&self) -> Option<StreamCounters> {
        self.streaming.as_ref().map(|s| s.counters)
    }

    /// One step of the tokens in `step_tokens`, at the positions in `step_positions` (at most
    /// `max_chunk`), of the main model or the MTP layer (`part`). `head`: which logits to
    /// compute, if any (the MTP layer: only the last row's); `greedy`: also take the argmax of
    /// each computed row. Returns the read-back bytes.
    fn launch(&mut self, part: Part, head: Option<Logits>, greedy: bool) -> Result<&[u8]> {
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
                (&self.body, head_ops, &self.stops[0])
            }
            Part::MainKeepingHidden => {
                let keep = &mtp.ok_or_else(missing)?.keep;
                let head_ops = match head {
                    None => &keep[0],
                    Some(Logits::Last) => &keep[1],
                    Some(Logits::All) => &keep[2],
                };
                (&self.body, &head_ops[..], &self.stops[0])
            }
            Part::Mtp => {
                let m = mtp.ok_or_else(missing)?;
                let head_ops = match head {
                    None => &[][..],
                    Some(Logits::Last) => &m.head_last[..],
                    Some(Logits::All) => &m.head_all[..],
                };
                (&m.body, head_ops, &self.stops[1])
            }
        };
        let argmax = if greedy { &self.argmax[..] } else { &[][..] };
        if stops.is_empty() {
            b.record_step(StepKind { head, greedy, part }, [(body, n), (head_ops, n), (argmax, rows)])?;
        } else {
            // The step stops at each streamed or host layer's router for its choice.
            let mut done = 0;
            for &(at, stop) in stops {
                b.record(&body[done..at], n)?;
                done = at
                    + match stop {
                        Stop::Stream(layer) => {
                            self.streaming.as_mut().expect("a streamed stop has a cache").sync(b, &self.res, layer, n)?;
                            0
                        }
                        Stop::Host(layer) => self.host.as_mut().expect("a host stop has a host").run(b, &self.res, layer, &body[at..], n)?,
                        Stop::Shard(layer) => self.shard.as_mut().expect("a shard stop has a shard").run(b, &self.res, layer, &body[at..], n)?,
                    };
            }
            b.record(&body[done..], n)?;
            b.record(head_ops, n)?;
            b.record(argmax, rows)?;
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

    /// Runs one launch and appends what it read back to the step's output (logits, or ids when
    /// `greedy`).
    fn launch_into_output(&mut self, part: Part, head: Option<Logits>, greedy: bool) -> Result<()> {
        let (mut logits, mut ids) = (std::mem::take(&mut self.out_logits), std::mem::take(&mut self.out_ids));
        let result = self.launch(part, head, greedy).map(|bytes| match greedy {
            true => ids.extend(bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
            false => logits.extend(f32s(bytes)),
        });
        (self.out_logits, self.out_ids) = (logits, ids);
        result
    }

    /// Runs `tokens` of sequence `seq` in chunks of `max_chunk`; only the last chunk computes
    /// the head unless every row's is wanted. `keep`: the chunks also keep their hidden states
    /// for the MTP layer, which runs over every chunk but the last as soon as the next tokens
    /// are known (the last chunk's rows wait for a draft step, which brings the token after it).
    fn run(&mut self, seq: usize, tokens: &[u32], want: Want, keep: bool) -> Result<()> {
        let started = Instant::now();
        self.counters.steps += 1;
        self.counters.tokens += tokens.len() as u64;
        let chunks = tokens.len().div_ceil(self.max_chunk);
        let first_row = (seq * self.capacity) as u32;
        let (which, greedy) = match want {
            Want::Nothing => (None, false),
            Want::Logits(w) => (Some(w), false),
            Want::Ids(w) => (Some(w), true),
        };
        for (i, chunk) in tokens.chunks(self.max_chunk).enumerate() {
            let head = match which {
                Some(Logits::All) => Some(Logits::All),
                Some(Logits::Last) if i + 1 == chunks => Some(Logits::Last),
                _ => None,
            };
            let start = self.lens[seq];
            self.set_step(chunk, start, first_row);
            self.launch_into_output(if keep { Part::MainKeepingHidden } else { Part::Main }, head, greedy)?;
            self.lens[seq] += chunk.len();
            if keep {
                let m = self.mtp.as_mut().expect("checked by the caller");
                m.state.keep([(seq, start, chunk.len())]);
                if i + 1 < chunks {
                    let offset = i * self.max_chunk;
                    let next = &tokens[offset + 1..offset + chunk.len() + 1];
                    self.draft(&Step { pass: Pass::Draft, spans: &[Span { seq, position: start, tokens: next }], want: Want::Nothing })?;
                }
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

    /// Appends rows of sequence `seq` from position `start` to the step being built.
    fn push_rows(&mut self, seq: usize, start: usize, tokens: impl Iterator<Item = u32>) {
        let first_row = (seq * self.capacity) as u32;
        for (i, token) in tokens.enumerate() {
            self.step_tokens.push(token);
            self.step_positions.extend([(start + i) as u32, first_row]);
        }
    }

    /// A main-model step of several sequences (a decode batch, a verify step), at most
    /// `max_chunk` rows: one launch, every row's head where any row beyond a span's last is
    /// wanted, else only where needed.
    fn batch(&mut self, step: &Step) -> Result<()> {
        let keep = step.pass == Pass::MainKeepingHidden;
        let started = Instant::now();
        self.counters.steps += 1;
        self.step_tokens.clear();
        self.step_positions.clear();
        for span in step.spans {
            self.push_rows(span.seq, span.position, span.tokens.iter().copied());
        }
        self.counters.tokens += self.step_tokens.len() as u64;
        let part = if keep { Part::MainKeepingHidden } else { Part::Main };
        let (head, greedy) = match step.want {
            Want::Nothing => (None, false),
            Want::Logits(_) => (Some(Logits::All), false),
            Want::Ids(_) => (Some(Logits::All), true),
        };
        self.launch_into_output(part, head, greedy)?;
        if let Want::Logits(Logits::Last) | Want::Ids(Logits::Last) = step.want {
            self.keep_rows(step.spans, greedy);
        }
        for span in step.spans {
            self.lens[span.seq] += span.tokens.len();
        }
        if keep {
            let m = self.mtp.as_mut().expect("checked by the caller");
            m.state.keep(step.spans.iter().map(|s| (s.seq, s.position, s.tokens.len())));
        }
        self.counters.step_seconds += started.elapsed().as_secs_f64();
        Ok(())
    }

    /// Keeps only each span's last row of an output read back for every row.
    fn keep_rows(&mut self, spans: &[Span], greedy: bool) {
        let width = if greedy { 1 } else { self.config.vocab_size };
        let mut kept = 0;
        for (row, _) in wanted_rows(spans, Logits::Last) {
            match greedy {
                true => self.out_ids.copy_within(row..row + 1, kept),
                false => self.out_logits.copy_within(row * width..(row + 1) * width, kept * width),
            }
            kept += 1;
        }
        self.out_ids.truncate(if greedy { kept } else { 0 });
        self.out_logits.truncate(if greedy { 0 } else { kept * width });
    }

    /// The MTP layer over a draft step's spans ([`Pass::Draft`]). A catch-up reads the hidden
    /// states of the last kept main step by row, so its rows are laid out as that step's were:
    /// each kept sequence's rows up to the last one drafted, rows past a span's tokens (its
    /// rejected drafts, or a sequence not drafted now) repeating its last token; their cache
    /// rows lie past the MTP layer's length and are rewritten before anything reads them.
    fn draft(&mut self, step: &Step) -> Result<()> {
        let m = self.mtp.as_ref().ok_or(crate::Error::NoMtp)?;
        let lens = &self.lens;
        let sources = m.state.draft_sources(step, |s| lens[s])?;
        let started = Instant::now();
        self.step_tokens.clear();
        self.step_positions.clear();
        // Each span's first row in the launch, in the step's order.
        let mut first_rows = Vec::with_capacity(step.spans.len());
        if sources == [DraftSource::Chained] {
            let span = step.spans[0];
            first_rows.push(0);
            self.push_rows(span.seq, span.position, span.tokens.iter().copied());
        } else {
            let kept = m.state.kept.clone();
            let last = kept.iter().rposition(|k| step.spans.iter().any(|s| s.seq == k.seq)).expect("checked by draft_sources");
            let mut starts = Vec::with_capacity(step.spans.len());
            for (i, k) in kept[..=last].iter().enumerate() {
                let span = step.spans.iter().find(|s| s.seq == k.seq);
                let tokens = span.map_or(&[][..], |s| s.tokens);
                let rows = if i == last { tokens.len() } else { k.rows };
                let pad = tokens.last().copied().unwrap_or(0);
                starts.push((k.seq, self.step_tokens.len()));
                self.push_rows(k.seq, k.first, tokens.iter().copied().chain(std::iter::repeat(pad)).take(rows));
            }
            first_rows.extend(step.spans.iter().map(|s| starts.iter().find(|(seq, _)| *seq == s.seq).expect("a kept sequence").1));
        }
        // The last row's head alone when it is the only one wanted: its output is then what a
        // chained draft reads.
        let rows = self.step_tokens.len();
        let single = step.spans.len() == 1 && first_rows[0] + step.spans[0].tokens.len() == rows;
        let (head, greedy) = match step.want {
            Want::Nothing => (None, false),
            Want::Logits(Logits::Last) if single => (Some(Logits::Last), false),
            Want::Ids(Logits::Last) if single => (Some(Logits::Last), true),
            Want::Logits(_) => (Some(Logits::All), false),
            Want::Ids(_) => (Some(Logits::All), true),
        };
        self.launch_into_output(Part::Mtp, head, greedy)?;
        if head == Some(Logits::All) {
            self.select_draft_rows(step, &first_rows, greedy);
        }
        let m = self.mtp.as_mut().expect("checked above");
        m.state.drafted(step.spans, &sources, head == Some(Logits::Last));
        self.counters.step_seconds += started.elapsed().as_secs_f64();
        Ok(())
    }

    /// From a draft launch's every row, the rows each span wants, in the step's order.
    fn select_draft_rows(&mut self, step: &Step, first_rows: &[usize], greedy: bool) {
        let width = if greedy { 1 } else { self.config.vocab_size };
        let all = if greedy { bytemuck::cast_slice::<u32, f32>(&self.out_ids).to_vec() } else { std::mem::take(&mut self.out_logits) };
        let mut out = Vec::new();
        for (span, &first) in step.spans.iter().zip(first_rows) {
            let rows = match step.want {
                Want::Logits(Logits::Last) | Want::Ids(Logits::Last) => first + span.tokens.len() - 1..first + span.tokens.len(),
                _ => first..first + span.tokens.len(),
            };
            out.extend_from_slice(&all[rows.start * width..rows.end * width]);
        }
        match greedy {
            true => self.out_ids = bytemuck::cast_slice::<f32, u32>(&out).to_vec(),
            false => self.out_logits = out,
        }
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

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn seq_len(&self, seq: usize) -> usize {
        self.lens.get(seq).copied().unwrap_or(0)
    }

    fn truncate(&mut self, seq: usize, len: usize) {
        if let Some(l) = self.lens.get_mut(seq) {
            *l = len.min(*l);
        }
        if let Some(m) = &mut self.mtp {
            m.state.truncate(seq, len);
        }
    }

    fn step(&mut self, step: &Step) -> Result<Output<'_>> {
        let lens = &self.lens;
        check_step(step, &self.config, lens.len(), self.capacity, self.max_chunk, |s| lens[s])?;
        self.out_logits.clear();
        self.out_ids.clear();
        if step.pass == Pass::MainKeepingHidden {
            self.mtp.as_ref().ok_or(crate::Error::NoMtp)?.state.check_keep(step.spans)?;
        }
        match (step.pass, step.spans) {
            (Pass::Draft, _) => self.draft(step)?,
            (pass, [span]) => self.run(span.seq, span.tokens, step.want, pass == Pass::MainKeepingHidden)?,
            _ => self.batch(step)?,
        }
        Ok(Output { logits: &self.out_logits, ids: &self.out_ids })
    }

    fn device_name(&self) -> String {
        self.backend.describe()
    }

    fn max_step_rows(&self) -> usize {
        self.max_chunk
    }

    fn mtp_len(&self, seq: usize) -> Option<usize> {
        self.mtp.as_ref().map(|m| m.state.len(seq))
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
        if let Some(h) = &mut self.host {
            h.counters = Default::default();
        }
        if let Some(s) = &mut self.shard {
            s.counters = Default::default();
        }
    }

    fn counters(&self) -> Option<String> {
        let c = self.counters;
        let per = |x: u64| x as f64 / c.steps.max(1) as f64;
        let work = self.backend.work();
        let ([first, second], [a, b]) = (work.names, work.counts);
        let mut lines = format!(
            "{} steps: {:.1} {first}, {:.2} {second}, {:.0} bytes read back per step; weights on the device {}",
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
        if let Some(h) = &self.host {
            lines += "\n";
            lines += &h.counters.summary(c.tokens, c.step_seconds);
        }
        if let Some(s) = &self.shard {
            lines += "\n";
            lines += &s.summary(c.tokens);
        }
        if let Some(profile) = self.backend.profile_report() {
            lines += "\n";
            lines += &profile;
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
    host: Option<HostExperts>,
    shard: Option<ShardExperts>,
    stops: [Vec<(usize, Stop)>; 2],
    /// The MTP step's body, heads (last row, every row), and the main heads keeping hidden states.
    mtp: Option<(Vec<B::Op>, [Vec<B::Op>; 2], [Vec<B::Op>; 3])>,
    weight_bytes: u64,
}

impl<B: Backend> Loaded<B> {
    fn new(b: &mut B, model: &Model, plan: &Plan, comm: Option<Arc<dyn Communicator>>, progress: &dyn Progress) -> Result<Self> {
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
        let mut host = match &plan.host {
            Some(h) => Some(HostExperts::new(b, &mut res, model, plan, h, progress)?),
            None => None,
        };
        let mut shard = match (&plan.shard, comm) {
            (Some(s), Some(comm)) => Some(ShardExperts::new(b, &mut res, model, plan, s, comm, progress)?),
            (Some(_), None) => return Err(crate::Error::Invalid("a plan divided among devices needs their communicator (Runtime::load_rank)".into())),
            (None, _) => None,
        };
        progress.finish();

        let (body, main_stops) = lower_body(b, &res, &plan.body, &mut streaming, &mut host, &mut shard)?;
        let (mtp_body, mtp_stops) = match &plan.mtp {
            Some(m) => {
                let (body, stops) = lower_body(b, &res, &m.body, &mut streaming, &mut host, &mut shard)?;
                (Some(body), stops)
            }
            None => (None, Vec::new()),
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
        Ok(Loaded { res, body, head_last, head_all, argmax, streaming, host, shard, stops: [main_stops, mtp_stops], mtp, weight_bytes })
    }
}

/// Where a program stops for the host: a streamed MoE layer (an index into
/// `Streaming::layers`), one the host computes (into `HostExperts`' layers), or one whose
/// experts are divided among ranks (into `ShardExperts`' layers).
#[derive(Debug, Clone, Copy)]
enum Stop {
    Stream(usize),
    Host(usize),
    Shard(usize),
}

/// Lowers a program's ops; each streamed MoE layer's expert ops go to `streaming.layers`, each
/// host layer's to `host`, instead of the program. Returns the program and where it stops (before
/// which of its ops), in order.
fn lower_body<B: Backend>(
    b: &mut B,
    res: &Resources<B>,
    ops: &[Op],
    streaming: &mut Option<Streaming<B>>,
    host: &mut Option<HostExperts>,
    shard: &mut Option<ShardExperts>,
) -> Result<(Vec<B::Op>, Vec<(usize, Stop)>)> {
    let (mut body, mut stops) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < ops.len() {
        let op = &ops[i];
        i += 1;
        // A shard or host stop records the lowered ops of the `overlap` plan ops after it (the
        // first `listed` only where it lists slots), and a plan op may lower to several (one per
        // pool) or none (no pools): the stop is told the lowered counts.
        let extent = match *op {
            Op::ShardExperts { listed, overlap, .. } => {
                let s = shard.as_mut().ok_or_else(|| crate::Error::Invalid("a plan divides experts among ranks the runtime does not have".into()))?;
                let stop = s.lower(op)?;
                stops.push((body.len(), Stop::Shard(stop)));
                Some((listed, overlap))
            }
            Op::HostExperts { gpu_ops, overlap, .. } => {
                let h = host.as_mut().ok_or_else(|| crate::Error::Invalid("a plan computes experts on a host the runtime does not have".into()))?;
                stops.push((body.len(), Stop::Host(h.lower(op)?)));
                Some((gpu_ops, overlap))
            }
            _ => None,
        };
        if let Some((listed, overlap)) = extent {
            let after = ops.get(i..i + overlap).ok_or_else(|| crate::Error::Invalid(format!("a `{}` stop without the ops after it", op.name())))?;
            let (start, mut listed_ops) = (body.len(), 0);
            for (j, op) in after.iter().enumerate() {
                if j == listed {
                    listed_ops = body.len() - start;
                }
                b.lower(op, res, &mut body)?;
            }
            if listed == overlap {
                listed_ops = body.len() - start;
            }
            let lowered = body.len() - start;
            match stops.last().expect("pushed above").1 {
                Stop::Shard(stop) => shard.as_mut().expect("a shard stop").set_extent(stop, listed_ops, lowered),
                Stop::Host(stop) => host.as_mut().expect("a host stop").set_extent(stop, listed_ops, lowered),
                Stop::Stream(_) => unreachable!("extents are for shard and host stops"),
            }
            i += overlap;
            continue;
        }
        match (op, &mut *streaming, &mut *host) {
            (Op::Streamed { predicts_next, ops, .. }, Some(s), _) => {
                let mut lowered = Vec::new();
                ops.iter().try_for_each(|op| b.lower(op, res, &mut lowered))?;
                stops.push((body.len(), Stop::Stream(s.layers.len())));
                s.layers.push(StreamedLayer { at: body.len(), predicts_next: *predicts_next, ops: lowered });
            }
            (Op::Streamed { .. }, None, _) => return Err(crate::Error::Invalid("a plan streams experts the runtime has no cache for".into())),
            _ => b.lower(op, res, &mut body)?,
        }
    }
    Ok((body, stops))
}

/// Uploads one weight of the plan in the format `quant` gives it (converted on all cores).
pub(super) fn upload_weight<B: Backend>(b: &mut B, spec: &WeightSpec, quant: QuantTarget, progress: &dyn Progress) -> Result<B::Matrix> {
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
    let streamed = plan.streaming.as_ref().map_or(0, |_| plan.memory.experts as usize * 3) + plan.shard.as_ref().map_or(0, |s| s.slots.len() * 3);
    let size = crate::util::human_bytes(bytes);
    let message = match plan.quant {
        QuantTarget::Keep => format!("loading {size}"),
        q => format!("loading {size}, quantising to {}", q.name()),
    };
    progress.start(&message, (weights + streamed) as u64, false);
    progress
}
