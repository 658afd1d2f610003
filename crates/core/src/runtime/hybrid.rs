//! Hybrid placement, for every GPU backend: some MoE layers' routed experts are computed on
//! the host's CPU, from host memory (the memory-mapped checkpoint in its stored format, or a
//! `--quant` conversion), by the CPU backend's kernels; everything else runs on the GPU.
//!
//! A step stops at each such layer (`Op::HostExperts`): the layer's normed hidden rows, the
//! router's ids and weights come back (a few KB), the layer's shared expert is sent to the
//! GPU, the host computes the routed experts (grouped by expert when the step has several
//! tokens) and their weighted sum, and the sum is written back before the combine. Weights
//! never cross the link, and the step waits on the GPU once per such layer.
//!
//! A layer split between the devices keeps its GPU experts in slot pools filled at load: at
//! its stop the host lists the slots whose expert the GPU holds (and their weights, the
//! host's zeroed) for the GPU to compute beside the shared expert, and computes the others.
//! Every stop counts the router's picks; the counts are added to earlier runs' and written
//! back when the engine is dropped, so the next load keeps the most picked on the GPU.

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, Resources};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::plan::budget::Math;
use crate::plan::placement::ExpertCounts;
use crate::plan::{BufferId, HostPlan, Op, Plan, PoolSpec, WeightSpec, NOT_HERE};
use crate::util::Progress;
use std::time::Instant;

/// One MoE layer computed on the host.
struct HostLayer {
    /// Its index among MoE layers (for the counts and the split's slots).
    moe: usize,
    x: BufferId,
    ids: BufferId,
    weights: BufferId,
    routed: BufferId,
    /// A split layer: the GPU's copy of the weights with the host's slots zeroed.
    gpu_weights: Option<BufferId>,
    /// Ops after the stop the GPU runs while the host computes: its listed slots' experts
    /// (the first `gpu_ops`, skipped when none is listed), the shared expert.
    overlap: usize,
    gpu_ops: usize,
    /// The layer's gate, up and down stacks on the host (what a prompt upload copies).
    stacks: [std::sync::Arc<crate::backend::cpu::CpuMatrix>; 3],
    /// Multiply-adds x 2 of one token through one expert.
    expert_flops: f64,
    kernels: Vec<<CpuBackend as Backend>::Op>,
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
    /// Prompt chunks' experts uploaded to the GPU's staging slots instead of computed on the
    /// host, their bytes, and the host time queuing them.
    pub uploads: u64,
    pub upload_bytes: u64,
    pub upload_seconds: f64,
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
        ) + &match self.uploads {
            0 => String::new(),
            n => format!(
                "; prompt chunks: {n} experts uploaded to the GPU instead of computed on the host ({}, {:.2} ms queuing)",
                crate::util::human_bytes(self.upload_bytes),
                1e3 * self.upload_seconds
            ),
        }
    }
}

/// The host's side: its CPU backend, its copies of the buffers its ops use, its expert stacks
/// and each host layer's lowered ops (main model's first, then the MTP layer's); the GPU's
/// slot pools of split layers; the router's counts.
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
    /// [MoE layer][expert]: (pool, slot in it) where the GPU holds the expert.
    gpu_slots: Vec<Vec<Option<(u32, u32)>>>,
    /// The split pools' first index in the GPU's `Resources::pools`, and their count.
    first_pool: usize,
    /// Staging slots (pool, slot in it) for a prompt chunk's uploads; whether uploads go by
    /// count alone (`PromptUploads::On`) or by the measured rates.
    staging: Vec<(u32, u32)>,
    uploads_by_count: bool,
    /// Measured: the link's upload rate (bytes/s), the host's matmul rate in prefill (FLOP/s).
    link_rate: f64,
    host_flops: f64,
    /// Per stop, reused: tokens per host expert, and the chunk's candidates (count, expert).
    tally: Vec<u32>,
    candidates: Vec<(u32, u32)>,
    /// Per step, reused: the router's choice, what the host computes (`NOT_HERE` for the
    /// GPU's slots, whose weights are zeroed), the GPU's weights, each pool's slot list.
    ids: Vec<u32>,
    weights: Vec<f32>,
    host_ids: Vec<u32>,
    host_weights: Vec<f32>,
    gpu_weights: Vec<f32>,
    lists: Vec<Vec<u32>>,
    /// This run's picks, and earlier runs' (with where they are kept).
    counts: ExpertCounts,
    earlier: Option<std::sync::Arc<ExpertCounts>>,
    pub counters: HostCounters,
}

