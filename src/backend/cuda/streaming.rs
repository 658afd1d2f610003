//! Expert streaming on CUDA: routed experts stay in host memory (the memory-mapped checkpoint,
//! or a converted copy under `--quant`) and are copied into one device cache of equal slots as
//! the router asks for them, with the same cache and round planning as the wgpu backend
//! (expert_cache.rs). A step stops after each MoE layer's router, reads the chosen ids,
//! uploads what is missing, and launches the layer's expert matmuls over the listed slots only.

use super::ops::{CudaMatrix, Op, Ops};
use super::runtime::{Buffer, Runtime};
use crate::backend::layout::{MatmulShape, SlotLayout};
use crate::error::{Error, Result};
use crate::expert_cache::{Eviction, ExpertCache, ExpertKey, Round, StreamCounters};
use crate::model::weights::{Matrix, Mlp};
use std::collections::HashSet;
use std::time::Instant;

/// Device room for the cache's copies of one expert matrix.
struct SlotStack {
    matrix: CudaMatrix,
    slot: SlotLayout,
}

impl SlotStack {
    fn new(rt: &Runtime, template: &Matrix, slots: usize) -> Result<SlotStack> {
        let slot = SlotLayout::new(template);
        let matrix = CudaMatrix {
            format: super::ops::format_code(template.dtype),
            rows: template.rows,
            cols: template.cols,
            layout: rt.upload(&[slot.layout])?,
            weights: rt.alloc(slot.data_stride as usize * slots)?,
            scales: rt.alloc(slot.scale_values * 4 * slots)?,
            bytes: slot.slot_bytes() * slots as u64,
        };
        Ok(SlotStack { matrix, slot })
    }

    /// Queues the copy of `m` into `slot`; returns the bytes copied.
    fn write(&self, rt: &Runtime, slot: usize, m: &Matrix) -> Result<u64> {
        rt.upload_async(&self.matrix.weights, slot * self.slot.data_stride as usize, &self.slot.padded(m))?;
        let mut bytes = m.data.as_slice().len() as u64;
        if let Some(s) = &m.scales {
            rt.upload_async(&self.matrix.scales, slot * self.slot.scale_values * 4, bytemuck::cast_slice(&s.values))?;
            bytes += s.values.len() as u64 * 4;
        }
        Ok(bytes)
    }
}

/// The expert part of one MoE layer, launched per round after the layer's sync.
pub struct StreamedLayer {
    /// Index into the step's ops before which the layer syncs (its router has run).
    pub body_index: usize,
    /// Listed gate and up matmuls, SwiGLU, listed down matmul.
    ops: [Op; 4],
    /// The step also ran the next MoE layer's router early (its guesses are in `guess_ids`).
    predicts_next: bool,
}

pub struct CudaStreaming {
    cache: ExpertCache,
    gate: SlotStack,
    up: SlotStack,
    down: SlotStack,
    /// (step slot, cache slot) pairs the current round computes.
    list: Buffer,
    ids: Buffer,
    k: usize,
    /// [MoE layer][expert]: host copies in the device's format.
    host: Vec<Vec<Mlp>>,
    pub layers: Vec<StreamedLayer>,
    /// The next MoE layer's router run early on the last token's hidden state (prefetch).
    guess_ids: Option<Buffer>,
    /// Guesses for a MoE layer, made at the previous layer's sync.
    guess: Option<(usize, Vec<u32>)>,
    /// Prefetched experts not used yet.
    prefetched: HashSet<ExpertKey>,
    pub counters: StreamCounters,
}

/// Buffers the streamed layers share with the rest of the step.
pub struct StreamBuffers<'a> {
    pub x: &'a Buffer,
    pub gate_out: &'a Buffer,
    pub up_out: &'a Buffer,
    pub expert_out: &'a Buffer,
    pub ids: &'a Buffer,
}

impl CudaStreaming {
    /// `guess_ids`: where the next MoE layer's early router writes its choice (prefetch on).
    pub fn new(rt: &Runtime, host: Vec<Vec<Mlp>>, slots: usize, k: usize, max_chunk: usize, eviction: Eviction, ids: &Buffer, guess_ids: Option<&Buffer>) -> Result<CudaStreaming> {
        let template = &host[0][0];
        Ok(CudaStreaming {
            cache: ExpertCache::new(slots, eviction),
            gate: SlotStack::new(rt, &template.gate, slots)?,
            up: SlotStack::new(rt, &template.up, slots)?,
            down: SlotStack::new(rt, &template.down, slots)?,
            list: rt.alloc(2 * max_chunk * k * 4)?,
            ids: *ids,
            k,
            host,
            layers: Vec::new(),
            guess_ids: guess_ids.copied(),
            guess: None,
            prefetched: HashSet::new(),
            counters: StreamCounters::default(),
        })
    }

    pub fn slots(&self) -> usize {
        self.cache.slots()
    }

    pub fn slot_bytes(&self) -> u64 {
        [&self.gate, &self.up, &self.down].iter().map(|s| s.slot.slot_bytes()).sum()
    }

