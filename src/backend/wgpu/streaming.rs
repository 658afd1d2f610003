//! Expert streaming: routed experts live in host memory (the memory-mapped checkpoint, or a
//! converted copy when `--quant` changes their format) and are copied into a GPU cache of
//! equal slots as the router asks for them.
//!
//! A step splits at each MoE layer: the segment up to the layer's router is submitted, the
//! chosen ids come back (a few bytes), missing experts are copied into free or evicted slots,
//! each pool's list of slots to compute is written, and the expert matmuls run over the slot pools. A chunk
//! whose tokens want more distinct experts than there are slots runs in rounds, each expert
//! uploaded at most once per chunk per layer. For decode steps the next MoE layer's router is
//! also run early on the current hidden state; its guesses are uploaded while the GPU works
//! through the rest of the layer, and counted against what the router then picks.

use super::context::GpuContext;
use super::lower::{listed_grid, Builder, Dispatch};
use super::tensors::SlotMatrix;
use crate::error::{Error, Result};
pub use crate::expert_cache::StreamCounters;
use crate::expert_cache::{Eviction, ExpertCache, ExpertKey, Round};
use crate::model::weights::Mlp;
use std::collections::HashSet;
use std::time::Instant;

/// The GPU slots of one pool (each pool's buffers fit one binding).
struct Pool {
    gate: SlotMatrix,
    up: SlotMatrix,
    down: SlotMatrix,
    /// Global index of this pool's first slot.
    first: usize,
    slots: usize,
    /// (step slot, pool-local expert slot) pairs this pool computes in the current round.
    list: wgpu::Buffer,
    /// Indirect workgroup counts for gate/up (offset 0) and down (offset 12), sized to the list.
    args: wgpu::Buffer,
}

/// The expert part of one MoE layer: dispatched per round after the sync.
pub struct StreamedLayer {
    /// Index into the step's body before which the layer syncs (its router has run).
    pub body_index: usize,
    pub dispatches: Vec<Dispatch>,
    /// This layer's sync also reads the next MoE layer's guessed experts.
    pub predicts_next: bool,
}

pub struct Streaming {
    cache: ExpertCache,
    pools: Vec<Pool>,
    /// [MoE layer][expert]: host copies in the GPU's format.
    host: Vec<Vec<Mlp>>,
    pub layers: Vec<StreamedLayer>,
    k: usize,
    ids: wgpu::Buffer,
    pred_ids: wgpu::Buffer,
    readback: wgpu::Buffer,
    prefetch: bool,
    /// Guessed experts for a MoE layer, made at the previous layer's sync, uploaded at its own.
    guess: Option<(usize, Vec<u32>)>,
    /// Prefetched experts not used yet.
    prefetched: HashSet<ExpertKey>,
    pub counters: StreamCounters,
}

/// Buffers the streamed layers share with the rest of the step.
pub struct StreamBuffers<'a> {
    pub x: &'a wgpu::Buffer,
    pub gate_out: &'a wgpu::Buffer,
    pub up_out: &'a wgpu::Buffer,
    pub expert_out: &'a wgpu::Buffer,
    pub ids: &'a wgpu::Buffer,
    pub pred_ids: &'a wgpu::Buffer,
}

