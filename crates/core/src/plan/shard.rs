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

/// What one rank of a divided model holds and moves per decoded token: from its plan
/// (`Plan::rank_traffic`) or, for a model not at hand, from its config as published
/// ([`published_traffic`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RankTraffic {
    pub rank: usize,
    pub world: usize,
    /// Routed experts this rank holds (over every MoE layer), of `total_experts`.
    pub experts: u64,
    pub total_experts: u64,
    /// One routed expert's bytes (gate, up, down and their scales).
    pub expert_bytes: u64,
    /// Weights other than routed experts: every rank holds them all.
    pub other_weight_bytes: u64,
    /// The embedding table (a decoded token reads one row of it).
    pub embed_bytes: u64,
    pub embed_row_bytes: u64,
    pub moe_layers: usize,
    pub top_k: usize,
    pub hidden: usize,
}

impl RankTraffic {
    /// Weight bytes on the device.
    pub fn weight_bytes(&self) -> u64 {
        self.other_weight_bytes + self.experts * self.expert_bytes
    }

    /// Weight bytes a decoded token reads here: the weights other than routed experts (one
    /// embedding row), and of each MoE layer's top-k experts the share this rank holds.
    pub fn read_per_token(&self) -> f64 {
        let held = self.experts as f64 / self.total_experts.max(1) as f64;
        (self.other_weight_bytes - self.embed_bytes + self.embed_row_bytes) as f64 + self.moe_layers as f64 * self.top_k as f64 * held * self.expert_bytes as f64
    }

    /// Bytes of rank 0's router choice per token (ids and weights, every MoE layer).
    pub fn choice_bytes(&self) -> u64 {
        (self.moe_layers * self.top_k * 8) as u64
    }

    /// Bytes of partial sums each rank all-reduces per token (f32 hidden rows, every MoE layer).
    pub fn reduce_bytes(&self) -> u64 {
        (self.moe_layers * self.hidden * 4) as u64
    }

    /// What one rank sends (and receives) per token in a ring all-reduce (NCCL's): 2(N-1)/N of
    /// the partial sums.
    pub fn ring_bytes(&self) -> f64 {
        2.0 * (self.world as f64 - 1.0) / self.world as f64 * self.reduce_bytes() as f64
    }

    pub fn describe(&self) -> String {
        use crate::util::human_bytes;
        format!(
            "rank {} of {}: {} of {} routed experts ({}) + {} of other weights = {}; a decoded token reads {} here and exchanges {} of router choice + {} of partial sums \
             ({} per rank each way in NCCL's ring)",
            self.rank,
            self.world,
            self.experts,
            self.total_experts,
            human_bytes(self.experts * self.expert_bytes),
            human_bytes(self.other_weight_bytes),
            human_bytes(self.weight_bytes()),
            human_bytes(self.read_per_token() as u64),
            human_bytes(self.choice_bytes()),
            human_bytes(self.reduce_bytes()),
            human_bytes(self.ring_bytes() as u64),
        )
    }
}

/// `config`'s model as DeepSeek publishes its weights (FP8 e4m3 with a f32 scale per 128x128
/// block for every linear layer but the embedding, head and router, which are bf16), divided
/// evenly among `world` ranks: rank 0's share (the others differ by at most one expert per layer).
pub fn published_traffic(config: &crate::config::ModelConfig, world: usize) -> RankTraffic {
    let c = config;
    let fp8 = |rows: usize, cols: usize| (rows * cols + rows.div_ceil(128) * cols.div_ceil(128) * 4) as u64;
    let bf16 = |rows: usize, cols: usize| (rows * cols * 2) as u64;
    let (h, heads) = (c.hidden_size, c.num_attention_heads);
    let qk = c.qk_nope_head_dim + c.qk_rope_head_dim;
    let q = match c.q_lora_rank {
        Some(r) => fp8(r, h) + fp8(heads * qk, r),
        None => fp8(heads * qk, h),
    };
    let attention = q + fp8(c.kv_lora_rank + c.qk_rope_head_dim, h) + fp8(heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank) + fp8(h, heads * c.v_head_dim);
    let mlp = |width: usize| 2 * fp8(width, h) + fp8(h, width);
    let moe_layers = (0..c.num_hidden_layers).filter(|&l| c.is_moe_layer(l)).count();
    let dense = c.num_hidden_layers - moe_layers;
    let shared = if c.n_shared_experts > 0 { mlp(c.n_shared_experts * c.moe_intermediate_size) } else { 0 };
    let embed = bf16(c.vocab_size, h);
    let other = embed + bf16(c.vocab_size, h) + c.num_hidden_layers as u64 * attention + dense as u64 * mlp(c.intermediate_size) + moe_layers as u64 * (shared + bf16(c.n_routed_experts, h));
    let per_layer = c.n_routed_experts.div_ceil(world.max(1));
    RankTraffic {
        rank: 0,
        world,
        experts: (moe_layers * per_layer) as u64,
        total_experts: (moe_layers * c.n_routed_experts) as u64,
        expert_bytes: mlp(c.moe_intermediate_size),
        other_weight_bytes: other,
        embed_bytes: embed,
        embed_row_bytes: (h * 2) as u64,
        moe_layers,
        top_k: c.num_experts_per_tok,
        hidden: h,
    }
}
