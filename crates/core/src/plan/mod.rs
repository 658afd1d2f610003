//! The forward pass as a plan: backend-neutral ops over named buffers and weights, built once
//! from the config, the weights and the options, and lowered by every GPU backend (the CPU
//! reference in `model` stays an independent oracle and does not go through it).
//!
//! A plan holds everything a backend needs to run the model and nothing about how: the
//! buffers (activations sized for a step's tokens, latent caches, constants such as norm
//! weights), the weight matrices (with whether a kernel may read them in row chunks), the ops
//! of a step (the body for every token, the logits heads, the greedy argmax), what expert
//! streaming needs (where each MoE layer stops for its router's choice, the next layer's
//! early router for prefetch, the slot pools), and the memory plan the budget was divided by.

pub mod budget;
mod build;
mod describe;
pub mod layout;
pub mod ops;
pub mod placement;
pub mod shard;

pub use build::{attention, build, AttentionBuffers, AttentionWeights, IndexerBuffers, IndexerWeights, QueryWeights};
pub use ops::{ExpertMatrix, ExpertWeights, IndexerShape, MlaShape, Op, Rows, NOT_HERE};

use crate::model::weights::{Matrix, Mlp};
use crate::quant::QuantTarget;
use budget::Eviction;
use budget::MemoryPlan;
use std::borrow::Cow;

/// A buffer of the plan (an index into `Plan::buffers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BufferId(pub usize);

/// A weight matrix or expert stack of the plan (an index into `Plan::weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WeightId(pub usize);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferKind {
    /// Written and read within a step, sized for the plan's most tokens per step.
    Activation,
    /// A layer's latent cache: `capacity` tokens of `kv_lora_rank + qk_rope_head_dim` values
    /// for each of the plan's sequences (sequence s from row `s * capacity`).
    Cache,
    /// Written once at load (norm weights, biases, RoPE frequencies).
    Constant,
    /// The backend's working space for one op (sized by the backend's target).
    Scratch,
}

/// A device buffer of 32-bit words (f32 or u32).
#[derive(Debug, Clone)]
pub struct BufferSpec<'m> {
    pub name: String,
    pub words: usize,
    pub kind: BufferKind,
    /// Contents of a constant.
    pub init: Option<Cow<'m, [f32]>>,
}

/// One matrix, or a MoE layer's experts stacked, as the kernels read it.
#[derive(Debug, Clone)]
pub struct WeightSpec<'m> {
    pub name: String,
    pub stack: Vec<&'m Matrix>,
    /// Only row-chunk-aware kernels (matmul, embedding) read it, so a backend may split it.
    pub chunked: bool,
    /// `--quant` converts it (the router stays as stored: small, and routing is sensitive to it).
    pub convert: bool,
    /// Routed experts: not part of the resident bytes (expert streaming may keep them off).
    pub routed: bool,
}

impl WeightSpec<'_> {
    /// Bytes on the device in the format `quant` gives it.
    pub fn device_bytes(&self, quant: QuantTarget) -> u64 {
        let quant = if self.convert { quant } else { QuantTarget::Keep };
        self.stack.iter().map(|m| m.device_bytes(quant)).sum()
    }
}

/// The limits a plan is built for, from the backend that will lower it.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Most tokens one step processes (longer prompts run in chunks).
    pub max_chunk: usize,
    /// 32-bit words the backend's attention kernel works in for `max_chunk` tokens.
    pub attention_scratch: usize,
    /// Largest buffer one kernel binding may cover: expert slot pools are split at it.
    pub binding_limit: u64,
    /// Largest stack of a layer's routed experts the backend binds whole (resident experts);
    /// beyond it they stream through slot pools even where the budget holds them all.
    pub stack_limit: u64,
    /// Device bytes the backend keeps outside the plan's buffers (read-back staging, its own
    /// scratch), counted in the memory plan.
    pub private_bytes: u64,
    /// Device memory `--gpu-mem auto` takes its share of (None: unknown, keep everything).
    pub memory: Option<u64>,
    /// The "GPU" is the CPU (a software adapter, the CUDA emulator): `--prefetch auto` is off.
    pub software: bool,
    /// Shapes the backend's kernels hold in registers and on-chip memory.
    pub kernels: KernelLimits,
    /// Resident routed experts are grouped by expert before their matmuls (`GroupExperts`).
    pub group_experts: bool,
    /// The backend is a GPU beside the host: routed experts may be computed on the CPU
    /// instead (`HostExperts`, hybrid placement).
    pub hybrid: bool,
}