impl Streaming {
    /// GPU room for `slots` experts shaped like `host[0][0]`, split into pools that each fit one
    /// binding, and a slot list per pool for `max_chunk` tokens.
    pub fn new(
        ctx: &GpuContext,
        host: Vec<Vec<Mlp>>,
        slots: usize,
        k: usize,
        max_chunk: usize,
        eviction: Eviction,
        prefetch: bool,
        bufs: &StreamBuffers,
    ) -> Result<Streaming> {
        let template = &host[0][0];
        let largest = template.matrices().iter().map(|m| SlotMatrix::slot_bytes(m)).max().unwrap_or(1).max(1);
        let per_pool = (ctx.chunk_limit() / largest) as usize;
        if per_pool == 0 {
            return Err(Error::Invalid(format!(
                "one routed expert matrix takes {}, more than this adapter binds at once ({})",
                crate::inspect::human_bytes(largest),
                crate::inspect::human_bytes(ctx.chunk_limit())
            )));
        }
        let mut pools = Vec::new();
        let mut first = 0;
        while first < slots {
            let n = per_pool.min(slots - first);
            pools.push(Pool {
                gate: SlotMatrix::new(ctx, &template.gate, n)?,
                up: SlotMatrix::new(ctx, &template.up, n)?,
                down: SlotMatrix::new(ctx, &template.down, n)?,
                first,
                slots: n,
                list: super::tensors::storage(ctx, "expert slot list", 2 * max_chunk * k)?,
                args: ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("expert slot dispatch sizes"),
                    size: 24,
                    usage: wgpu::BufferUsages::INDIRECT | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                }),
            });
            first += n;
        }
        let readback = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("expert ids readback"),
            size: ((max_chunk + 1) * k * 4) as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(Streaming {
            cache: ExpertCache::new(slots, eviction),
            pools,
            host,
            layers: Vec::new(),
            k,
            ids: bufs.ids.clone(),
            pred_ids: bufs.pred_ids.clone(),
            readback,
            prefetch,
            guess: None,
            prefetched: HashSet::new(),
            counters: StreamCounters::default(),
        })
    }

    pub fn slots(&self) -> usize {
        self.cache.slots()
    }

    pub fn pools(&self) -> usize {
        self.pools.len()
    }

    pub fn slot_bytes(&self) -> u64 {
        self.pools.first().map_or(0, |p| [&p.gate, &p.up, &p.down].iter().map(|m| m.data_stride + m.scale_stride).sum())
    }

    /// The expert matmuls of one MoE layer over every pool: gate and up per pool, SwiGLU over
    /// all slots, down per pool, each pool computing only the slots its list names.
    pub fn layer_dispatches(&self, b: &Builder, bufs: &StreamBuffers, intermediate: usize) -> Vec<Dispatch> {
        let k = self.k as u32;
        let mut ops = Vec::new();
        for p in &self.pools {
            ops.push(b.listed_expert_matmul(&p.gate.matrix, k, k, bufs.x, bufs.gate_out, &p.list, (&p.args, 0)));
            ops.push(b.listed_expert_matmul(&p.up.matrix, k, k, bufs.x, bufs.up_out, &p.list, (&p.args, 0)));
        }
        ops.push(b.silu_mul(self.k * intermediate, bufs.gate_out, bufs.up_out));
        for p in &self.pools {
            ops.push(b.listed_expert_matmul(&p.down.matrix, k, 1, bufs.gate_out, bufs.expert_out, &p.list, (&p.args, 12)));
        }
        ops
    }

    /// The sync of MoE layer `layer` in a step of `n` tokens: submits `encoder` (the step so far,
    /// ending with the layer's router), reads the chosen ids back, makes those experts resident
    /// and records the expert rounds. Returns the encoder holding the last round, to which the
    /// rest of the step is added.
    pub fn sync(&mut self, ctx: &GpuContext, mut encoder: wgpu::CommandEncoder, layer: usize, n: u32) -> Result<wgpu::CommandEncoder> {
        let count = n as usize * self.k;
        let predicts = self.prefetch && n == 1 && self.layers[layer].predicts_next;
        encoder.copy_buffer_to_buffer(&self.ids, 0, &self.readback, 0, (count * 4) as u64);
        if predicts {
            encoder.copy_buffer_to_buffer(&self.pred_ids, 0, &self.readback, (count * 4) as u64, (self.k * 4) as u64);
        }
        ctx.queue.submit([encoder.finish()]);

        // While the GPU runs up to this router: upload the experts guessed for this layer.
        // A guess for another layer (a step that ended early) is stale: drop it.
        self.guess = self.guess.take().filter(|(guessed, _)| *guessed == layer);
        if let Some((_, guess)) = self.guess.clone() {
            self.prefetch_uploads(ctx, layer, &guess);
        }

        let waited = Instant::now();
        let words = count + if predicts { self.k } else { 0 };
        let slice = self.readback.slice(..(words * 4) as u64);
        slice.map_async(wgpu::MapMode::Read, |_| {});
        ctx.device
            .poll(wgpu::PollType::Wait { submission_index: None, timeout: None })
            .map_err(|e| Error::Invalid(format!("GPU: waiting for the router failed: {e}")))?;
        let read: Vec<u32> = {
            let view = slice.get_mapped_range().map_err(|e| Error::Invalid(format!("GPU: reading expert ids failed: {e}")))?;
            bytemuck::pod_collect_to_vec(&view)
        };
        self.readback.unmap();
        self.counters.sync_seconds += waited.elapsed().as_secs_f64();
        self.counters.syncs += 1;
        let (ids, next_guess) = read.split_at(count);
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        let experts = self.host[layer].len();
        if let Some(bad) = ids.iter().find(|&&e| e as usize >= experts) {
            return Err(Error::Invalid(format!("GPU: the router chose expert {bad} of {experts} (non-finite activations?)")));
        }

        if let Some((_, guess)) = self.guess.take() {
            self.counters.predicted += guess.len() as u64;
            self.counters.predicted_right += guess.iter().filter(|g| ids.contains(g)).count() as u64;
        }
        if predicts {
            self.guess = Some((layer + 1, next_guess.to_vec()));
        }

        let started = Instant::now();
        let rounds = self.cache.plan_rounds(layer as u32, ids, &mut self.counters, &mut self.prefetched);
        for (r, round) in rounds.iter().enumerate() {
            if r > 0 {
                let previous = std::mem::replace(&mut encoder, ctx.device.create_command_encoder(&Default::default()));
                ctx.queue.submit([previous.finish()]);
            }
            for &(key, slot) in &round.uploads {
                self.upload(ctx, key, slot);
            }
            self.write_lists(ctx, round);
            let mut pass = encoder.begin_compute_pass(&Default::default());
            for d in &self.layers[layer].dispatches {
                d.record(&mut pass, n);
            }
        }
        self.counters.upload_seconds += started.elapsed().as_secs_f64();
        Ok(encoder)
    }

    /// Each pool's list for one round: (step slot, pool-local slot) for each (token, choice)
    /// this round serves from that pool, and the dispatch sizes that cover it.
    fn write_lists(&self, ctx: &GpuContext, round: &Round) {
        let mut lists: Vec<Vec<u32>> = vec![Vec::new(); self.pools.len()];
        for &(s, slot) in &round.pairs {
            let p = self.pools.iter().position(|p| slot >= p.first && slot < p.first + p.slots).expect("slot within a pool");
            lists[p].extend([s, (slot - self.pools[p].first) as u32]);
        }
        for (pool, list) in self.pools.iter().zip(&lists) {
            let pairs = (list.len() / 2) as u32;
            if pairs > 0 {
                ctx.queue.write_buffer(&pool.list, 0, bytemuck::cast_slice(list));
            }
            let gate_up = listed_grid(pool.gate.matrix.rows, pairs);
            let down = listed_grid(pool.down.matrix.rows, pairs);
            ctx.queue.write_buffer(&pool.args, 0, bytemuck::cast_slice(&[gate_up, down]));
        }
    }

    /// Queues the copy of expert `key` into global slot `slot`.
    fn upload(&mut self, ctx: &GpuContext, key: ExpertKey, slot: usize) {
        let pool = self.pools.iter().find(|p| slot >= p.first && slot < p.first + p.slots).expect("slot within a pool");
        let local = slot - pool.first;
        let expert = &self.host[key.layer as usize][key.expert as usize];
        let mut bytes = 0;
        for (gpu, host) in [(&pool.gate, &expert.gate), (&pool.up, &expert.up), (&pool.down, &expert.down)] {
            bytes += gpu.write(&ctx.queue, local, host);
        }
        self.counters.bytes_uploaded += bytes;
    }

    /// Uploads guessed experts of `layer` that are not resident, into slots nothing in flight
    /// still needs for this step (the copies land after the work already submitted).
    fn prefetch_uploads(&mut self, ctx: &GpuContext, layer: usize, guess: &[u32]) {
        let started = Instant::now();
        let keys: Vec<ExpertKey> = guess.iter().map(|&e| ExpertKey { layer: layer as u32, expert: e }).collect();
        for (key, slot) in self.cache.prefetch(&keys) {
            self.upload(ctx, key, slot);
            self.prefetched.insert(key);
            self.counters.prefetched += 1;
        }
        self.counters.prefetch_seconds += started.elapsed().as_secs_f64();
    }

    /// One line for `--verbose`, per generated or prompt token.
    pub fn summary(&self, tokens: u64, step_seconds: f64) -> String {
        self.counters.summary(self.slots(), self.slot_bytes(), self.pools(), tokens, step_seconds)
    }
}