    /// Adds a MoE layer whose router ends the step's ops before `body_index`. The listed
    /// matmuls' grids take the round's pair count in place of a token count.
    pub fn add_layer(&mut self, ops: &Ops, bufs: &StreamBuffers, intermediate: usize, body_index: usize, predicts_next: bool) -> Result<()> {
        let k = self.k as u32;
        let listed = |x_div| MatmulShape { slots_per_token: k, x_div, use_ids: true, fixed_slots: None, slot_list: true, accumulate: false };
        let layer_ops = [
            ops.matmul_shaped(&self.gate.matrix, listed(k), bufs.x, bufs.gate_out, Some(&self.list))?,
            ops.matmul_shaped(&self.up.matrix, listed(k), bufs.x, bufs.up_out, Some(&self.list))?,
            ops.silu_mul(self.k * intermediate, bufs.gate_out, bufs.up_out)?,
            ops.matmul_shaped(&self.down.matrix, listed(1), bufs.gate_out, bufs.expert_out, Some(&self.list))?,
        ];
        self.layers.push(StreamedLayer { body_index, ops: layer_ops, predicts_next });
        Ok(())
    }

    /// MoE layer `layer` of a step of `n` tokens, after its router's launch: reads the chosen
    /// ids, makes those experts resident (in rounds when they outnumber the slots) and launches
    /// the layer's expert work for each round. In decode steps with prefetch, the next MoE
    /// layer's guessed experts are then queued on the copy stream, behind this layer's work and
    /// ahead of the next layer's attention, which does not wait for them.
    pub fn sync(&mut self, rt: &Runtime, layer: usize, n: u32) -> Result<()> {
        let waited = Instant::now();
        let count = n as usize * self.k;
        let mut bytes = vec![0u8; count * 4];
        rt.read(&self.ids, 0, &mut bytes)?;
        let predicts = n == 1 && self.layers[layer].predicts_next;
        let next_guess = match (self.guess_ids, predicts) {
            (Some(g), true) => {
                let mut guess = vec![0u8; self.k * 4];
                rt.read(&g, 0, &mut guess)?;
                Some(bytemuck::pod_collect_to_vec::<u8, u32>(&guess))
            }
            _ => None,
        };
        self.counters.sync_seconds += waited.elapsed().as_secs_f64();
        self.counters.syncs += 1;
        let ids: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes);
        let experts = self.host[layer].len();
        if let Some(bad) = ids.iter().chain(next_guess.iter().flatten()).find(|&&e| e as usize >= experts) {
            return Err(Error::Invalid(format!("CUDA: the router chose expert {bad} of {experts} (non-finite activations?)")));
        }
        // A guess for another layer (a step that ended early) is stale: dropped unscored.
        if let Some((_, guess)) = self.guess.take().filter(|(guessed, _)| *guessed == layer) {
            self.counters.predicted += guess.len() as u64;
            self.counters.predicted_right += guess.iter().filter(|g| ids.contains(g)).count() as u64;
        }
        let rounds = self.cache.plan_rounds(layer as u32, &ids, &mut self.counters, &mut self.prefetched);
        for round in &rounds {
            self.run_round(rt, layer, n, round)?;
        }
        if let Some(guess) = next_guess {
            self.prefetch(rt, layer + 1, &guess)?;
            self.guess = Some((layer + 1, guess));
        }
        Ok(())
    }

    /// Queues the guessed experts of `layer` that are not resident into slots nothing queued
    /// still needs; the layer's own round makes its kernels wait for them (one copy stream).
    fn prefetch(&mut self, rt: &Runtime, layer: usize, guess: &[u32]) -> Result<()> {
        let started = Instant::now();
        let keys: Vec<ExpertKey> = guess.iter().map(|&expert| ExpertKey { layer: layer as u32, expert }).collect();
        rt.uploads_begin()?;
        for (key, slot) in self.cache.prefetch(&keys) {
            self.upload(rt, key, slot)?;
            self.prefetched.insert(key);
            self.counters.prefetched += 1;
        }
        self.counters.prefetch_seconds += started.elapsed().as_secs_f64();
        Ok(())
    }

    fn upload(&mut self, rt: &Runtime, key: ExpertKey, slot: usize) -> Result<()> {
        let expert = &self.host[key.layer as usize][key.expert as usize];
        for (stack, m) in [(&self.gate, &expert.gate), (&self.up, &expert.up), (&self.down, &expert.down)] {
            self.counters.bytes_uploaded += stack.write(rt, slot, m)?;
        }
        Ok(())
    }

    fn run_round(&mut self, rt: &Runtime, layer: usize, n: u32, round: &Round) -> Result<()> {
        let started = Instant::now();
        // The copies wait for the previous round's kernels (they may overwrite its slots and
        // list); this round's kernels wait for the copies.
        rt.uploads_begin()?;
        for &(key, slot) in &round.uploads {
            self.upload(rt, key, slot)?;
        }
        let list: Vec<u32> = round.pairs.iter().flat_map(|&(s, slot)| [s, slot as u32]).collect();
        rt.upload_async(&self.list, 0, bytemuck::cast_slice(&list))?;
        rt.uploads_done()?;
        self.counters.upload_seconds += started.elapsed().as_secs_f64();
        let pairs = round.pairs.len() as u32;
        let [gate, up, silu, down] = &self.layers[layer].ops;
        for l in [gate.launch(pairs), up.launch(pairs), silu.launch(n), down.launch(pairs)] {
            rt.launch(&l)?;
        }
        Ok(())
    }

    /// One line for `--verbose`, per generated or prompt token.
    pub fn summary(&self, tokens: u64, step_seconds: f64) -> String {
        self.counters.summary(self.slots(), self.slot_bytes(), 1, tokens, step_seconds)
    }
}
