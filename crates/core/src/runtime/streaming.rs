//! Expert streaming, for every backend: routed experts live in host memory (the memory-mapped
//! checkpoint, or a converted copy when `--quant` changes their format) and are copied into a
//! device cache of equal slots as the router asks for them.
//!
//! A step stops at each MoE layer: the work up to the layer's router is sent, the chosen ids
//! come back (a few bytes), missing experts are copied into free or evicted slots, each pool's
//! list of slots to compute is written, and the layer's expert ops run over the pools. A chunk
//! whose tokens want more distinct experts than there are slots runs in rounds, each expert
//! uploaded at most once per chunk per layer. In decode steps with prefetch, the next MoE
//! layer's router also runs early on the current hidden state: once this layer's experts are
//! sent to the device, its guesses are copied while the device works, and counted against what
//! the router then picks.

use crate::backend::{Backend, Resources};
use crate::error::{Error, Result};
use crate::expert_cache::{ExpertCache, ExpertKey, Round, StreamCounters};
use crate::model::weights::Mlp;
use crate::model::Model;
use crate::plan::{BufferId, PoolSpec, StreamPlan};
use crate::quant::QuantTarget;
use crate::util::Progress;
use rayon::prelude::*;
use std::collections::HashSet;
use std::time::Instant;

/// The expert part of one MoE layer: recorded per round after the layer's stop.
pub struct StreamedLayer<B: Backend> {
    /// Index into the step's lowered body before which the layer stops (its router has run).
    pub at: usize,
    /// The step also ran the next MoE layer's router early.
    pub predicts_next: bool,
    pub ops: Vec<B::Op>,
}

pub struct Streaming<B: Backend> {
    cache: ExpertCache,
    pools: Vec<PoolSpec>,
    /// [streamed MoE layer][expert]: host copies in the device's format (the layers after
    /// those the host computes).
    host: Vec<Vec<Mlp>>,
    pub layers: Vec<StreamedLayer<B>>,
    k: usize,
    ids: BufferId,
    guess_ids: Option<BufferId>,
    /// Guessed experts for a MoE layer, made at the previous layer's stop.
    guess: Option<(usize, Vec<u32>)>,
    /// Prefetched experts not used yet.
    prefetched: HashSet<ExpertKey>,
    /// Each pool's slot list for the current round, reused.
    lists: Vec<Vec<u32>>,
    slot_bytes: u64,
    pub counters: StreamCounters,
}

impl<B: Backend> Streaming<B> {
    /// Host copies of every routed expert of `model` in the device format, and the plan's
    /// slot pools on the device (added to `res.pools`).
    pub fn new(b: &mut B, res: &mut Resources<B>, model: &Model, quant: QuantTarget, plan: &StreamPlan, progress: &dyn Progress) -> Result<Self> {
        let host: Vec<Vec<Mlp>> = model
            .weights
            .routed_layers(plan.mtp)
            .iter()
            .enumerate()
            .filter(|(l, _)| plan.layers.contains(l))
            .map(|(_, moe)| {
                progress.advance(3 * moe.experts.len() as u64);
                moe.experts.par_iter().map(|m| m.quantized(quant)).collect()
            })
            .collect();
        for pool in &plan.pools {
            res.pools.push(b.pool(&plan.template, pool.slots, plan.max_pairs)?);
        }
        let slot_bytes = plan.template.matrices().iter().map(|m| crate::plan::layout::SlotLayout::new(m).slot_bytes()).sum();
        Ok(Streaming {
            cache: ExpertCache::new(plan.slots, plan.eviction),
            pools: plan.pools.clone(),
            host,
            layers: Vec::new(),
            k: model.config.num_experts_per_tok,
            ids: plan.ids,
            guess_ids: plan.guess_ids,
            guess: None,
            prefetched: HashSet::new(),
            lists: vec![Vec::with_capacity(2 * plan.max_pairs); plan.pools.len()],
            slot_bytes,
            counters: StreamCounters::default(),
        })
    }

    pub fn slots(&self) -> usize {
        self.cache.slots()
    }

    pub fn pools(&self) -> usize {
        self.pools.len()
    }

    /// Bytes one slot takes (gate, up and down with their scales).
    pub fn slot_bytes(&self) -> u64 {
        self.slot_bytes
    }

