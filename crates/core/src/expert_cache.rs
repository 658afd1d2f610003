//! Which routed experts sit in which GPU slots: slot allocation and eviction for expert
//! streaming, independent of any GPU API (the wgpu backend owns the buffers, this owns the
//! bookkeeping). One global pool of equal slots serves every MoE layer.

use crate::plan::budget::Eviction;
use std::collections::HashMap;

/// A routed expert: (MoE layer index counted over MoE layers only, expert index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExpertKey {
    pub layer: u32,
    pub expert: u32,
}

/// Where an expert was placed and whether its weights must be copied there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub slot: usize,
    pub upload: bool,
}

pub struct ExpertCache {
    policy: Eviction,
    held: Vec<Option<ExpertKey>>,
    slot_of: HashMap<ExpertKey, usize>,
    last_used: Vec<u64>,
    uses: Vec<u32>,
    clock: u64,
    loads: u64,
}

impl ExpertCache {
    pub fn new(slots: usize, policy: Eviction) -> ExpertCache {
        assert!(slots > 0, "an expert cache needs at least one slot");
        ExpertCache { policy, held: vec![None; slots], slot_of: HashMap::new(), last_used: vec![0; slots], uses: vec![0; slots], clock: 0, loads: 0 }
    }

    pub fn slots(&self) -> usize {
        self.held.len()
    }

    #[cfg(test)]
    pub fn slot_of(&self, key: ExpertKey) -> Option<usize> {
        self.slot_of.get(&key).copied()
    }

    /// Makes every expert of `wanted` resident at once (at most `slots()` distinct experts):
    /// hits keep their slot, misses take free slots, then evict by the policy, never one of
    /// `wanted` itself. Returns one placement per entry of `wanted`, in order.
    pub fn acquire(&mut self, wanted: &[ExpertKey]) -> Vec<Placement> {
        self.clock += 1;
        let distinct: std::collections::HashSet<ExpertKey> = wanted.iter().copied().collect();
        assert!(distinct.len() <= self.slots(), "{} experts wanted at once, {} slots", distinct.len(), self.slots());
        // Touch hits first so they are protected from this call's evictions.
        for key in wanted {
            if let Some(&slot) = self.slot_of.get(key) {
                self.last_used[slot] = self.clock;
            }
        }
        let mut out = Vec::with_capacity(wanted.len());
        let mut counted = std::collections::HashSet::new();
        for &key in wanted {
            let slot = match self.slot_of.get(&key) {
                Some(&slot) => {
                    // One use per expert per call, however often it is wanted.
                    if counted.insert(key) {
                        self.uses[slot] = self.uses[slot].saturating_add(1);
                    }
                    out.push(Placement { slot, upload: false });
                    continue;
                }
                None => self.victim(),
            };
            self.load(slot, key);
            counted.insert(key);
            out.push(Placement { slot, upload: true });
        }
        out
    }

    /// Loads `keys` ahead of need (prefetch), those not resident yet, evicting by the policy
    /// but never an expert used at the current clock tick nor one of `keys`. Returns the
    /// (key, slot) pairs to fill; guesses that find no such slot are dropped.
    pub fn prefetch(&mut self, keys: &[ExpertKey]) -> Vec<(ExpertKey, usize)> {
        let mut loaded: Vec<(ExpertKey, usize)> = Vec::new();
        for &key in keys {
            if self.slot_of.contains_key(&key) {
                continue;
            }
            let Some(slot) = self.victim_except(&loaded) else { break };
            self.load(slot, key);
            // Prefetched but not yet used: older than anything used at this tick, so a wrong
            // guess goes first, and no use counted.
            self.last_used[slot] = self.clock.saturating_sub(1);
            self.uses[slot] = 0;
            loaded.push((key, slot));
        }
        loaded
    }