/// A CPU backend for the host's part of a plan: its own copies of the plan buffers in `buffers`
/// (the others take no room) and `weights` (expert stacks, memory-mapped or converted).
pub(super) fn host_backend(plan: &Plan, buffers: &[BufferId], weights: &[WeightSpec], math: Math, progress: &dyn Progress) -> Result<(CpuBackend, Resources<CpuBackend>)> {
    let mut cpu = CpuBackend::new().with_math(math);
    let mut res = Resources::default();
    for (i, spec) in plan.buffers.iter().enumerate() {
        let words = if buffers.contains(&BufferId(i)) { spec.words } else { 0 };
        res.buffers.push(cpu.alloc(&spec.name, words)?);
    }
    for spec in weights {
        res.weights.push(super::upload_weight(&mut cpu, spec, plan.quant, progress)?);
    }
    Ok((cpu, res))
}

/// Fills `pools` (laid out as `specs`) at load: global slot i with expert `slots[i]` (MoE
/// layer, expert) in the plan's format, noting in `map[layer][expert]` its (pool, slot in it).
#[allow(clippy::too_many_arguments)]
pub(super) fn fill_slots<B: Backend>(
    b: &mut B,
    pools: &[B::Pool],
    specs: &[PoolSpec],
    slots: &[(usize, u32)],
    model: &Model,
    plan: &Plan,
    map: &mut [Vec<Option<(u32, u32)>>],
    progress: &dyn Progress,
) -> Result<()> {
    let routed = model.weights.routed_layers(plan.mtp.is_some());
    b.uploads_begin()?;
    for (slot, &(layer, expert)) in slots.iter().enumerate() {
        let (p, local) = PoolSpec::locate(specs, slot);
        progress.advance(3);
        b.write_expert(&pools[p], local, &routed[layer].experts[expert as usize].quantized(plan.quant))?;
        map[layer][expert as usize] = Some((p as u32, local as u32));
    }
    b.uploads_done()
}

impl HostExperts {
    /// The host's buffers (only those its ops use take room) and expert stacks for `plan`;
    /// the GPU's pools for split layers, filled (added to `gpu.pools`).
    pub fn new<B: Backend>(b: &mut B, gpu: &mut Resources<B>, model: &Model, plan: &Plan, host: &HostPlan, progress: &dyn Progress) -> Result<HostExperts> {
        let config = &model.config;
        let (cpu, res) = host_backend(plan, &host.buffers, &host.weights, host.math, progress)?;
        let routed = model.weights.routed_layers(plan.mtp.is_some());
        let experts: Vec<usize> = routed.iter().map(|m| m.experts.len()).collect();
        let mut gpu_slots: Vec<Vec<Option<(u32, u32)>>> = experts.iter().map(|&e| vec![None; e]).collect();
        let first_pool = gpu.pools.len();
        let mut pools: &[PoolSpec] = &[];
        let (mut staging, mut link_rate, mut host_flops) = (Vec::new(), 0.0, 0.0);
        if let Some(split) = &host.split {
            pools = &split.pools;
            for pool in pools {
                gpu.pools.push(b.pool(&split.template, pool.slots, split.max_pairs)?);
            }
            let locate = |slot: usize| {
                let (p, local) = PoolSpec::locate(pools, slot);
                (p as u32, local as u32)
            };
            fill_slots(b, &gpu.pools[first_pool..], pools, &split.slots, model, plan, &mut gpu_slots, &crate::util::Silent)?;
            staging = (split.slots.len()..split.slots.len() + split.staging).map(locate).collect();
            if let (Some(&(p, local)), Some(false)) = (staging.first(), host.uploads) {
                // The rates uploads are decided by: one expert's upload, timed to its end, and
                // the host's matmuls at the share of its measured peak prefill reaches (~30%).
                let expert = routed[0].experts[0].quantized(plan.quant);
                let started = Instant::now();
                b.uploads_begin()?;
                let bytes = b.write_expert(&gpu.pools[first_pool + p as usize], local as usize, &expert)?;
                b.uploads_done()?;
                b.read(&[])?;
                link_rate = bytes as f64 / started.elapsed().as_secs_f64().max(1e-9);
                host_flops = 0.3 * crate::backend::cpu::prefill_peak(host.math).0;
            }
        }
        let pairs = plan.max_chunk * config.num_experts_per_tok;
        Ok(HostExperts {
            cpu,
            res,
            layers: Vec::new(),
            hidden: config.hidden_size,
            k: config.num_experts_per_tok,
            zeros: vec![0; plan.max_chunk * config.hidden_size * 4],
            seen: vec![0; config.n_routed_experts.div_ceil(64)],
            gpu_slots,
            first_pool,
            ids: Vec::with_capacity(pairs),
            weights: Vec::with_capacity(pairs),
            host_ids: Vec::with_capacity(pairs),
            host_weights: Vec::with_capacity(pairs),
            gpu_weights: Vec::with_capacity(pairs),
            lists: pools.iter().map(|_| Vec::with_capacity(2 * pairs)).collect(),
            staging,
            uploads_by_count: host.uploads == Some(true),
            link_rate,
            host_flops,
            tally: vec![0; config.n_routed_experts],
            candidates: Vec::with_capacity(config.n_routed_experts),
            counts: ExpertCounts::new(&experts, None),
            earlier: host.counts.clone(),
            counters: HostCounters::default(),
        })
    }

