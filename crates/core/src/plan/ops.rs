//! The forward pass's operations, over named buffers and weights of a plan. Each is one kernel
//! contract that every GPU backend lowers (and that `backend::cpu` and `model` compute on the
//! CPU): the lowering may take several dispatches (row chunks of a large matrix, a split and
//! merge), but never changes what the op computes.

use super::{BufferId, WeightId};
use crate::model::router::RouterParams;
pub use crate::plan::layout::MlaShape;

/// Which of a step's tokens an op covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// Every token of the step (row t is token t).
    All,
    /// Only the step's last token, compacted into row 0: a `RmsNorm` reads the last row and
    /// writes row 0; the ops after it read and write row 0 (the logits head for the last
    /// position, the next layer's early router).
    Last,
}

/// DeepSeek-V3.2's lightning indexer (`config::IndexerConfig`) as its kernels see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IndexerShape {
    pub heads: usize,
    pub dim: usize,
    /// Rotated values at the start of each key and query (the model's `qk_rope_head_dim`).
    pub rope: usize,
    pub topk: usize,
    /// Context per sequence: the row length of the scores.
    pub ctx: usize,
    pub rope_scale: f32,
    /// How the index key cache stores its values (`--kv-cache`, as the latent cache).
    pub cache: crate::plan::layout::CacheFormat,
}

impl IndexerShape {
    /// `(1 / sqrt(dim), sqrt(heads))` in f32, as the CPU reference computes them: the score
    /// kernels of every backend take these.
    pub fn scales(&self) -> (f32, f32) {
        (1.0 / (self.dim as f32).sqrt(), (self.heads as f32).sqrt())
    }
}

/// An expert id the CPU backend's `ExpertMatmul` skips: the slot's expert is computed on the
/// GPU (a hybrid layer split between the devices).
pub const NOT_HERE: u32 = u32::MAX;

/// Which of a MoE layer's expert matrices an `ExpertMatmul` multiplies by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertMatrix {
    Gate,
    Up,
    Down,
}

impl ExpertMatrix {
    /// Slot s reads input row `s / x_div`: gate and up read their token's hidden row (k slots
    /// per token), down its own slot's activations.
    pub fn x_div(self, k: usize) -> usize {
        match self {
            ExpertMatrix::Gate | ExpertMatrix::Up => k,
            ExpertMatrix::Down => 1,
        }
    }
}

/// Where an `ExpertMatmul`'s experts live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertWeights {
    /// The layer's experts stacked on the device (expert e at element `e * rows * cols`): the
    /// router's choice is read on the device.
    Stack(WeightId),
    /// The expert cache's slot pools (`--gpu-mem`, inside `Op::Streamed`): each pool computes
    /// the slots the host lists for it.
    Pools,
}

