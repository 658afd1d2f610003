//! Expert parallelism, one rank's side: this device holds its share of every MoE layer's routed
//! experts (`plan::shard`) in slot pools filled at load. A step stops at each MoE layer's
//! router (`Op::ShardExperts`): rank 0's choice (ids and weights, a few KB) is broadcast so
//! every rank routes alike even on unlike devices, each rank lists the slots whose expert it
//! holds and computes them and the shared expert, and the ranks' partial routed sums are
//! all-reduced through the communicator before the combine adds them to the residual.
//!
//! Against one device the result differs only in the order of the routed sum's terms: each
//! rank sums its own slots, then the ranks' sums are added in rank order.
//!
//! Combined with hybrid placement, a rank's experts that do not fit its budget (or that
//! `--cpu-moe` / `--n-cpu-moe` put there) are computed by its host's CPU backend from host
//! memory while its GPU computes the rest, and the two sums are added before the all-reduce.

use super::comm::Communicator;
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, Resources};
use crate::error::{Error, Result};
use crate::expert_cache::{ExpertCache, StreamCounters};
use crate::model::weights::Mlp;
use crate::model::Model;
use crate::plan::{BufferId, Op, Plan, PoolSpec, ShardPlan, NOT_HERE};
use crate::util::Progress;
use std::sync::Arc;
use std::time::Instant;

struct ShardLayer {
    moe: usize,
    x: BufferId,
    ids: BufferId,
    weights: BufferId,
    local_weights: BufferId,
    routed: BufferId,
    listed: usize,
    overlap: usize,
    /// The host's part of the layer (empty: none of its experts are on the host).
    host_kernels: Vec<<CpuBackend as Backend>::Op>,
}

/// A rank's host side: its CPU backend, its copies of the buffers its ops use, which experts
/// it computes.
struct Host {
    cpu: CpuBackend,
    res: Resources<CpuBackend>,
    /// [MoE layer][expert]: this rank computes it on the host.
    on_host: Vec<Vec<bool>>,
    /// Per stop, reused: this rank's rows, the host's ids and weights, its sum.
    x: Vec<u8>,
    ids: Vec<u32>,
    weights: Vec<f32>,
    sum: Vec<f32>,
}

/// What the stops did, for `--verbose` and `dsrun bench`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ShardCounters {
    pub layers: u64,
    /// Waiting for rank 0's router choice (its device's work up to the router, the broadcast).
    pub choice_seconds: f64,
    /// This rank's experts and shared expert, read back, and the all-reduce (which waits for
    /// the slowest rank).
    pub reduce_seconds: f64,
    /// Bytes of partial sums this rank put into all-reduces.
    pub reduced_bytes: u64,
    /// Step slots this rank computed (on its GPU and on its host), and all slots.
    pub listed: u64,
    pub host_listed: u64,
    pub slots: u64,
    /// Time the host computed its experts.
    pub host_seconds: f64,
}

impl ShardCounters {
    pub fn summary(&self, tokens: u64, rank: usize, world: usize, transport: &str) -> String {
        let per_token = |s: f64| 1e3 * s / tokens.max(1) as f64;
        format!(
            "expert parallelism: rank {rank} of {world} over {transport}; {:.1} MoE layers per token; per token {:.2} ms waiting for the router's choice + {:.2} ms experts and all-reduce; \
             {} all-reduced per token; this rank computed {:.0}% of the routed slots",
            self.layers as f64 / tokens.max(1) as f64,
            per_token(self.choice_seconds),
            per_token(self.reduce_seconds),
            crate::util::human_bytes(self.reduced_bytes / tokens.max(1)),
            100.0 * (self.listed + self.host_listed) as f64 / self.slots.max(1) as f64,
        ) + &match self.host_listed {
            0 => String::new(),
            n => format!(" ({:.0}% on its host's CPU, {:.2} ms per token)", 100.0 * n as f64 / self.slots.max(1) as f64, per_token(self.host_seconds)),
        }
    }
}