/// The largest routing and indexer shapes a backend's kernels take: the router keeps every
/// expert's score, each group's and the chosen ids of a token on chip; the indexer a token's
/// normalised key. A model beyond them is refused when its plan is built, naming the limit.
#[derive(Debug, Clone, Copy)]
pub struct KernelLimits {
    pub experts: usize,
    pub groups: usize,
    pub top_k: usize,
    pub index_dim: usize,
}

/// A pool of expert slots: slots `first .. first + slots` of the cache, in buffers that each
/// fit one binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSpec {
    pub first: usize,
    pub slots: usize,
}

impl PoolSpec {
    /// The pool of `pools` holding global slot `slot`, and the slot's index in it.
    pub fn locate(pools: &[PoolSpec], slot: usize) -> (usize, usize) {
        let p = pools.iter().position(|p| slot >= p.first && slot < p.first + p.slots).expect("a slot within a pool");
        (p, slot - pools[p].first)
    }
}

/// Expert streaming under the budget: routed experts live in host memory and a device cache.
#[derive(Debug, Clone)]
pub struct StreamPlan {
    pub slots: usize,
    pub pools: Vec<PoolSpec>,
    pub eviction: Eviction,
    /// One expert in the device format: the shape of every slot.
    pub template: Mlp,
    /// The router's choice the host reads at each MoE layer, and the early router's guess
    /// (present when prefetch is on: the next MoE layer's router runs early in decode steps).
    pub ids: BufferId,
    pub guess_ids: Option<BufferId>,
    /// Step slots one round can serve: tokens per step x experts per token.
    pub max_pairs: usize,
    /// The MTP layer's routed experts stream too, as the MoE layer after the main model's.
    pub mtp: bool,
    /// The MoE layers streamed, ascending (the others run on the host, `HostPlan`).
    pub layers: Vec<usize>,
}

/// Routed experts computed on the host's CPU (hybrid placement): the first `layers` MoE
/// layers' (`--n-cpu-moe`, or what does not fit `--gpu-mem`), each a `HostExperts` op.
#[derive(Debug, Clone)]
pub struct HostPlan<'m> {
    pub layers: usize,
    /// Their expert stacks, read from the memory-mapped checkpoint (or converted by `--quant`).
    pub weights: Vec<WeightSpec<'m>>,
    /// The plan buffers the host's ops use: the host keeps its own copies of these.
    pub buffers: Vec<BufferId>,
    /// How the host's matmuls multiply (`--math`).
    pub math: budget::Math,
    /// The GPU's experts of layers split between the devices and its staging slots for a
    /// prompt chunk's uploads, where there are any.
    pub split: Option<SplitPlan>,
    /// Whether a prompt chunk's experts may be uploaded (`PromptUploads`, resolved for the
    /// device): `Some(on)`, `on` uploading whatever two tokens use, not by measured rates.
    pub uploads: Option<bool>,
    /// Earlier runs' router counts, which this run's are added to and written back.
    pub counts: Option<std::sync::Arc<placement::ExpertCounts>>,
}

/// The GPU's experts of MoE layers split between the GPU and the host: resident in slot pools
/// (as expert streaming's, but filled once at load), each stop listing the slots the GPU computes.
#[derive(Debug, Clone)]
pub struct SplitPlan {
    pub pools: Vec<PoolSpec>,
    /// One expert in the device format: the shape of every slot.
    pub template: Mlp,
    /// Global slot i holds expert `slots[i].1` of MoE layer `slots[i].0`.
    pub slots: Vec<(usize, u32)>,
    /// Slots after those, filled per prompt chunk with its most used host experts.
    pub staging: usize,
    /// Step slots one stop can list: tokens per step x experts per token.
    pub max_pairs: usize,
}