    fn load(&mut self, slot: usize, key: ExpertKey) {
        if let Some(old) = self.held[slot].take() {
            self.slot_of.remove(&old);
        }
        self.held[slot] = Some(key);
        self.slot_of.insert(key, slot);
        self.last_used[slot] = self.clock;
        self.uses[slot] = 1;
        self.loads += 1;
        if self.policy == Eviction::Lfu && self.loads.is_multiple_of(self.slots() as u64) {
            for u in &mut self.uses {
                *u /= 2;
            }
        }
    }

    /// A free slot, else the policy's choice among slots not used at the current tick.
    fn victim(&self) -> usize {
        // acquire() asserts there are enough slots for what it protects.
        self.victim_except(&[]).expect("a slot not wanted at this tick")
    }

    fn victim_except(&self, taken: &[(ExpertKey, usize)]) -> Option<usize> {
        let free = |s: usize| !taken.iter().any(|&(_, t)| t == s);
        if let Some(slot) = (0..self.slots()).find(|&s| self.held[s].is_none() && free(s)) {
            return Some(slot);
        }
        let candidates = (0..self.slots()).filter(|&s| self.last_used[s] < self.clock && free(s));
        match self.policy {
            Eviction::Lru => candidates.min_by_key(|&s| (self.last_used[s], s)),
            Eviction::Lfu => candidates.min_by_key(|&s| (self.uses[s], self.last_used[s], s)),
        }
    }
}

/// Streaming counters for `--verbose` and benchmarks (every backend that streams experts).
#[derive(Debug, Default, Clone, Copy)]
pub struct StreamCounters {
    /// Expert uses found resident (including correct prefetches) and uses that had to upload.
    pub hits: u64,
    pub misses: u64,
    /// Experts uploaded ahead of need, and how many of those were then used.
    pub prefetched: u64,
    pub prefetch_used: u64,
    /// Router guesses made for the next layer, and how many the router then chose.
    pub predicted: u64,
    pub predicted_right: u64,
    pub bytes_uploaded: u64,
    /// Host time queuing uploads the step waited for (misses), and queuing prefetches while
    /// the GPU worked.
    pub upload_seconds: f64,
    pub prefetch_seconds: f64,
    /// Host time blocked on the GPU at MoE layers (reading back the router's choice).
    pub sync_seconds: f64,
    pub syncs: u64,
    /// Expert rounds (more than one per layer when a chunk wants more experts than slots).
    pub rounds: u64,
}

impl StreamCounters {
    /// One line for `--verbose`, per generated or prompt token.
    pub fn summary(&self, slots: usize, slot_bytes: u64, pools: usize, tokens: u64, step_seconds: f64) -> String {
        let c = self;
        let uses = (c.hits + c.misses).max(1) as f64;
        let mut line = format!(
            "expert cache: {} slots of {} in {} pool(s); hit rate {:.1}% ({} hits, {} misses), {} uploaded per token, \
             {:.1}% of step time queuing needed uploads, {:.1}% blocked on the GPU at MoE layers (its compute included), {:.2} rounds per layer",
            slots,
            crate::util::human_bytes(slot_bytes),
            pools,
            100.0 * c.hits as f64 / uses,
            c.hits,
            c.misses,
            crate::util::human_bytes(c.bytes_uploaded / tokens.max(1)),
            100.0 * c.upload_seconds / step_seconds.max(1e-9),
            100.0 * c.sync_seconds / step_seconds.max(1e-9),
            c.rounds as f64 / c.syncs.max(1) as f64,
        );
        if c.predicted > 0 {
            line += &format!(
                "; prefetch: {:.1}% of guesses right, {} prefetched, {:.1}% of those used",
                100.0 * c.predicted_right as f64 / c.predicted as f64,
                c.prefetched,
                100.0 * c.prefetch_used as f64 / c.prefetched.max(1) as f64
            );
        }
        line
    }
}

/// One round of a MoE layer's experts in a step: what to upload where, then which step slots
/// to compute from which cache slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Round {
    pub uploads: Vec<(ExpertKey, usize)>,
    /// (step slot `t * k + i`, cache slot) for every choice this round serves.
    pub pairs: Vec<(u32, usize)>,
}