pub struct ShardExperts {
    comm: Arc<dyn Communicator>,
    layers: Vec<ShardLayer>,
    /// [MoE layer][expert]: (pool, slot in it) where this rank holds the expert.
    slots: Vec<Vec<Option<(u32, u32)>>>,
    first_pool: usize,
    pools: usize,
    hidden: usize,
    k: usize,
    /// Per stop, reused: the choice's bytes, ids, weights, this rank's weights, each pool's
    /// slot list, the partial sums, zeros.
    choice: Vec<u8>,
    ids: Vec<u32>,
    weights: Vec<f32>,
    local_weights: Vec<f32>,
    lists: Vec<Vec<u32>>,
    sums: Vec<f32>,
    zeros: Vec<u8>,
    host: Option<Host>,
    /// The rank's GPU experts streamed through its pools, where they do not all fit.
    stream: Option<ShardStream>,
    pub counters: ShardCounters,
}

/// A rank's experts streamed through a slot cache (`--expert-placement stream` over a budget):
/// host copies of its experts in the device format, the cache, and each stop's slots.
struct ShardStream {
    cache: ExpertCache,
    pools: Vec<PoolSpec>,
    /// [MoE layer][expert]: the host copy of an expert this rank streams.
    copies: Vec<Vec<Option<Mlp>>>,
    counters: StreamCounters,
    /// Per stop, reused: the step slots of streamed experts, and their experts.
    slots: Vec<u32>,
    ids: Vec<u32>,
}

impl ShardStream {
    /// The stop's streamed slots in rounds of what the cache holds: each round uploads its
    /// missing experts, lists its slots, sets their weights (the others' zero: the combine
    /// adds each round into the routed sum) and records `ops` (experts and combine).
    #[allow(clippy::too_many_arguments)]
    fn rounds<B: Backend>(
        &mut self,
        b: &mut B,
        res: &Resources<B>,
        first_pool: usize,
        moe: usize,
        weights: &[f32],
        lists: &mut [Vec<u32>],
        local_weights: &mut [f32],
        weights_buffer: BufferId,
        ops: &[B::Op],
        n: u32,
    ) -> Result<()> {
        let rounds = self.cache.plan_rounds(moe as u32, &self.ids, &mut self.counters, &mut Default::default());
        for (r, round) in rounds.iter().enumerate() {
            if r > 0 {
                // The next round may overwrite slots and weights this one reads.
                b.flush()?;
            }
            b.uploads_begin()?;
            for &(key, slot) in &round.uploads {
                let (p, local) = PoolSpec::locate(&self.pools, slot);
                let expert = self.copies[key.layer as usize][key.expert as usize].as_ref().expect("a streamed expert has a host copy");
                self.counters.bytes_uploaded += b.write_expert(&res.pools[first_pool + p], local, expert)?;
            }
            lists.iter_mut().for_each(Vec::clear);
            local_weights.iter_mut().for_each(|w| *w = 0.0);
            for &(i, slot) in &round.pairs {
                let s = self.slots[i as usize];
                let (p, local) = PoolSpec::locate(&self.pools, slot);
                lists[p].extend([s, local as u32]);
                local_weights[s as usize] = weights[s as usize];
            }
            b.write(res.buf(weights_buffer), bytemuck::cast_slice(local_weights))?;
            for (p, list) in lists.iter().enumerate() {
                b.write_slot_list(&res.pools[first_pool + p], list)?;
            }
            b.uploads_done()?;
            b.record(ops, n)?;
        }
        Ok(())
    }
}

