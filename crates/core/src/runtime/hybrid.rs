//! Hybrid placement, for every GPU backend: some MoE layers' routed experts are computed on
//! the host's CPU, from host memory (the memory-mapped checkpoint in its stored format, or a
//! `--quant` conversion), by the CPU backend's kernels; everything else runs on the GPU.
//!
//! A step stops at each such layer (`Op::HostExperts`): the layer's normed hidden rows, the
//! router's ids and weights come back (a few KB), the layer's shared expert is sent to the
//! GPU, the host computes the routed experts (grouped by expert when the step has several
//! tokens) and their weighted sum, and the sum is written back before the combine. Weights
//! never cross the link, and the step waits on the GPU once per such layer.

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, Resources};
use crate::error::{Error, Result};
use crate::plan::{BufferId, HostPlan, Op, Plan};
use crate::util::Progress;
use std::time::Instant;

/// One MoE layer computed on the host.
struct HostLayer {
    x: BufferId,
    ids: BufferId,
    weights: BufferId,
    routed: BufferId,
    /// Ops after the stop the GPU runs while the host computes (the shared expert).
    overlap: usize,
    kernels: Vec<<CpuBackend as Backend>::Op>,
    experts: usize,
    /// Bytes of one expert's three matrices as the host reads them.
    expert_bytes: u64,
}

/// What the host's side of the hybrid step did, for `--verbose` and `dsrun bench`.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostCounters {
    /// Layers the host computed (stops).
    pub layers: u64,
    /// Host time blocked on the GPU for a layer's inputs (its work up to the router included).
    pub wait_seconds: f64,
    /// Host time computing routed experts, and the expert weight bytes that read.
    pub compute_seconds: f64,
    pub expert_bytes: u64,
    /// Activations moved: to the host, and back.
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl HostCounters {
    /// One line for `--verbose`: the step per token split into the host's expert compute, its
    /// waits on the GPU (the GPU's work up to each host layer's router, not overlapped), and the
    /// rest (the GPU's work after the last host layer, recording, transfers); the host's rate
    /// over the distinct experts' bytes it read.
    pub fn summary(&self, tokens: u64, step_seconds: f64) -> String {
        let per_token = |s: f64| 1e3 * s / tokens.max(1) as f64;
        let rest = (step_seconds - self.compute_seconds - self.wait_seconds).max(0.0);
        format!(
            "host experts: {:.1} layers per token; per token {:.2} ms = {:.2} ms computing experts on the host + {:.2} ms waiting for the GPU ({:.3} ms per layer) + {:.2} ms the rest; \
             {:.1} GB/s of expert weights from host memory; {} to and {} from the host per token",
            self.layers as f64 / tokens.max(1) as f64,
            per_token(step_seconds),
            per_token(self.compute_seconds),
            per_token(self.wait_seconds),
            1e3 * self.wait_seconds / self.layers.max(1) as f64,
            per_token(rest),
            self.expert_bytes as f64 / self.compute_seconds.max(1e-9) / 1e9,
            crate::util::human_bytes(self.bytes_in / tokens.max(1)),
            crate::util::human_bytes(self.bytes_out / tokens.max(1)),
        )
    }
}

/// The host's side: its CPU backend, its copies of the buffers its ops use, its expert stacks
/// and each host layer's lowered ops (main model's first, then the MTP layer's).
pub struct HostExperts {
    cpu: CpuBackend,
    res: Resources<CpuBackend>,
    layers: Vec<HostLayer>,
    hidden: usize,
    k: usize,
    /// Zeros to clear the routed sum with (the combine adds into it).
    zeros: Vec<u8>,
    /// Experts already counted in the current layer (a bit each).
    seen: Vec<u64>,
    pub counters: HostCounters,
}

impl HostExperts {
    /// The host's buffers (only those its ops use take room) and expert stacks for `plan`.
    pub fn new(plan: &Plan, host: &HostPlan, config: &crate::config::ModelConfig, progress: &dyn Progress) -> Result<HostExperts> {
        let mut cpu = CpuBackend::new().with_math(host.math);
        let mut res = Resources::default();
        for (i, spec) in plan.buffers.iter().enumerate() {
            let words = if host.buffers.contains(&BufferId(i)) { spec.words } else { 0 };
            res.buffers.push(cpu.alloc(&spec.name, words)?);
        }
        for spec in &host.weights {
            res.weights.push(super::upload_weight(&mut cpu, spec, plan.quant, progress)?);
        }
        Ok(HostExperts {
            cpu,
            res,
            layers: Vec::new(),
            hidden: config.hidden_size,
            k: config.num_experts_per_tok,
            zeros: vec![0; plan.max_chunk * config.hidden_size * 4],
            seen: vec![0; config.n_routed_experts.div_ceil(64)],
            counters: HostCounters::default(),
        })
    }