    /// Lowers a `HostExperts` op on the host; returns its index among the host's layers.
    pub fn lower(&mut self, op: &Op) -> Result<usize> {
        let Op::HostExperts { layer, x, ids, weights, routed, gpu_weights, gpu_ops, overlap, ops } = op else {
            return Err(Error::Invalid(format!("the host computes routed experts, not `{}`", op.name())));
        };
        let mut kernels = Vec::new();
        ops.iter().try_for_each(|op| self.cpu.lower(op, &self.res, &mut kernels))?;
        // The gate, up and down stacks its expert matmuls read.
        let stacks: Vec<_> =
            ops.iter().filter_map(|op| if let Op::ExpertMatmul { weights: crate::plan::ExpertWeights::Stack(w), .. } = op { Some(self.res.weight(*w).clone()) } else { None }).collect();
        let Ok(stacks) = <[_; 3]>::try_from(stacks) else {
            return Err(Error::Invalid("a host layer without its gate, up and down experts".into()));
        };
        let expert_bytes = stacks.iter().map(|s| CpuBackend::matrix_bytes(s) / s.count().max(1) as u64).sum();
        let expert_flops = stacks.iter().map(|s| 2.0 * (s.matrix(0).rows * s.matrix(0).cols) as f64).sum();
        self.layers.push(HostLayer {
            moe: *layer,
            x: *x,
            ids: *ids,
            weights: *weights,
            routed: *routed,
            gpu_weights: *gpu_weights,
            overlap: *overlap,
            gpu_ops: *gpu_ops,
            stacks,
            expert_flops,
            kernels,
            expert_bytes,
        });
        Ok(self.layers.len() - 1)
    }

    /// Stop `stop`'s extents in lowered ops: the GPU's listed slots' ops, and all it sends to the
    /// GPU before the host computes.
    pub fn set_extent(&mut self, stop: usize, gpu_ops: usize, overlap: usize) {
        let l = &mut self.layers[stop];
        (l.gpu_ops, l.overlap) = (gpu_ops, overlap);
    }