impl ExpertCache {
    /// Makes MoE layer `layer`'s chosen experts (`ids`, one per step slot) resident: distinct
    /// experts in order of first use, in rounds of at most `slots` (a prefill chunk may want
    /// more), so each is uploaded at most once per call. Counts hits and misses; a hit on an
    /// expert in `prefetched` counts as a used prefetch and leaves the set.
    pub fn plan_rounds(&mut self, layer: u32, ids: &[u32], counters: &mut StreamCounters, prefetched: &mut std::collections::HashSet<ExpertKey>) -> Vec<Round> {
        let mut distinct: Vec<u32> = Vec::new();
        for &e in ids {
            if !distinct.contains(&e) {
                distinct.push(e);
            }
        }
        let slots = self.slots();
        distinct
            .chunks(slots)
            .map(|round| {
                let keys: Vec<ExpertKey> = round.iter().map(|&expert| ExpertKey { layer, expert }).collect();
                let placements = self.acquire(&keys);
                let mut uploads = Vec::new();
                for (key, p) in keys.iter().zip(&placements) {
                    if p.upload {
                        counters.misses += 1;
                        uploads.push((*key, p.slot));
                    } else {
                        counters.hits += 1;
                        if prefetched.remove(key) {
                            counters.prefetch_used += 1;
                        }
                    }
                }
                let pairs: Vec<(u32, usize)> = ids.iter().enumerate().filter_map(|(s, e)| round.iter().position(|r| r == e).map(|i| (s as u32, placements[i].slot))).collect();
                // Uses beyond the first of an expert within the call are hits too.
                counters.hits += (pairs.len() - round.len()) as u64;
                counters.rounds += 1;
                Round { uploads, pairs }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(layer: u32, expert: u32) -> ExpertKey {
        ExpertKey { layer, expert }
    }

    fn uploads(p: &[Placement]) -> Vec<bool> {
        p.iter().map(|p| p.upload).collect()
    }

    #[test]
    fn fills_free_slots_then_hits() {
        let mut c = ExpertCache::new(3, Eviction::Lru);
        let first = c.acquire(&[key(0, 5), key(0, 1)]);
        assert_eq!(first, vec![Placement { slot: 0, upload: true }, Placement { slot: 1, upload: true }]);
        let again = c.acquire(&[key(0, 1), key(0, 5), key(1, 5)]);
        assert_eq!(again, vec![Placement { slot: 1, upload: false }, Placement { slot: 0, upload: false }, Placement { slot: 2, upload: true }]);
    }

    #[test]
    fn repeats_within_a_call_share_a_slot() {
        let mut c = ExpertCache::new(2, Eviction::Lru);
        let p = c.acquire(&[key(0, 3), key(0, 3), key(0, 4), key(0, 3)]);
        assert_eq!(p.iter().map(|p| p.slot).collect::<Vec<_>>(), vec![0, 0, 1, 0]);
        assert_eq!(uploads(&p), vec![true, false, true, false]);
    }

    #[test]
    fn lru_evicts_the_least_recently_used() {
        let mut c = ExpertCache::new(3, Eviction::Lru);
        c.acquire(&[key(0, 0)]);
        c.acquire(&[key(0, 1)]);
        c.acquire(&[key(0, 2)]);
        c.acquire(&[key(0, 0)]); // 1 is now the oldest
        let p = c.acquire(&[key(0, 3)]);
        assert_eq!(p, vec![Placement { slot: 1, upload: true }]);
        assert_eq!(c.slot_of(key(0, 1)), None);
        let p = c.acquire(&[key(0, 4)]); // then 2
        assert_eq!(p[0].slot, 2);
    }

    #[test]
    fn never_evicts_an_expert_wanted_in_the_same_call() {
        let mut c = ExpertCache::new(2, Eviction::Lru);
        c.acquire(&[key(0, 0)]);
        c.acquire(&[key(0, 1)]);
        // 0 is the LRU but is wanted now together with a miss: 1 must go.
        let p = c.acquire(&[key(0, 0), key(0, 2)]);
        assert_eq!(p, vec![Placement { slot: 0, upload: false }, Placement { slot: 1, upload: true }]);
    }

    #[test]
    fn lfu_keeps_popular_experts() {
        let mut c = ExpertCache::new(2, Eviction::Lfu);
        for _ in 0..3 {
            c.acquire(&[key(0, 0)]);
        }
        c.acquire(&[key(0, 1)]);
        // 0 was used three times, 1 once but more recently: LFU evicts 1, LRU would evict 0.
        let p = c.acquire(&[key(0, 2)]);
        assert_eq!(p[0].slot, 1);
        assert!(c.slot_of(key(0, 0)).is_some());

        let mut lru = ExpertCache::new(2, Eviction::Lru);
        for _ in 0..3 {
            lru.acquire(&[key(0, 0)]);
        }
        lru.acquire(&[key(0, 1)]);
        assert_eq!(lru.acquire(&[key(0, 2)])[0].slot, 0);
    }

    #[test]
    fn prefetch_loads_without_taking_what_is_in_use_now() {
        let mut c = ExpertCache::new(2, Eviction::Lru);
        c.acquire(&[key(0, 0), key(0, 1)]);
        // Both slots were used at this tick: nothing may be evicted for a guess.
        assert_eq!(c.prefetch(&[key(1, 7)]), vec![]);
        c.acquire(&[key(0, 0)]);
        // Now slot 1 (expert 1) is older: a guess may take it, and only one can.
        assert_eq!(c.prefetch(&[key(1, 7), key(1, 8)]), vec![(key(1, 7), 1)]);
        assert_eq!(c.prefetch(&[key(1, 7)]), vec![], "already resident");
        // The guess comes true: a hit, no upload.
        assert_eq!(c.acquire(&[key(1, 7)]), vec![Placement { slot: 1, upload: false }]);
    }

    #[test]
    fn a_wrong_guess_is_evicted_first() {
        let mut c = ExpertCache::new(3, Eviction::Lru);
        c.acquire(&[key(0, 0)]);
        c.acquire(&[key(0, 1)]);
        c.acquire(&[key(0, 2)]);
        c.acquire(&[key(0, 0), key(0, 1)]);
        assert_eq!(c.prefetch(&[key(1, 9)]), vec![(key(1, 9), 2)]);
        let p = c.acquire(&[key(0, 0), key(0, 1), key(0, 5)]);
        assert_eq!(p[2], Placement { slot: 2, upload: true }, "the unused guess gives way");
    }

    #[test]
    fn a_prefetch_batch_does_not_evict_itself() {
        let mut c = ExpertCache::new(4, Eviction::Lru);
        c.acquire(&[key(0, 0), key(0, 1), key(0, 2), key(0, 3)]);
        c.acquire(&[key(1, 0)]);
        let p = c.prefetch(&[key(2, 0), key(2, 1), key(2, 2), key(2, 3)]);
        assert_eq!(p.len(), 3, "one slot is in use at this tick");
        let slots: std::collections::HashSet<usize> = p.iter().map(|&(_, s)| s).collect();
        assert_eq!(slots.len(), 3);
        for (k, s) in p {
            assert_eq!(c.slot_of(k), Some(s));
        }
    }

    #[test]
    fn every_slot_is_used_and_no_slot_holds_two_experts() {
        let mut c = ExpertCache::new(5, Eviction::Lfu);
        let mut x = 12345u64;
        for _ in 0..500 {
            let mut wanted = Vec::new();
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                wanted.push(key((x % 3) as u32, (x >> 8) as u32 % 8));
            }
            let p = c.acquire(&wanted);
            for (k, p) in wanted.iter().zip(&p) {
                assert_eq!(c.slot_of(*k), Some(p.slot));
            }
        }
        let mut seen: Vec<usize> = c.slot_of.values().copied().collect();
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
    }
}