impl ShardExperts {
    /// This rank's pools, filled with its experts (added to `res.pools`).
    pub fn new<B: Backend>(b: &mut B, res: &mut Resources<B>, model: &Model, plan: &Plan, shard: &ShardPlan, comm: Arc<dyn Communicator>, progress: &dyn Progress) -> Result<ShardExperts> {
        let s = &shard.shard;
        if comm.world() != s.world || comm.rank() != s.rank {
            return Err(Error::Invalid(format!("the plan is rank {} of {}, its communicator rank {} of {}", s.rank, s.world, comm.rank(), comm.world())));
        }
        let routed = model.weights.routed_layers(plan.mtp.is_some());
        let mut slots: Vec<Vec<Option<(u32, u32)>>> = routed.iter().map(|m| vec![None; m.experts.len()]).collect();
        let first_pool = res.pools.len();
        for pool in &shard.pools {
            res.pools.push(b.pool(&shard.template, pool.slots, shard.max_pairs)?);
        }
        let mut stream = None;
        match shard.cache {
            // Streamed: host copies now, uploads as the router asks.
            Some((cache_slots, eviction)) => {
                let mut copies: Vec<Vec<Option<Mlp>>> = routed.iter().map(|m| vec![None; m.experts.len()]).collect();
                for &(layer, expert) in &shard.slots {
                    progress.advance(3);
                    copies[layer][expert as usize] = Some(routed[layer].experts[expert as usize].quantized(plan.quant));
                }
                let pairs = plan.max_chunk * model.config.num_experts_per_tok;
                stream = Some(ShardStream {
                    cache: ExpertCache::new(cache_slots, eviction),
                    pools: shard.pools.clone(),
                    copies,
                    counters: StreamCounters::default(),
                    slots: Vec::with_capacity(pairs),
                    ids: Vec::with_capacity(pairs),
                });
            }
            None => super::hybrid::fill_slots(b, &res.pools[first_pool..], &shard.pools, &shard.slots, model, plan, &mut slots, progress)?,
        }
        let host = match &shard.host {
            Some(h) => {
                let (cpu, host_res) = super::hybrid::host_backend(plan, &h.buffers, &h.weights, h.math, progress)?;
                let mut on_host: Vec<Vec<bool>> = routed.iter().map(|m| vec![false; m.experts.len()]).collect();
                for &(layer, expert) in &shard.host_slots {
                    on_host[layer][expert as usize] = true;
                }
                Some(Host { cpu, res: host_res, on_host, x: Vec::new(), ids: Vec::new(), weights: Vec::new(), sum: Vec::new() })
            }
            None => None,
        };
        let config = &model.config;
        let pairs = plan.max_chunk * config.num_experts_per_tok;
        Ok(ShardExperts {
            comm,
            layers: Vec::new(),
            slots,
            first_pool,
            pools: shard.pools.len(),
            hidden: config.hidden_size,
            k: config.num_experts_per_tok,
            choice: Vec::with_capacity(8 * pairs),
            ids: Vec::with_capacity(pairs),
            weights: Vec::with_capacity(pairs),
            local_weights: Vec::with_capacity(pairs),
            lists: shard.pools.iter().map(|_| Vec::with_capacity(2 * pairs)).collect(),
            sums: Vec::with_capacity(plan.max_chunk * config.hidden_size),
            zeros: vec![0; plan.max_chunk * config.hidden_size * 4],
            host,
            stream,
            counters: ShardCounters::default(),
        })
    }

    /// Takes a `ShardExperts` op; returns its index among this rank's stops.
    pub fn lower(&mut self, op: &Op) -> Result<usize> {
        let Op::ShardExperts { layer, x, ids, weights, local_weights, routed, listed, overlap, ref host_ops } = *op else {
            return Err(Error::Invalid(format!("a rank's stop is a ShardExperts op, not `{}`", op.name())));
        };
        let mut host_kernels = Vec::new();
        if !host_ops.is_empty() {
            let host = self.host.as_mut().ok_or_else(|| Error::Invalid("a rank's layer computes experts on a host the runtime does not have".into()))?;
            host_ops.iter().try_for_each(|op| host.cpu.lower(op, &host.res, &mut host_kernels))?;
        }
        self.layers.push(ShardLayer { moe: layer, x, ids, weights, local_weights, routed, listed, overlap, host_kernels });
        Ok(self.layers.len() - 1)
    }