    /// Host layer `layer`'s stop in a step of `n` tokens, after the GPU's work up to its
    /// router was recorded: brings the layer's inputs to the host, lists a split layer's GPU
    /// slots, sends `after`'s first `overlap` ops (those and the shared expert) to the GPU,
    /// computes the host's experts' weighted sum and writes it back. Returns how many of
    /// `after`'s ops it recorded.
    pub fn run<B: Backend>(&mut self, b: &mut B, res: &Resources<B>, layer: usize, after: &[B::Op], n: u32) -> Result<usize> {
        let l = &self.layers[layer];
        let (rows, choices) = (n as usize * self.hidden * 4, n as usize * self.k * 4);
        let waited = Instant::now();
        let bytes = b.read(&[(res.buf(l.x), rows), (res.buf(l.ids), choices), (res.buf(l.weights), choices)])?;
        self.counters.wait_seconds += waited.elapsed().as_secs_f64();
        let (x, rest) = bytes.split_at(rows);
        let (ids, weights) = rest.split_at(choices);
        let word = |b: &[u8]| [b[0], b[1], b[2], b[3]];
        self.ids.clear();
        self.ids.extend(ids.chunks_exact(4).map(|b| u32::from_le_bytes(word(b))));
        self.weights.clear();
        self.weights.extend(weights.chunks_exact(4).map(|b| f32::from_le_bytes(word(b))));
        let buf = |id: BufferId| &self.res.buffers[id.0];
        self.cpu.write(buf(l.x), x)?;
        if let Some(bad) = self.ids.iter().find(|&&e| e as usize >= l.stacks[0].count()) {
            return Err(Error::Invalid(format!("{}: the router chose expert {bad} of {} (non-finite activations?)", b.describe(), l.stacks[0].count())));
        }
        for picks in self.ids.chunks_exact(self.k) {
            self.counts.add(l.moe, picks.iter().copied());
        }

        // Which device computes each slot; the host's distinct experts (the bytes it reads).
        let gpu_slots = &self.gpu_slots[l.moe];
        self.host_ids.clear();
        self.host_weights.clear();
        self.gpu_weights.clear();
        self.lists.iter_mut().for_each(Vec::clear);
        self.seen.iter_mut().for_each(|w| *w = 0);
        let mut distinct = 0;
        for (s, (&e, &w)) in self.ids.iter().zip(&self.weights).enumerate() {
            match gpu_slots[e as usize].filter(|_| l.gpu_weights.is_some()) {
                Some((pool, local)) => {
                    self.lists[pool as usize].extend([s as u32, local]);
                    self.host_ids.push(NOT_HERE);
                    self.host_weights.push(0.0);
                    self.gpu_weights.push(w);
                }
                None => {
                    let (word, bit) = (e as usize / 64, 1u64 << (e % 64));
                    distinct += u64::from(self.seen[word] & bit == 0);
                    self.seen[word] |= bit;
                    self.host_ids.push(e);
                    self.host_weights.push(w);
                    self.gpu_weights.push(0.0);
                }
            }
        }
        if n > 1 && !self.staging.is_empty() {
            // A prompt chunk: its most used host experts may go to the GPU's staging slots.
            self.candidates.clear();
            for &e in self.host_ids.iter().filter(|&&e| e != NOT_HERE) {
                self.tally[e as usize] += 1;
                if self.tally[e as usize] == 2 {
                    self.candidates.push((0, e));
                }
            }
            for c in &mut self.candidates {
                c.0 = self.tally[c.1 as usize];
            }
            for &e in self.host_ids.iter().filter(|&&e| e != NOT_HERE) {
                self.tally[e as usize] = 0;
            }
            self.candidates.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            let (link_time, host_time) = (l.expert_bytes as f64 / self.link_rate.max(1.0), l.expert_flops / self.host_flops.max(1.0));
            let worth = |tokens: u32| self.uploads_by_count || link_time < tokens as f64 * host_time;
            let started = Instant::now();
            let mut begun = false;
            for (&(tokens, e), &(pool, local)) in self.candidates.iter().zip(&self.staging) {
                if !worth(tokens) {
                    break;
                }
                if !begun {
                    b.uploads_begin()?;
                    begun = true;
                }
                let expert = crate::model::weights::Mlp { gate: l.stacks[0].matrix(e as usize).clone(), up: l.stacks[1].matrix(e as usize).clone(), down: l.stacks[2].matrix(e as usize).clone() };
                self.counters.upload_bytes += b.write_expert(&res.pools[self.first_pool + pool as usize], local as usize, &expert)?;
                self.counters.uploads += 1;
                for s in 0..self.host_ids.len() {
                    if self.host_ids[s] == e {
                        self.lists[pool as usize].extend([s as u32, local]);
                        self.gpu_weights[s] = self.host_weights[s];
                        self.host_ids[s] = NOT_HERE;
                        self.host_weights[s] = 0.0;
                    }
                }
                // Its bytes are no longer read on the host.
                distinct -= 1;
            }
            if begun {
                b.uploads_done()?;
            }
            self.counters.upload_seconds += started.elapsed().as_secs_f64();
        }
        self.cpu.write(buf(l.ids), bytemuck::cast_slice(&self.host_ids))?;
        self.cpu.write(buf(l.weights), bytemuck::cast_slice(&self.host_weights))?;
        self.cpu.write(buf(l.routed), &self.zeros[..rows])?;
        if let Some(gpu_weights) = l.gpu_weights {
            b.write(res.buf(gpu_weights), bytemuck::cast_slice(&self.gpu_weights))?;
            for (p, list) in self.lists.iter().enumerate() {
                b.write_slot_list(&res.pools[self.first_pool + p], list)?;
            }
        }
        // The GPU computes its slots and the shared expert while the host computes its own.
        let listed = self.lists.iter().any(|l| !l.is_empty());
        b.record(&after[if listed { 0 } else { l.gpu_ops }..l.overlap], n)?;
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
        c.bytes_out += (rows + if l.gpu_weights.is_some() { choices } else { 0 }) as u64;
        Ok(l.overlap)
    }

    /// Experts the GPU computes in layers split between the devices.
    pub fn split_experts(&self) -> usize {
        self.gpu_slots.iter().flatten().filter(|s| s.is_some()).count()
    }

    /// Layers the host computes.
    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// The host's backend, for stats lines.
    pub fn describe(&self) -> String {
        self.cpu.describe()
    }

    /// This run's router counts added to earlier runs', as written back at the end.
    pub fn counts(&self) -> ExpertCounts {
        match self.earlier.as_deref() {
            Some(earlier) => {
                let mut all = earlier.clone();
                all.merge(&self.counts);
                all
            }
            None => self.counts.clone(),
        }
    }
}

impl Drop for HostExperts {
    /// Writes the router's counts back where they were read from (a warning if it cannot).
    fn drop(&mut self) {
        if self.earlier.as_ref().is_none_or(|e| e.path.is_none()) || self.counts.layers.iter().all(|l| l.tokens == 0) {
            return;
        }
        if let Err(e) = self.counts().save() {
            log::warn!("expert counts not kept: {e}");
        }
    }
}