/// This rank's routed experts under expert parallelism: resident in slot pools filled at load
/// (as a split hybrid layer's), each MoE layer's stop listing the slots this rank computes;
/// those that do not fit its budget computed on its host's CPU.
#[derive(Debug, Clone)]
pub struct ShardPlan<'m> {
    pub shard: std::sync::Arc<shard::ExpertShard>,
    pub pools: Vec<PoolSpec>,
    /// One expert in the device format: the shape of every slot.
    pub template: Mlp,
    /// Global slot i holds expert `slots[i].1` of MoE layer `slots[i].0`.
    pub slots: Vec<(usize, u32)>,
    /// Where the rank's GPU experts do not all fit its budget under `--expert-placement
    /// stream`: `slots` are streamed through a cache of this many slots (the pools), with this
    /// eviction, instead of filling the pools at load.
    pub cache: Option<(usize, Eviction)>,
    /// The rank's experts its host computes, (MoE layer, expert), and what the host needs.
    pub host_slots: Vec<(usize, u32)>,
    pub host: Option<ShardHost<'m>>,
    /// Step slots one stop can list: tokens per step x experts per token.
    pub max_pairs: usize,
    /// Routed experts of the model over every MoE layer, and per token per layer.
    pub total_experts: u64,
    pub top_k: usize,
    pub hidden: usize,
}

/// What a rank's host needs for its experts: their layers' stacks (memory-mapped, or converted
/// by `--quant`; the ops' stack ids index these), the plan buffers its ops use (the host keeps
/// its own copies), and how its matmuls multiply.
#[derive(Debug, Clone)]
pub struct ShardHost<'m> {
    pub weights: Vec<WeightSpec<'m>>,
    pub buffers: Vec<BufferId>,
    pub math: budget::Math,
}

/// The MTP layer's step (`weights::Mtp`, speculative decoding), run after a main step that kept
/// its hidden states: row i of the step embeds the token after row i's position and reads
/// `hidden` row i (the main step's, or for a chained draft the previous draft's output).
#[derive(Debug, Clone)]
pub struct MtpPlan {
    /// Embedding, both norms, `eh_proj`, the decoder layer with its own latent cache.
    pub body: Vec<Op>,
    /// `shared_head.norm` of the last row into `hidden` row 0, `shared_head.head` into the logits.
    pub head_last: Vec<Op>,
    /// The same for every row (a batched draft, one row per sequence wanted).
    pub head_all: Vec<Op>,
    /// After a main step: its rows' final norm into `hidden` (the MTP step's input).
    pub keep_hidden: Vec<Op>,
    pub hidden: BufferId,
}

pub struct Plan<'m> {
    /// Context per sequence, in tokens.
    pub capacity: usize,
    /// Sequences with their own region of every latent cache (batched decoding).
    pub sequences: usize,
    pub max_chunk: usize,
    pub quant: QuantTarget,
    pub buffers: Vec<BufferSpec<'m>>,
    pub weights: Vec<WeightSpec<'m>>,
    /// Embedding and the layer stack: run for every token of a step.
    pub body: Vec<Op>,
    /// Final norm and lm_head for the step's last token, or for every token.
    pub head_last: Vec<Op>,
    pub head_all: Vec<Op>,
    pub argmax: Op,
    /// The step's token ids (u32), the head's logits and the argmax's ids.
    pub tokens: BufferId,
    /// Where each of the step's tokens goes (u32 pairs): row t's position in its sequence at
    /// `2t`, the latent cache row of that sequence's position 0 at `2t + 1`. A step is any
    /// mix of sequences: a prefill chunk of one, or one token of each of several.
    pub positions: BufferId,
    pub logits: BufferId,
    pub argmax_ids: BufferId,
    pub memory: MemoryPlan,
    /// The budget `--gpu-mem` named, in bytes.
    pub budget: u64,
    pub streaming: Option<StreamPlan>,
    /// Routed experts on the host, where some MoE layers' run there.
    pub host: Option<HostPlan<'m>>,
    /// The MTP layer's step, where the options asked for it (`GpuOptions::mtp`).
    pub mtp: Option<MtpPlan>,
    /// This device's routed experts, where they are divided among devices.
    pub shard: Option<ShardPlan<'m>>,
}

impl<'m> Plan<'m> {
    /// Bytes of the plan's buffers of `kind`.
    pub fn buffer_bytes(&self, kind: BufferKind) -> u64 {
        self.buffers.iter().filter(|b| b.kind == kind).map(|b| b.words as u64 * 4).sum()
    }

    /// Bytes of the weights kept on the device whatever the budget (all but routed experts).
    pub fn resident_weight_bytes(&self) -> u64 {
        self.weights.iter().filter(|w| !w.routed).map(|w| w.device_bytes(self.quant)).sum()
    }
}