    /// Stop `stop`'s extents in lowered ops: its listed slots' ops, and all it records.
    pub fn set_extent(&mut self, stop: usize, listed: usize, overlap: usize) {
        let l = &mut self.layers[stop];
        (l.listed, l.overlap) = (listed, overlap);
    }

    pub fn communicator(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    /// The `--verbose` line: the stops, and the rank's expert cache where it streams.
    pub fn summary(&self, tokens: u64) -> String {
        let (rank, world) = (self.comm.rank(), self.comm.world());
        let mut line = self.counters.summary(tokens, rank, world, &self.comm.describe());
        if let Some(st) = &self.stream {
            let c = &st.counters;
            line += &format!(
                "; its experts streamed through {} slots: hit rate {:.1}% ({} hits, {} misses, {} rounds), {} uploaded per token",
                st.cache.slots(),
                100.0 * c.hits as f64 / (c.hits + c.misses).max(1) as f64,
                c.hits,
                c.misses,
                c.rounds,
                crate::util::human_bytes(c.bytes_uploaded / tokens.max(1))
            );
        }
        line
    }

    /// Experts this rank holds.
    pub fn experts(&self) -> usize {
        self.slots.iter().flatten().filter(|s| s.is_some()).count()
    }

    /// Stop `layer` of a step of `n` tokens, after the work up to its router was recorded:
    /// the choice from rank 0, this rank's slots listed and computed with the shared expert
    /// (`after`'s first `overlap` ops), the partial sums all-reduced and written back. Returns
    /// how many of `after`'s ops it recorded.
    pub fn run<B: Backend>(&mut self, b: &mut B, res: &Resources<B>, layer: usize, after: &[B::Op], n: u32) -> Result<usize> {
        let l = &self.layers[layer];
        let (rows, pairs) = (n as usize * self.hidden, n as usize * self.k);
        let started = Instant::now();
        let on_host = self.host.as_mut().filter(|_| !l.host_kernels.is_empty());
        if let Some(host) = on_host {
            // This rank's own rows, for its host's experts.
            host.x.clear();
            host.x.extend_from_slice(b.read(&[(res.buf(l.x), rows * 4)])?);
        }
        self.choice.clear();
        if self.comm.rank() == 0 {
            self.choice.extend_from_slice(b.read(&[(res.buf(l.ids), pairs * 4), (res.buf(l.weights), pairs * 4)])?);
        } else {
            b.flush()?;
        }
        self.comm.broadcast(&mut self.choice)?;
        if self.choice.len() != pairs * 8 {
            return Err(Error::Rank { rank: 0, world: self.comm.world(), reason: format!("sent a router choice of {} bytes for {pairs} slots (ranks out of step)", self.choice.len()) });
        }
        let word = |b: &[u8]| [b[0], b[1], b[2], b[3]];
        let (ids, weights) = self.choice.split_at(pairs * 4);
        self.ids.clear();
        self.ids.extend(ids.chunks_exact(4).map(|b| u32::from_le_bytes(word(b))));
        self.weights.clear();
        self.weights.extend(weights.chunks_exact(4).map(|b| f32::from_le_bytes(word(b))));
        self.counters.choice_seconds += started.elapsed().as_secs_f64();

        let slots = &self.slots[l.moe];
        if let Some(bad) = self.ids.iter().find(|&&e| e as usize >= slots.len()) {
            return Err(Error::Invalid(format!("{}: the router chose expert {bad} of {} (non-finite activations?)", b.describe(), slots.len())));
        }
        self.local_weights.clear();
        self.lists.iter_mut().for_each(Vec::clear);
        let mut host = self.host.as_mut().filter(|_| !l.host_kernels.is_empty());
        if let Some(h) = host.as_mut() {
            h.ids.clear();
            h.weights.clear();
        }
        if let Some(st) = self.stream.as_mut() {
            st.slots.clear();
            st.ids.clear();
        }
        for (s, (&e, &w)) in self.ids.iter().zip(&self.weights).enumerate() {
            match slots[e as usize] {
                Some((pool, local)) => {
                    self.lists[pool as usize].extend([s as u32, local]);
                    self.local_weights.push(w);
                }
                None => self.local_weights.push(0.0),
            }
            if let Some(st) = self.stream.as_mut().filter(|st| st.copies[l.moe][e as usize].is_some()) {
                st.slots.push(s as u32);
                st.ids.push(e);
            }
            if let Some(h) = host.as_mut() {
                let here = h.on_host[l.moe][e as usize];
                h.ids.push(if here { e } else { NOT_HERE });
                h.weights.push(if here { w } else { 0.0 });
            }
        }
        let started = Instant::now();
        b.write(res.buf(l.routed), &self.zeros[..rows * 4])?;
        let listed = match self.stream.as_mut() {
            Some(st) => {
                let listed = st.slots.len();
                st.rounds(b, res, self.first_pool, l.moe, &self.weights, &mut self.lists, &mut self.local_weights, l.local_weights, &after[..l.listed], n)?;
                b.record(&after[l.listed..l.overlap], n)?;
                listed
            }
            None => {
                let listed = self.lists.iter().map(|l| l.len() / 2).sum::<usize>();
                b.write(res.buf(l.local_weights), bytemuck::cast_slice(&self.local_weights))?;
                for (p, list) in self.lists.iter().enumerate() {
                    b.write_slot_list(&res.pools[self.first_pool + p], list)?;
                }
                b.record(&after[if listed > 0 { 0 } else { l.listed }..l.overlap], n)?;
                listed
            }
        };
        // The host computes its experts while the GPU computes its own.
        let mut host_listed = 0;
        if let Some(h) = host {
            host_listed = h.ids.iter().filter(|&&e| e != NOT_HERE).count();
            if host_listed > 0 {
                b.flush()?;
                let computing = Instant::now();
                let buf = |id: BufferId| &h.res.buffers[id.0];
                h.cpu.write(buf(l.x), &h.x)?;
                h.cpu.write(buf(l.ids), bytemuck::cast_slice(&h.ids))?;
                h.cpu.write(buf(l.weights), bytemuck::cast_slice(&h.weights))?;
                h.cpu.write(buf(l.routed), &self.zeros[..rows * 4])?;
                h.cpu.record(&l.host_kernels, n)?;
                let sum = h.cpu.read(&[(buf(l.routed), rows * 4)])?;
                h.sum.clear();
                h.sum.extend(sum.chunks_exact(4).map(|b| f32::from_le_bytes(word(b))));
                self.counters.host_seconds += computing.elapsed().as_secs_f64();
            }
        }
        let partial = b.read(&[(res.buf(l.routed), rows * 4)])?;
        self.sums.clear();
        self.sums.extend(partial.chunks_exact(4).map(|b| f32::from_le_bytes(word(b))));
        if let (Some(h), true) = (self.host.as_ref(), host_listed > 0) {
            super::comm::add_into(&mut self.sums, &h.sum);
        }
        self.comm.all_reduce_sum(&mut self.sums)?;
        b.write(res.buf(l.routed), bytemuck::cast_slice(&self.sums))?;
        let c = &mut self.counters;
        c.reduce_seconds += started.elapsed().as_secs_f64();
        c.layers += 1;
        c.reduced_bytes += rows as u64 * 4;
        c.listed += listed as u64;
        c.host_listed += host_listed as u64;
        c.slots += pairs as u64;
        Ok(l.overlap)
    }

    /// Pools this rank's experts fill.
    pub fn pools(&self) -> usize {
        self.pools
    }
}