#[derive(Debug, Clone)]
pub enum Op {
    /// `out[t] = table[tokens[t]]`.
    Embed { table: WeightId, tokens: BufferId, out: BufferId },
    /// `out[t] = weight ⊙ x[t] / sqrt(mean(x[t]²) + eps)` over rows of `dim`.
    RmsNorm { dim: usize, eps: f32, x: BufferId, weight: BufferId, out: BufferId, rows: Rows },
    /// `y[t] = W x[t]` (`accumulate`: `y[t] += W x[t]`, for residual connections).
    Matmul { w: WeightId, x: BufferId, y: BufferId, rows: Rows, accumulate: bool },
    /// `gate[i] = silu(gate[i]) * up[i]` over `width` values per token.
    SiluMul { width: usize, gate: BufferId, up: BufferId },
    /// MLA's latent store: RMSNorm of `kv`'s first `lora` values with `norm`, RoPE of its last
    /// `rope` values at the token's position, written to the latent cache at its sequence's
    /// first row plus that position (`positions`, see [`Plan::positions`](super::Plan)).
    LatentStore { kv: BufferId, norm: BufferId, inv_freq: BufferId, positions: BufferId, cache: BufferId, mla: MlaShape },
    /// RoPE of each head's last `rope` query values at the token's position.
    RopeQ { q: BufferId, inv_freq: BufferId, positions: BufferId, mla: MlaShape },
    /// `q_lat[h] = W_UK[h]ᵀ q_nope[h]` (kv_b's key rows, absorbed into the query).
    QAbsorb { kv_b: WeightId, q: BufferId, q_lat: BufferId, mla: MlaShape },
    /// Causal attention of each head's (q_lat, q_pe) over its sequence's latent cache rows up to
    /// its position: `o_lat[h] = Σ_t softmax(score)[t] c_kv[t]`. `scratch` is the backend's
    /// working space. `sparse` (V3.2): only over the positions `IndexerTopK` selected, at most
    /// `topk` per token.
    Attention { q: BufferId, q_lat: BufferId, positions: BufferId, cache: BufferId, scratch: BufferId, o_lat: BufferId, mla: MlaShape, sparse: Option<(BufferId, usize)> },
    /// V3.2's indexer, per token: LayerNorm (weight `norm`, bias `bias`, eps 1e-6) of its key
    /// `keys[t]` then RoPE of the first `rope` values in the half-split layout (value j with
    /// j + rope/2), stored to the index key cache (`dim` per row, in `shape.cache`'s format) at its position's row;
    /// the same RoPE of each head's query in `queries` in place.
    IndexerPrepare { keys: BufferId, queries: BufferId, norm: BufferId, bias: BufferId, inv_freq: BufferId, positions: BufferId, cache: BufferId, shape: IndexerShape },
    /// `scores[t, j] = Σ_h (weights[t, h] / sqrt(heads)) · relu(queries[t, h] · k_j / sqrt(dim))`
    /// for each position j the token sees (rows of `ctx`).
    IndexerScores { queries: BufferId, weights: BufferId, positions: BufferId, cache: BufferId, scores: BufferId, shape: IndexerShape },
    /// `selected[t]`: the `topk` highest-scoring positions the token sees (ties to the earlier),
    /// ascending; every position while it sees at most `topk`.
    IndexerTopK { scores: BufferId, positions: BufferId, selected: BufferId, shape: IndexerShape },
    /// `o[h] = W_UV[h] o_lat[h]` (kv_b's value rows).
    VUp { kv_b: WeightId, o_lat: BufferId, o: BufferId, mla: MlaShape },
    /// Expert choice per token: `logits [n, experts]` to `ids [n, k]` and `weights [n, k]`.
    Router { params: RouterParams, experts: usize, logits: BufferId, bias: Option<BufferId>, ids: BufferId, weights: BufferId, rows: Rows },
    /// Groups the step's expert slots (`ids`, k per token, of `experts`) by expert, so grouped
    /// `ExpertMatmul`s read each expert's weights once per tile of its slots; `rows`: the gate
    /// (and up) and the down matrices' rows. Emitted where the target groups experts.
    GroupExperts { k: usize, experts: usize, rows: [usize; 2], ids: BufferId },
    /// For each of the step's slots s (k per token): `y[s] = E · x[s / x_div]`, E the `matrix`
    /// of expert `ids[s]` (a SwiGLU MLP's gate, up or down). `grouped`: through the last
    /// `GroupExperts`' tiles (each slot's sums in the same order either way). On the host of
    /// hybrid placement (the CPU backend) a slot whose id is [`NOT_HERE`] is another device's:
    /// its row is zeros.
    ExpertMatmul { matrix: ExpertMatrix, weights: ExpertWeights, k: usize, x: BufferId, y: BufferId, ids: BufferId, grouped: bool },
    /// Routed experts in the expert cache (`--gpu-mem`): the step stops here, the router's
    /// choice comes back to the host, missing experts are uploaded, and `ops` (expert matmuls
    /// over the pools, SwiGLU) run over the slots the host lists, in rounds when the choice
    /// outnumbers the slots. The runtime lowers `ops` itself; backends lower what is inside.
    Streamed {
        /// The MoE layer, counted over MoE layers only.
        layer: usize,
        /// The step also ran the next MoE layer's router early; its guess is read at this stop.
        predicts_next: bool,
        ops: Vec<Op>,
    },
    /// Routed experts computed on the host (hybrid placement, `--cpu-moe`): the step stops
    /// here; the `x` rows, `ids` and `weights` go to the host, whose CPU backend runs `ops`
    /// (expert matmuls over the host's stacks, whose ids index [`HostPlan::weights`](super::HostPlan),
    /// SwiGLU, the weighted sum into `routed`), and `routed` comes back. The `overlap` ops after
    /// this one (the shared expert) do not read `routed`: they go to the GPU before the host
    /// computes, so both work at once. The runtime lowers `ops` on the host.
    HostExperts {
        /// The MoE layer, counted over MoE layers only.
        layer: usize,
        x: BufferId,
        ids: BufferId,
        weights: BufferId,
        routed: BufferId,
        /// A layer split between the devices: the router's weights with the host's slots
        /// zeroed, which the GPU's combine of its own slots reads (the host writes it).
        gpu_weights: Option<BufferId>,
        /// Of the `overlap` ops, the first this many compute the GPU's listed slots (none
        /// listed: the runtime skips them).
        gpu_ops: usize,
        overlap: usize,
        ops: Vec<Op>,
    },
    /// Routed experts divided among ranks (expert parallelism, `plan::shard`): the step stops
    /// here; the router's choice (rank 0's, broadcast) comes to the host, which lists the slots
    /// whose expert this rank holds (in slot pools filled at load) and writes their weights to
    /// `local_weights` (the others' zeroed) and zeros to `routed`; the first `listed` ops after
    /// this one (the listed slots' experts over the pools, their weighted sum into `routed`) run
    /// when any slot is listed, the rest up to `overlap` (the shared expert) always; then
    /// `routed` is read back, all-reduced over the ranks and written back before the combine.
    /// `host_ops`, where the rank computes some of its experts on its host's CPU (hybrid
    /// placement): `x`, the ids of those slots ([`NOT_HERE`] for the others) and their weights go
    /// to the host, whose CPU backend runs them (expert matmuls over the host's stacks, the
    /// weighted sum into its copy of `routed`), and that sum is added to the GPU's before the
    /// all-reduce.
    ShardExperts {
        /// The MoE layer, counted over MoE layers only.
        layer: usize,
        x: BufferId,
        ids: BufferId,
        weights: BufferId,
        local_weights: BufferId,
        routed: BufferId,
        listed: usize,
        overlap: usize,
        host_ops: Vec<Op>,
    },
    /// `h[t] += Σ_i weights[t, i] · expert_out[t * k + i] + shared[t]`; a zero weight adds
    /// nothing whatever its row holds (a slot another device computes, hybrid placement).
    MoeCombine { dim: usize, k: usize, expert_out: BufferId, weights: BufferId, shared: Option<BufferId>, h: BufferId },
    /// `ids[r] = argmax(logits[r])` (ties to the lower index) over the rows the head computed.
    Argmax { vocab: usize, logits: BufferId, ids: BufferId },
}

impl Op {
    /// The op's name in plan dumps and profiles.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Embed { .. } => "embed",
            Op::RmsNorm { .. } => "rmsnorm",
            Op::Matmul { .. } => "matmul",
            Op::SiluMul { .. } => "silu_mul",
            Op::LatentStore { .. } => "latent_store",
            Op::RopeQ { .. } => "rope_q",
            Op::QAbsorb { .. } => "q_absorb",
            Op::Attention { .. } => "attention",
            Op::IndexerPrepare { .. } => "indexer_prepare",
            Op::IndexerScores { .. } => "indexer_scores",
            Op::IndexerTopK { .. } => "indexer_top_k",
            Op::VUp { .. } => "v_up",
            Op::Router { .. } => "router",
            Op::GroupExperts { .. } => "group_experts",
            Op::ExpertMatmul { .. } => "expert_matmul",
            Op::Streamed { .. } => "routed_experts",
            Op::HostExperts { .. } => "host_experts",
            Op::ShardExperts { .. } => "shard_experts",
            Op::MoeCombine { .. } => "moe_combine",
            Op::Argmax { .. } => "argmax",
        }
    }
}
