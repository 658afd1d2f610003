//! Expert parallelism's placement: which routed experts each rank (device) holds. Every rank
//! keeps the weights other than routed experts (attention, dense and shared experts, embedding,
//! head) and a share of every MoE layer's routed experts, by expert id; each computes the
//! experts it holds for the rows that chose them, and the partial sums are all-reduced before
//! the combine.

use crate::error::{Error, Result};
use crate::plan::placement::ExpertCounts;

/// One rank's routed experts: `owned[l]` (ascending) of MoE layer l.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertShard {
    pub rank: usize,
    pub world: usize,
    pub owned: Vec<Vec<u32>>,
}

impl ExpertShard {
    /// Experts this rank holds over every MoE layer.
    pub fn experts(&self) -> usize {
        self.owned.iter().map(Vec::len).sum()
    }
}

/// Divides MoE layers of `experts` experts each among ranks in proportion to `shares` (their
/// memory, as llama.cpp's `--tensor-split`): each rank gets its share of every layer's experts
/// (rounded, never more than one over), and within that, where `counts` has this layer's router
/// picks from earlier runs, the most picked experts are spread first so the ranks' loads are
/// even; without counts, experts go round-robin by id.
pub fn shard_experts(experts: &[usize], shares: &[f64], counts: Option<&ExpertCounts>) -> Result<Vec<ExpertShard>> {
    let world = shares.len();
    if world == 0 || shares.iter().any(|s| !s.is_finite() || *s <= 0.0) {
        return Err(Error::Invalid(format!("--tensor-split {shares:?}: one positive weight per device")));
    }
    let total: f64 = shares.iter().sum();
    let mut owned: Vec<Vec<Vec<u32>>> = vec![Vec::with_capacity(experts.len()); world];
    for (layer, &n) in experts.iter().enumerate() {
        // Each rank's room: its share of the layer, rounded up (the sum covers every expert).
        let room: Vec<usize> = shares.iter().map(|s| (n as f64 * s / total).ceil() as usize).collect();
        let loads: Vec<u64> = match counts.and_then(|c| c.layers.get(layer)).filter(|l| l.tokens > 0 && l.counts.len() == n) {
            Some(l) => l.counts.iter().map(|&c| c + 1).collect(),
            None => vec![1; n],
        };
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_by(|&a, &b| loads[b as usize].cmp(&loads[a as usize]).then(a.cmp(&b)));
        let (mut load, mut held) = (vec![0u64; world], vec![0usize; world]);
        let mut layer_owned: Vec<Vec<u32>> = vec![Vec::new(); world];
        for e in order {
            let rank = (0..world)
                .filter(|&r| held[r] < room[r])
                .min_by(|&a, &b| {
                    let key = |r: usize| (load[r] + loads[e as usize]) as f64 / shares[r];
                    key(a).total_cmp(&key(b)).then(a.cmp(&b))
                })
                .expect("the rooms add up to at least the layer's experts");
            load[rank] += loads[e as usize];
            held[rank] += 1;
            layer_owned[rank].push(e);
        }
        for (r, mut mine) in layer_owned.into_iter().enumerate() {
            mine.sort_unstable();
            owned[r].push(mine);
        }
    }
    Ok(owned.into_iter().enumerate().map(|(rank, owned)| ExpertShard { rank, world, owned }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_expert_once_round_robin_without_counts() {
        let shards = shard_experts(&[8, 5], &[1.0, 1.0, 1.0], None).unwrap();
        assert_eq!(shards[0].owned, [vec![0, 3, 6], vec![0, 3]]);
        assert_eq!(shards[1].owned, [vec![1, 4, 7], vec![1, 4]]);
        assert_eq!(shards[2].owned, [vec![2, 5], vec![2]]);
        for layer in 0..2 {
            let mut all: Vec<u32> = shards.iter().flat_map(|s| s.owned[layer].clone()).collect();
            all.sort_unstable();
            assert_eq!(all, (0..[8, 5][layer]).collect::<Vec<u32>>());
        }
    }

    #[test]
    fn shares_and_counts() {
        // A device with three times the memory holds three times the experts.
        let shards = shard_experts(&[16], &[3.0, 1.0], None).unwrap();
        assert_eq!((shards[0].experts(), shards[1].experts()), (12, 4));
        // The two most picked experts land on different ranks.
        let mut counts = ExpertCounts::new(&[4], None);
        counts.layers[0] = crate::plan::placement::LayerCounts { tokens: 10, counts: vec![1, 9, 1, 9] };
        let shards = shard_experts(&[4], &[1.0, 1.0], Some(&counts)).unwrap();
        assert_eq!(shards[0].owned[0], [0, 1]);
        assert_eq!(shards[1].owned[0], [2, 3]);
        assert!(shard_experts(&[4], &[1.0, 0.0], None).is_err());
    }
}