    /// MoE layer `layer`'s stop in a step of `n` tokens, after its router was recorded: reads
    /// the chosen ids, makes those experts resident (in rounds when they outnumber the slots)
    /// and records the layer's expert ops for each round.
    pub fn sync(&mut self, b: &mut B, res: &Resources<B>, layer: usize, n: u32) -> Result<()> {
        let count = n as usize * self.k;
        let guess_ids = self.guess_ids.filter(|_| n == 1 && self.layers[layer].predicts_next);
        let waited = Instant::now();
        let read: Vec<u32> = {
            let ids = (res.buf(self.ids), count * 4);
            let bytes = match guess_ids {
                Some(g) => b.read(&[ids, (res.buf(g), self.k * 4)])?,
                None => b.read(&[ids])?,
            };
            bytemuck::pod_collect_to_vec(bytes)
        };
        self.counters.sync_seconds += waited.elapsed().as_secs_f64();
        self.counters.syncs += 1;
        let (ids, next_guess) = read.split_at(count);
        let experts = self.host[layer].len();
        if let Some(bad) = read.iter().find(|&&e| e as usize >= experts) {
            return Err(Error::Invalid(format!("{}: the router chose expert {bad} of {experts} (non-finite activations?)", b.describe())));
        }
        // A guess for another layer (a step that ended early) is stale: dropped unscored.
        if let Some((_, guess)) = self.guess.take().filter(|(guessed, _)| *guessed == layer) {
            self.counters.predicted += guess.len() as u64;
            self.counters.predicted_right += guess.iter().filter(|g| ids.contains(g)).count() as u64;
        }

        let started = Instant::now();
        let rounds = self.cache.plan_rounds(layer as u32, ids, &mut self.counters, &mut self.prefetched);
        for (r, round) in rounds.iter().enumerate() {
            if r > 0 {
                // The next round may overwrite slots this one reads.
                b.flush()?;
            }
            b.uploads_begin()?;
            for &(key, slot) in &round.uploads {
                self.upload(b, res, key, slot)?;
            }
            self.write_lists(b, res, round)?;
            b.uploads_done()?;
            b.record(&self.layers[layer].ops, n)?;
        }
        self.counters.upload_seconds += started.elapsed().as_secs_f64();

        if guess_ids.is_some() {
            // The device works through this layer's experts while the host copies the
            // guesses, which land before the next layer's experts (never in a slot this
            // layer uses).
            b.flush()?;
            self.prefetch(b, res, layer + 1, next_guess)?;
            self.guess = Some((layer + 1, next_guess.to_vec()));
        }
        Ok(())
    }

    /// Each pool's list for one round: (step slot, pool-local slot) for each (token, choice)
    /// this round serves from that pool.
    fn write_lists(&mut self, b: &mut B, res: &Resources<B>, round: &Round) -> Result<()> {
        self.lists.iter_mut().for_each(Vec::clear);
        for &(s, slot) in &round.pairs {
            let (p, local) = self.locate(slot);
            self.lists[p].extend([s, local as u32]);
        }
        for (pool, list) in res.pools.iter().zip(&self.lists) {
            b.write_slot_list(pool, list)?;
        }
        Ok(())
    }

    /// The pool holding global slot `slot`, and the slot's index in it.
    fn locate(&self, slot: usize) -> (usize, usize) {
        PoolSpec::locate(&self.pools, slot)
    }

    /// Queues the copy of expert `key` into global slot `slot`.
    fn upload(&mut self, b: &mut B, res: &Resources<B>, key: ExpertKey, slot: usize) -> Result<()> {
        let (p, local) = self.locate(slot);
        let expert = &self.host[key.layer as usize][key.expert as usize];
        self.counters.bytes_uploaded += b.write_expert(&res.pools[p], local, expert)?;
        Ok(())
    }

    /// Uploads guessed experts of `layer` that are not resident, into slots nothing recorded
    /// for this step still needs.
    fn prefetch(&mut self, b: &mut B, res: &Resources<B>, layer: usize, guess: &[u32]) -> Result<()> {
        let started = Instant::now();
        let keys: Vec<ExpertKey> = guess.iter().map(|&expert| ExpertKey { layer: layer as u32, expert }).collect();
        b.uploads_begin()?;
        for (key, slot) in self.cache.prefetch(&keys) {
            self.upload(b, res, key, slot)?;
            self.prefetched.insert(key);
            self.counters.prefetched += 1;
        }
        self.counters.prefetch_seconds += started.elapsed().as_secs_f64();
        Ok(())
    }

    /// One line for `--verbose`, per generated or prompt token.
    pub fn summary(&self, tokens: u64, step_seconds: f64) -> String {
        self.counters.summary(self.slots(), self.slot_bytes, self.pools(), tokens, step_seconds)
    }
}