    /// Lowers a `HostExperts` op on the host; returns its index among the host's layers.
    pub fn lower(&mut self, op: &Op) -> Result<usize> {
        let Op::HostExperts { x, ids, weights, routed, overlap, ops, .. } = op else {
            return Err(Error::Invalid(format!("the host computes routed experts, not `{}`", op.name())));
        };
        let mut kernels = Vec::new();
        ops.iter().try_for_each(|op| self.cpu.lower(op, &self.res, &mut kernels))?;
        // Gate, up and down of one expert: the first three ops' stacks.
        let stacks: Vec<_> = ops.iter().filter_map(|op| if let Op::ExpertMatmul { weights: crate::plan::ExpertWeights::Stack(w), .. } = op { Some(self.res.weight(*w)) } else { None }).collect();
        let experts = stacks.first().map_or(0, |s| s.count());
        let expert_bytes = stacks.iter().map(|s| CpuBackend::matrix_bytes(s) / s.count().max(1) as u64).sum();
        self.layers.push(HostLayer { x: *x, ids: *ids, weights: *weights, routed: *routed, overlap: *overlap, kernels, experts, expert_bytes });
        Ok(self.layers.len() - 1)
    }

    /// Host layer `layer`'s stop in a step of `n` tokens, after the GPU's work up to its
    /// router was recorded: brings the layer's inputs to the host, sends `after`'s first
    /// `overlap` ops (the shared expert) to the GPU, computes the routed sum and writes it
    /// back. Returns how many of `after`'s ops it recorded.
    pub fn run<B: Backend>(&mut self, b: &mut B, res: &Resources<B>, layer: usize, after: &[B::Op], n: u32) -> Result<usize> {
        let l = &self.layers[layer];
        let (rows, choices) = (n as usize * self.hidden * 4, n as usize * self.k * 4);
        let waited = Instant::now();
        let bytes = b.read(&[(res.buf(l.x), rows), (res.buf(l.ids), choices), (res.buf(l.weights), choices)])?;
        self.counters.wait_seconds += waited.elapsed().as_secs_f64();
        let (x, rest) = bytes.split_at(rows);
        let (ids, weights) = rest.split_at(choices);
        self.seen.iter_mut().for_each(|w| *w = 0);
        let mut distinct = 0;
        for id in ids.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize) {
            if id >= l.experts {
                return Err(Error::Invalid(format!("{}: the router chose expert {id} of {} (non-finite activations?)", b.describe(), l.experts)));
            }
            let (word, bit) = (id / 64, 1u64 << (id % 64));
            distinct += u64::from(self.seen[word] & bit == 0);
            self.seen[word] |= bit;
        }
        let buf = |id: BufferId| &self.res.buffers[id.0];
        self.cpu.write(buf(l.x), x)?;
        self.cpu.write(buf(l.ids), ids)?;
        self.cpu.write(buf(l.weights), weights)?;
        self.cpu.write(buf(l.routed), &self.zeros[..rows])?;
        // The GPU computes the shared expert while the host computes the routed ones.
        b.record(&after[..l.overlap], n)?;
        b.flush()?;
        let started = Instant::now();
        self.cpu.record(&l.kernels, n)?;
        let sum = self.cpu.read(&[(buf(l.routed), rows)])?;
        self.counters.compute_seconds += started.elapsed().as_secs_f64();
        b.write(res.buf(l.routed), sum)?;
        let c = &mut self.counters;
        c.layers += 1;
        c.expert_bytes += distinct * l.expert_bytes;
        c.bytes_in += (rows + 2 * choices) as u64;
        c.bytes_out += rows as u64;
        Ok(l.overlap)
    }

    /// Layers the host computes.
    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// The host's backend, for stats lines.
    pub fn describe(&self) -> String {
        self.cpu.describe()
    }
}
