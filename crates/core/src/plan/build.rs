//! The DeepSeek forward pass written once as plan ops (docs/forward-pass.md): embedding; per layer RMSNorm,
//! MLA in its absorbed form, RMSNorm, a dense MLP or a MoE block (router, routed experts,
//! shared experts, combine); the final norm and lm_head; the greedy argmax.

use super::*;
use crate::error::{Error, Result};
use crate::model::rope::Rope;
use crate::model::router::RouterParams;
use crate::model::weights::{FeedForward, Layer, Moe, QueryProjection};
use crate::model::Model;
use crate::plan::budget::{ExpertPlacement, GpuMem, GpuOptions, PromptUploads};
use crate::plan::layout::{CacheFormat, SlotLayout, LATENT_NORM_EPS};
use crate::plan::placement::{ExpertCounts, LayerPlacement};
use crate::plan::shard::ExpertShard;
use crate::util::Choice;
use std::sync::Arc;

/// How a layer's attention reads its query.
#[derive(Debug, Clone, Copy)]
pub enum QueryWeights {
    /// `q_b_proj · RMSNorm(q_a_proj · x)` (V3, V2).
    LowRank { a: WeightId, norm: BufferId, b: WeightId, rank: usize },
    /// `q_proj · x` (V2-Lite, Moonlight).
    Direct(WeightId),
}

/// One layer's attention weights and its latent cache.
#[derive(Debug, Clone, Copy)]
pub struct AttentionWeights {
    pub q: QueryWeights,
    pub kv_a: WeightId,
    pub kv_norm: BufferId,
    pub kv_b: WeightId,
    pub o: WeightId,
    pub cache: BufferId,
    /// V3.2's lightning indexer (a low-rank query's model only).
    pub indexer: Option<IndexerWeights>,
}

/// One layer's indexer weights and its index key cache.
#[derive(Debug, Clone, Copy)]
pub struct IndexerWeights {
    /// `[heads * dim, q_lora_rank]`, on the query's normalised low-rank activations.
    pub wq_b: WeightId,
    pub wk: WeightId,
    pub k_norm: BufferId,
    pub k_norm_bias: BufferId,
    pub weights_proj: WeightId,
    /// Keys, `dim` per cached position, beside the latent cache and in its format.
    pub cache: BufferId,
}

/// The indexer's activations: keys, queries and head weights of the step's tokens, their
/// scores against every position (rows of the context) and the positions chosen.
#[derive(Debug, Clone, Copy)]
pub struct IndexerBuffers {
    pub keys: BufferId,
    pub queries: BufferId,
    pub weights: BufferId,
    pub scores: BufferId,
    pub selected: BufferId,
    pub shape: IndexerShape,
}

/// The activations an attention layer reads and writes.
#[derive(Debug, Clone, Copy)]
pub struct AttentionBuffers {
    /// The normalised hidden states `[n, hidden]`.
    pub x: BufferId,
    /// `q_a_proj · x` and its norm, for a low-rank query.
    pub q_lora: Option<(BufferId, BufferId)>,
    pub q: BufferId,
    pub kv: BufferId,
    pub q_lat: BufferId,
    pub scratch: BufferId,
    pub o_lat: BufferId,
    pub o: BufferId,
    /// The residual stream the output is added to.
    pub out: BufferId,
    pub inv_freq: BufferId,
    /// The step's token positions and cache rows (`Plan::positions`).
    pub positions: BufferId,
    /// V3.2: the indexer's activations.
    pub indexer: Option<IndexerBuffers>,
}

/// Multi-head latent attention for a step's tokens, the absorbed form docs/forward-pass.md gives: query
/// projections, `kv_a`, the latent store (norm + RoPE into the cache), query RoPE,
/// `q_lat = W_UK^T q_nope`, causal attention over the cache, `W_UV`, and `o_proj` added to the
/// residual stream. With V3.2's indexer, its keys are cached beside the latents and the
/// attention covers only the positions it selects (DeepSeek Sparse Attention).
pub fn attention(mla: &MlaShape, w: &AttentionWeights, b: &AttentionBuffers) -> Vec<Op> {
    let matmul = |w, x, y, accumulate| Op::Matmul { w, x, y, rows: Rows::All, accumulate };
    let mut ops = Vec::new();
    match w.q {
        QueryWeights::LowRank { a, norm, b: qb, rank } => {
            let (qa, qa_norm) = b.q_lora.expect("a low-rank query has its activations");
            ops.push(matmul(a, b.x, qa, false));
            ops.push(Op::RmsNorm { dim: rank, eps: LATENT_NORM_EPS as f32, x: qa, weight: norm, out: qa_norm, rows: Rows::All });
            ops.push(matmul(qb, qa_norm, b.q, false));
        }
        QueryWeights::Direct(q) => ops.push(matmul(q, b.x, b.q, false)),
    }
    ops.push(matmul(w.kv_a, b.x, b.kv, false));
    let positions = b.positions;
    ops.push(Op::LatentStore { kv: b.kv, norm: w.kv_norm, inv_freq: b.inv_freq, positions, cache: w.cache, mla: *mla });
    ops.push(Op::RopeQ { q: b.q, inv_freq: b.inv_freq, positions, mla: *mla });
    ops.push(Op::QAbsorb { kv_b: w.kv_b, q: b.q, q_lat: b.q_lat, mla: *mla });
    let sparse = match (&w.indexer, &b.indexer, b.q_lora) {
        (Some(iw), Some(ib), Some((_, qa_norm))) => {
            ops.extend(indexer(iw, ib, b.x, qa_norm, b.inv_freq, positions));
            Some((ib.selected, ib.shape.topk))
        }
        _ => None,
    };
    ops.push(Op::Attention { q: b.q, q_lat: b.q_lat, positions, cache: w.cache, scratch: b.scratch, o_lat: b.o_lat, mla: *mla, sparse });
    ops.push(Op::VUp { kv_b: w.kv_b, o_lat: b.o_lat, o: b.o, mla: *mla });
    ops.push(matmul(w.o, b.o, b.out, true));
    ops
}

/// V3.2's lightning indexer (transformers' `DeepseekV32Indexer`): the keys (`wk x`, normed,
/// rotated, cached), the queries (`wq_b` of the query's normalised low-rank activations,
/// rotated), the head weights (`weights_proj x`), the scores and the top-k selection.
fn indexer(w: &IndexerWeights, b: &IndexerBuffers, x: BufferId, q_lora: BufferId, inv_freq: BufferId, positions: BufferId) -> Vec<Op> {
    let matmul = |w, x, y| Op::Matmul { w, x, y, rows: Rows::All, accumulate: false };
    let shape = b.shape;
    vec![
        matmul(w.wk, x, b.keys),
        matmul(w.wq_b, q_lora, b.queries),
        matmul(w.weights_proj, x, b.weights),
        Op::IndexerPrepare { keys: b.keys, queries: b.queries, norm: w.k_norm, bias: w.k_norm_bias, inv_freq, positions, cache: w.cache, shape },
        Op::IndexerScores { queries: b.queries, weights: b.weights, positions, cache: w.cache, scores: b.scores, shape },
        Op::IndexerTopK { scores: b.scores, positions, selected: b.selected, shape },
    ]
}

/// Ids handed out while the plan is declared.
struct Declare<'m> {
    buffers: Vec<BufferSpec<'m>>,
    weights: Vec<WeightSpec<'m>>,
    /// Routed expert stacks the host computes with (`HostPlan::weights`).
    host_weights: Vec<WeightSpec<'m>>,
}

impl<'m> Declare<'m> {
    fn buffer(&mut self, name: impl Into<String>, words: usize, kind: BufferKind) -> BufferId {
        self.buffers.push(BufferSpec { name: name.into(), words: words.max(1), kind, init: None });
        BufferId(self.buffers.len() - 1)
    }

    fn activation(&mut self, name: &str, words: usize) -> BufferId {
        self.buffer(name, words, BufferKind::Activation)
    }

    fn constant(&mut self, name: impl Into<String>, values: Cow<'m, [f32]>) -> BufferId {
        let id = self.buffer(name, values.len(), BufferKind::Constant);
        self.buffers[id.0].init = Some(values);
        id
    }

    fn weight(&mut self, stack: Vec<&'m Matrix>, chunked: bool, convert: bool, routed: bool) -> WeightId {
        let name = match stack.len() {
            1 => stack[0].name.clone(),
            n => stack[0].name.replacen(".experts.0.", &format!(".experts.{{0..{}}}.", n - 1), 1),
        };
        self.weights.push(WeightSpec { name, stack, chunked, convert, routed });
        WeightId(self.weights.len() - 1)
    }

    /// A layer's routed experts stacked for the host (an index into `host_weights`).
    fn host_weight(&mut self, stack: Vec<&'m Matrix>) -> WeightId {
        let at = self.weights.len();
        let id = self.weight(stack, false, true, true);
        self.host_weights.push(self.weights.remove(id.0));
        debug_assert_eq!(self.weights.len(), at);
        WeightId(self.host_weights.len() - 1)
    }

    /// A matrix only matmul (or the embedding gather) reads: row chunks allowed.
    fn matrix(&mut self, m: &'m Matrix) -> WeightId {
        self.weight(vec![m], true, true, false)
    }

    fn mlp(&mut self, m: &'m Mlp) -> [WeightId; 3] {
        [self.matrix(&m.gate), self.matrix(&m.up), self.matrix(&m.down)]
    }
}

enum FfnIds<'m> {
    Dense([WeightId; 3]),
    /// `moe`: the MoE layer's index among MoE layers (the MTP layer's comes after the main
    /// model's); `weights`: its routed experts, stacked when resident.
    Moe {
        moe: usize,
        weights: &'m Moe,
        router: WeightId,
        bias: Option<BufferId>,
        shared: Option<[WeightId; 3]>,
    },
}

struct LayerIds<'m> {
    input_norm: BufferId,
    post_norm: BufferId,
    attention: AttentionWeights,
    ffn: FfnIds<'m>,
}

/// `out = down · (silu(gate · x) ⊙ (up · x))`, through `a` and `b` of `width` per token.
fn mlp(ops: &mut Vec<Op>, [gate, up, down]: [WeightId; 3], width: usize, x: BufferId, [a, b]: [BufferId; 2], out: BufferId, accumulate: bool) {
    ops.push(Op::Matmul { w: gate, x, y: a, rows: Rows::All, accumulate: false });
    ops.push(Op::Matmul { w: up, x, y: b, rows: Rows::All, accumulate: false });
    ops.push(Op::SiluMul { width, gate: a, up: b });
    ops.push(Op::Matmul { w: down, x: a, y: out, rows: Rows::All, accumulate });
}

/// Rejects routing and indexer shapes the backend's kernels cannot hold.
fn check_kernel_limits(c: &crate::config::ModelConfig, limits: &KernelLimits) -> Result<()> {
    let KernelLimits { experts, groups, top_k, index_dim } = *limits;
    if c.n_routed_experts > experts || c.n_group > groups || c.num_experts_per_tok > top_k {
        return Err(Error::Invalid(format!(
            "the GPU router handles at most {experts} experts in {groups} groups and {top_k} per token; \
             this model has {} experts in {} groups, {} per token (use --gpu cpu)",
            c.n_routed_experts, c.n_group, c.num_experts_per_tok
        )));
    }
    if let Some(ix) = c.indexer {
        if ix.head_dim > index_dim || ix.head_dim % 2 != 0 || c.qk_rope_head_dim > ix.head_dim || c.q_lora_rank.is_none() {
            return Err(Error::Invalid(format!(
                "the GPU indexer takes keys of an even number of values up to {index_dim}, rotated in their first qk_rope_head_dim, on a low-rank query; \
                 this model's index_head_dim is {} with qk_rope_head_dim {} (use --gpu cpu)",
                ix.head_dim, c.qk_rope_head_dim
            )));
        }
    }
    Ok(())
}

/// The step's activations, sized for `n` tokens.
struct Activations {
    tokens: BufferId,
    h: BufferId,
    xn: BufferId,
    attention: AttentionBuffers,
    /// SwiGLU's gate and up outputs, wide enough for any MLP of the model.
    ffn: [BufferId; 2],
    moe: Option<MoeBuffers>,
    mtp: Option<MtpBuffers>,
    logits: BufferId,
    argmax_ids: BufferId,
}

/// The MTP step's own activations: the main model's (or a previous draft's) normalised hidden
/// states it reads, and its two normalised inputs.
struct MtpBuffers {
    hidden: BufferId,
    e_norm: BufferId,
    h_norm: BufferId,
}

struct MoeBuffers {
    logits: BufferId,
    ids: BufferId,
    weights: BufferId,
    expert_out: BufferId,
    shared_out: Option<BufferId>,
}

/// The next MoE layer's router run early on one token.
struct Guess {
    xn: BufferId,
    logits: BufferId,
    ids: BufferId,
    weights: BufferId,
}

impl Activations {
    fn declare(p: &mut Declare, model: &Model, target: &Target, rope: &Rope, capacity: usize, kv_cache: CacheFormat, mtp: bool) -> Activations {
        let (c, w) = (&model.config, &model.weights);
        let (n, d, k, heads) = (target.max_chunk, c.hidden_size, c.num_experts_per_tok, c.num_attention_heads);
        let tokens = p.activation("tokens", n);
        let h = p.activation("h", n * d);
        let xn = p.activation("xn", n * d);
        let q_lora = c.q_lora_rank.map(|r| (p.activation("qa", n * r), p.activation("qa_norm", n * r)));
        let attention = AttentionBuffers {
            x: xn,
            q_lora,
            q: p.activation("q", n * heads * c.qk_head_dim()),
            kv: p.activation("kv", n * c.latent_dim()),
            q_lat: p.activation("q_lat", n * heads * c.kv_lora_rank),
            scratch: p.buffer("attention scratch", target.attention_scratch, BufferKind::Scratch),
            o_lat: p.activation("o_lat", n * heads * c.kv_lora_rank),
            o: p.activation("o", n * heads * c.v_head_dim),
            out: h,
            inv_freq: p.constant("inv_freq", Cow::Owned(rope.inv_freq.clone())),
            positions: p.activation("positions", 2 * n),
            indexer: c.indexer.map(|ix| {
                let shape = IndexerShape { heads: ix.heads, dim: ix.head_dim, rope: c.qk_rope_head_dim, topk: ix.topk, ctx: capacity, rope_scale: rope.scale, cache: kv_cache };
                IndexerBuffers {
                    keys: p.activation("indexer keys", n * ix.head_dim),
                    queries: p.activation("indexer queries", n * ix.heads * ix.head_dim),
                    weights: p.activation("indexer head weights", n * ix.heads),
                    scores: p.activation("indexer scores", n * capacity),
                    selected: p.activation("indexer selection", n * ix.topk),
                    shape,
                }
            }),
        };
        let layers: Vec<&Layer> = w.layers.iter().chain(w.mtp.as_ref().filter(|_| mtp).map(|m| &m.layer)).collect();
        let moes: Vec<&Moe> = layers
            .iter()
            .filter_map(|l| match &l.ffn {
                FeedForward::Moe(m) => Some(m),
                FeedForward::Dense(_) => None,
            })
            .collect();
        let has_shared = moes.iter().any(|m| m.shared.is_some());
        let widths = layers.iter().map(|l| match &l.ffn {
            FeedForward::Dense(_) => c.intermediate_size,
            FeedForward::Moe(m) => (k * c.moe_intermediate_size).max(if m.shared.is_some() { c.n_shared_experts * c.moe_intermediate_size } else { 0 }),
        });
        let ffn_width = widths.max().unwrap_or(0);
        let ffn = [p.activation("ffn gate", n * ffn_width), p.activation("ffn up", n * ffn_width)];
        let moe = (!moes.is_empty()).then(|| MoeBuffers {
            logits: p.activation("router logits", n * c.n_routed_experts),
            ids: p.activation("expert ids", n * k),
            weights: p.activation("expert weights", n * k),
            expert_out: p.activation("expert out", n * k * d),
            shared_out: has_shared.then(|| p.activation("shared expert out", n * d)),
        });
        let mtp = mtp.then(|| MtpBuffers { hidden: p.activation("mtp hidden", n * d), e_norm: p.activation("mtp embedding norm", n * d), h_norm: p.activation("mtp hidden norm", n * d) });
        Activations { tokens, h, xn, attention, ffn, moe, mtp, logits: p.activation("logits", n * c.vocab_size), argmax_ids: p.activation("argmax ids", n) }
    }
}

/// The weights and constants of the model, layer by layer (routed experts aside: whether they
/// are uploaded depends on the budget).
struct ModelIds<'m> {
    embed: WeightId,
    layers: Vec<LayerIds<'m>>,
    final_norm: BufferId,
    lm_head: WeightId,
    mtp: Option<MtpIds<'m>>,
}

/// The MTP layer's weights (`weights::Mtp`).
struct MtpIds<'m> {
    embed: WeightId,
    enorm: BufferId,
    hnorm: BufferId,
    eh_embed: WeightId,
    eh_hidden: WeightId,
    layer: LayerIds<'m>,
    head_norm: BufferId,
    head: WeightId,
}

impl<'m> ModelIds<'m> {
    fn declare(p: &mut Declare<'m>, model: &'m Model, cache_rows: usize, cache: CacheFormat, mtp: bool) -> ModelIds<'m> {
        let w = &model.weights;
        let embed = p.matrix(&w.embed);
        let mut moe = 0;
        let layers = w.layers.iter().enumerate().map(|(i, layer)| declare_layer(p, model, i, layer, &mut moe, cache_rows, cache)).collect();
        let final_norm = p.constant("final norm", Cow::Borrowed(&w.final_norm));
        // Tied embeddings project with the embedding's own upload.
        let lm_head = if w.lm_head.shares_data(&w.embed) { embed } else { p.matrix(&w.lm_head) };
        let mtp = w.mtp.as_ref().filter(|_| mtp).map(|m| MtpIds {
            embed: if m.embed.shares_data(&w.embed) { embed } else { p.matrix(&m.embed) },
            enorm: p.constant("mtp enorm", Cow::Borrowed(&m.enorm)),
            hnorm: p.constant("mtp hnorm", Cow::Borrowed(&m.hnorm)),
            eh_embed: p.matrix(&m.eh_embed),
            eh_hidden: p.matrix(&m.eh_hidden),
            layer: declare_layer(p, model, m.index, &m.layer, &mut moe, cache_rows, cache),
            head_norm: p.constant("mtp shared_head.norm", Cow::Borrowed(&m.head_norm)),
            head: if m.head.shares_data(&w.lm_head) { lm_head } else { p.matrix(&m.head) },
        });
        ModelIds { embed, layers, final_norm, lm_head, mtp }
    }

    /// The MoE layer after MoE layer `moe`: its post-attention norm, router and bias.
    fn next_moe(&self, moe: usize) -> Option<(BufferId, WeightId, Option<BufferId>)> {
        self.layers.iter().find_map(|l| match l.ffn {
            FfnIds::Moe { moe: m, router, bias, .. } if m == moe + 1 => Some((l.post_norm, router, bias)),
            _ => None,
        })
    }
}

/// One decoder layer's weights, constants and latent cache; `moe` counts MoE layers declared.
fn declare_layer<'m>(p: &mut Declare<'m>, model: &'m Model, i: usize, layer: &'m Layer, moe: &mut usize, cache_rows: usize, cache: CacheFormat) -> LayerIds<'m> {
    let c = &model.config;
    let at = &layer.attention;
    let q = match &at.q {
        QueryProjection::LowRank { a, norm, b } => {
            let (rank, a) = (a.rows, p.matrix(a));
            let norm = p.constant(format!("q_a_layernorm {i}"), Cow::Borrowed(norm));
            QueryWeights::LowRank { a, norm, b: p.matrix(b), rank }
        }
        QueryProjection::Direct(q) => QueryWeights::Direct(p.matrix(q)),
    };
    let attention = AttentionWeights {
        q,
        kv_a: p.matrix(&at.kv_a),
        kv_norm: p.constant(format!("kv_a_layernorm {i}"), Cow::Borrowed(&at.kv_norm)),
        // The absorb kernels read kv_b whole.
        kv_b: p.weight(vec![&at.kv_b], false, true, false),
        o: p.matrix(&at.o),
        cache: p.buffer(format!("latent cache {i} ({})", cache.name()), cache.words(cache_rows * c.latent_dim()), BufferKind::Cache),
        indexer: at.indexer.as_ref().map(|ix| IndexerWeights {
            wq_b: p.matrix(&ix.wq_b),
            wk: p.matrix(&ix.wk),
            k_norm: p.constant(format!("indexer k_norm {i}"), Cow::Borrowed(&ix.k_norm)),
            k_norm_bias: p.constant(format!("indexer k_norm bias {i}"), Cow::Borrowed(&ix.k_norm_bias)),
            weights_proj: p.matrix(&ix.weights_proj),
            cache: p.buffer(format!("index key cache {i} ({})", cache.name()), cache.words(cache_rows * ix.wk.rows), BufferKind::Cache),
        }),
    };
    let ffn = match &layer.ffn {
        FeedForward::Dense(m) => FfnIds::Dense(p.mlp(m)),
        FeedForward::Moe(m) => {
            *moe += 1;
            FfnIds::Moe {
                moe: *moe - 1,
                weights: m,
                router: p.weight(vec![&m.router], true, false, false),
                bias: m.correction_bias.as_deref().map(|b| p.constant(format!("correction bias {i}"), Cow::Borrowed(b))),
                shared: m.shared.as_ref().map(|m| p.mlp(m)),
            }
        }
    };
    LayerIds {
        input_norm: p.constant(format!("input_layernorm {i}"), Cow::Borrowed(&layer.input_norm)),
        post_norm: p.constant(format!("post_attention_layernorm {i}"), Cow::Borrowed(&layer.post_attention_norm)),
        attention,
        ffn,
    }
}

/// The memory plan of what `p` declared so far (everything but the routed experts), and one
/// routed expert as a cache slot holds it in the device format.
fn memory_plan(p: &Declare, model: &Model, options: &GpuOptions, target: &Target) -> (MemoryPlan, Option<Mlp>) {
    let c = &model.config;
    let moe_layers = model.weights.routed_layers(options.mtp);
    // The next MoE layer's early router (prefetch) takes a hidden row, router logits and ids;
    // counted whether or not it runs, so the minimum budget does not depend on --prefetch.
    let guess_words = if moe_layers.len() >= 2 { c.hidden_size + c.n_routed_experts + 2 * c.num_experts_per_tok } else { 0 };
    let template = moe_layers.first().map(|moe| moe.experts[0].quantized(options.quant));
    let buffer_bytes: u64 = p.buffers.iter().map(|b| b.words as u64 * 4).sum();
    let weight_bytes: u64 = p.weights.iter().map(|w| w.device_bytes(options.quant)).sum();
    let memory = MemoryPlan {
        resident: weight_bytes + buffer_bytes + guess_words as u64 * 4 + target.private_bytes,
        expert_bytes: template.as_ref().map_or(0, |e| e.matrices().iter().map(|m| SlotLayout::new(m).slot_bytes()).sum()),
        experts: moe_layers.iter().map(|moe| moe.experts.len() as u64).sum(),
        top_k: c.num_experts_per_tok as u64,
    };
    (memory, template)
}

/// Expert streaming through `slots` cache slots shaped like `template`: pools that each fit
/// a binding, and the early router's buffers when prefetch is on.
#[allow(clippy::too_many_arguments)]
fn stream_plan(p: &mut Declare, model: &Model, options: &GpuOptions, target: &Target, slots: usize, template: Mlp, ids: BufferId, layers: Vec<usize>) -> Result<(StreamPlan, Option<Guess>)> {
    let c = &model.config;
    let pools = slot_pools(&template, slots, target)?;
    let prefetch = options.prefetch.enabled(target.software) && model.weights.moe_layers().len() >= 2;
    let guess = prefetch.then(|| Guess {
        xn: p.activation("guess xn", c.hidden_size),
        logits: p.activation("guess router logits", c.n_routed_experts),
        ids: p.activation("guessed expert ids", c.num_experts_per_tok),
        weights: p.activation("guessed expert weights", c.num_experts_per_tok),
    });
    let plan =
        StreamPlan { slots, pools, eviction: options.eviction, template, ids, guess_ids: guess.as_ref().map(|g| g.ids), max_pairs: target.max_chunk * c.num_experts_per_tok, mtp: options.mtp, layers };
    Ok((plan, guess))
}

/// `slots` expert slots shaped like `template` in pools that each fit one binding.
fn slot_pools(template: &Mlp, slots: usize, target: &Target) -> Result<Vec<PoolSpec>> {
    let largest = template.matrices().iter().map(|m| SlotLayout::new(m).data_stride).max().unwrap_or(1).max(1);
    let per_pool = (target.binding_limit / largest).min(slots as u64) as usize;
    if per_pool == 0 {
        return Err(Error::Invalid(format!(
            "one routed expert matrix takes {}, more than this device binds at once ({})",
            crate::util::human_bytes(largest),
            crate::util::human_bytes(target.binding_limit)
        )));
    }
    Ok((0..slots).step_by(per_pool).map(|first| PoolSpec { first, slots: per_pool.min(slots - first) }).collect())
}

/// Writes the step's ops, layer by layer.
struct Forward<'a, 'm> {
    model: &'m Model,
    a: &'a Activations,
    ids: &'a ModelIds<'m>,
    mla: MlaShape,
    router: RouterParams,
    /// Streaming experts (and its early router's buffers, if any).
    streaming: Option<Option<&'a Guess>>,
    /// Resident experts are grouped by expert (`Target::group_experts`).
    group_experts: bool,
    /// Where each MoE layer's routed experts are computed (all on the GPU where empty).
    placement: &'a [LayerPlacement],
    /// The GPU has staging slots for prompt chunks' uploads: every host layer lists slots.
    staging: bool,
    host: Option<HostBuffers>,
    shard: Option<&'a ShardBuffers>,
}

/// A rank's routed sum (all-reduced), the combine's weight for it, and the router's weights
/// of its own slots (the others' zeroed).
struct ShardBuffers {
    routed: BufferId,
    ones: BufferId,
    local_weights: BufferId,
    /// MoE layers some of whose experts this rank computes on its host's CPU.
    host_layers: Vec<bool>,
}

/// The routed sum the host sends back, and the combine's weight for it (ones: the host has
/// applied the router's weights).
struct HostBuffers {
    routed: BufferId,
    ones: BufferId,
    /// The router's weights of the GPU's slots only (the host's zeroed), for layers split
    /// between the devices.
    gpu_weights: Option<BufferId>,
}

impl<'m> Forward<'_, 'm> {
    fn norm(&self, weight: BufferId, out: BufferId, rows: Rows) -> Op {
        let c = &self.model.config;
        Op::RmsNorm { dim: c.hidden_size, eps: c.rms_norm_eps as f32, x: self.a.h, weight, out, rows }
    }

    fn route(&self, logits: BufferId, bias: Option<BufferId>, ids: BufferId, weights: BufferId, rows: Rows) -> Op {
        Op::Router { params: self.router.clone(), experts: self.model.config.n_routed_experts, logits, bias, ids, weights, rows }
    }

    fn body(&self, p: &mut Declare<'m>) -> Vec<Op> {
        let mut ops = vec![Op::Embed { table: self.ids.embed, tokens: self.a.tokens, out: self.a.h }];
        for l in &self.ids.layers {
            self.layer(p, &mut ops, l);
        }
        ops
    }

    /// One decoder layer on the residual stream `h`.
    fn layer(&self, p: &mut Declare<'m>, ops: &mut Vec<Op>, l: &LayerIds<'m>) {
        let (a, c) = (self.a, &self.model.config);
        ops.push(self.norm(l.input_norm, a.xn, Rows::All));
        ops.extend(attention(&self.mla, &l.attention, &a.attention));
        ops.push(self.norm(l.post_norm, a.xn, Rows::All));
        match l.ffn {
            FfnIds::Dense(m) => mlp(ops, m, c.intermediate_size, a.xn, a.ffn, a.h, true),
            FfnIds::Moe { moe, weights, router, bias, shared } => self.moe(p, ops, weights, moe, router, bias, shared),
        }
    }

    /// The MTP step (`weights::Mtp`): row i embeds `tokens[i]` (the token after its position)
    /// and reads `hidden[i]`; `eh_proj · concat(enorm(e), hnorm(h))` is two matmuls into `h`.
    fn mtp_body(&self, p: &mut Declare<'m>, m: &MtpIds<'m>, b: &MtpBuffers) -> Vec<Op> {
        let (a, c) = (self.a, &self.model.config);
        let norm = |x, weight, out| Op::RmsNorm { dim: c.hidden_size, eps: c.rms_norm_eps as f32, x, weight, out, rows: Rows::All };
        let mut ops = vec![
            Op::Embed { table: m.embed, tokens: a.tokens, out: a.h },
            norm(a.h, m.enorm, b.e_norm),
            norm(b.hidden, m.hnorm, b.h_norm),
            Op::Matmul { w: m.eh_embed, x: b.e_norm, y: a.h, rows: Rows::All, accumulate: false },
            Op::Matmul { w: m.eh_hidden, x: b.h_norm, y: a.h, rows: Rows::All, accumulate: true },
        ];
        self.layer(p, &mut ops, &m.layer);
        ops
    }

    /// A MoE block: router, routed experts (resident, or streamed with an early guess at the
    /// next MoE layer's experts), shared experts, combine.
    #[allow(clippy::too_many_arguments)]
    fn moe(&self, p: &mut Declare<'m>, ops: &mut Vec<Op>, weights: &'m Moe, moe: usize, router: WeightId, bias: Option<BufferId>, shared: Option<[WeightId; 3]>) {
        let (a, c) = (self.a, &self.model.config);
        let mb = a.moe.as_ref().expect("MoE buffers exist in a model with MoE layers");
        ops.push(Op::Matmul { w: router, x: a.xn, y: mb.logits, rows: Rows::All, accumulate: false });
        ops.push(self.route(mb.logits, bias, mb.ids, mb.weights, Rows::All));
        let [gate_out, up_out] = a.ffn;
        let k = c.num_experts_per_tok;
        // SwiGLU of the slots' experts: gate and up from the token's row, down from the slot's.
        let experts = |weights: [ExpertWeights; 3], grouped: bool| {
            let [gate, up, down] = weights;
            let matmul = |matrix, weights, x, y| Op::ExpertMatmul { matrix, weights, k, x, y, ids: mb.ids, grouped };
            vec![
                matmul(ExpertMatrix::Gate, gate, a.xn, gate_out),
                matmul(ExpertMatrix::Up, up, a.xn, up_out),
                Op::SiluMul { width: k * c.moe_intermediate_size, gate: gate_out, up: up_out },
                matmul(ExpertMatrix::Down, down, gate_out, mb.expert_out),
            ]
        };
        if let Some(sb) = self.shard {
            // This rank's slots over its pools, their weighted sum into the rank's routed sum;
            // the shared expert; then (after the all-reduce) the routed sum as one "expert" of
            // weight 1 with the shared expert into the residual.
            let mut listed = experts([ExpertWeights::Pools; 3], false);
            listed.push(Op::MoeCombine { dim: c.hidden_size, k, expert_out: mb.expert_out, weights: sb.local_weights, shared: None, h: sb.routed });
            let n_listed = listed.len();
            if let (Some(shared), Some(shared_out)) = (shared, mb.shared_out) {
                mlp(&mut listed, shared, c.n_shared_experts * c.moe_intermediate_size, a.xn, a.ffn, shared_out, false);
            }
            // The rank's experts its host computes: over the host's copies of the same buffers,
            // their weighted sum into the host's routed sum (added to the GPU's before the
            // all-reduce).
            let host_ops = match sb.host_layers.get(moe) {
                Some(true) => {
                    let mut stack = |f: fn(&'m Mlp) -> &'m Matrix| ExpertWeights::Stack(p.host_weight(weights.experts.iter().map(f).collect()));
                    let stacks = [stack(|m| &m.gate), stack(|m| &m.up), stack(|m| &m.down)];
                    let mut host_ops = experts(stacks, false);
                    host_ops.push(Op::MoeCombine { dim: c.hidden_size, k, expert_out: mb.expert_out, weights: mb.weights, shared: None, h: sb.routed });
                    host_ops
                }
                _ => Vec::new(),
            };
            ops.push(Op::ShardExperts { layer: moe, x: a.xn, ids: mb.ids, weights: mb.weights, local_weights: sb.local_weights, routed: sb.routed, listed: n_listed, overlap: listed.len(), host_ops });
            ops.extend(listed);
            ops.push(Op::MoeCombine { dim: c.hidden_size, k: 1, expert_out: sb.routed, weights: sb.ones, shared: shared.and(mb.shared_out), h: a.h });
            return;
        }
        let split = match self.placement.get(moe) {
            Some(LayerPlacement::Host) => Some(false),
            Some(LayerPlacement::Split(_)) => Some(true),
            _ => None,
        };
        if let Some(split) = split {
            let hb = self.host.as_ref().expect("host buffers exist where layers run on the host");
            let mut stack = |f: fn(&'m Mlp) -> &'m Matrix| ExpertWeights::Stack(p.host_weight(weights.experts.iter().map(f).collect()));
            let stacks = [stack(|m| &m.gate), stack(|m| &m.up), stack(|m| &m.down)];
            let mut host_ops = experts(stacks, false);
            host_ops.push(Op::MoeCombine { dim: c.hidden_size, k, expert_out: mb.expert_out, weights: mb.weights, shared: None, h: hb.routed });
            // The GPU's part while the host computes: the slots the host lists for it (a split
            // layer's GPU experts, a prompt chunk's uploads) over slot pools, then the shared
            // expert.
            let gpu_weights = hb.gpu_weights.filter(|_| split || self.staging);
            let mut gpu_ops = if gpu_weights.is_some() { experts([ExpertWeights::Pools; 3], false) } else { Vec::new() };
            let listed = gpu_ops.len();
            if let (Some(shared), Some(shared_out)) = (shared, mb.shared_out) {
                mlp(&mut gpu_ops, shared, c.n_shared_experts * c.moe_intermediate_size, a.xn, a.ffn, shared_out, false);
            }
            ops.push(Op::HostExperts { layer: moe, x: a.xn, ids: mb.ids, weights: mb.weights, routed: hb.routed, gpu_weights, gpu_ops: listed, overlap: gpu_ops.len(), ops: host_ops });
            ops.extend(gpu_ops);
            if let Some(w) = gpu_weights {
                ops.push(Op::MoeCombine { dim: c.hidden_size, k, expert_out: mb.expert_out, weights: w, shared: None, h: a.h });
            }
            // The routed sum as one "expert" of weight 1: the same combine kernel on every backend.
            ops.push(Op::MoeCombine { dim: c.hidden_size, k: 1, expert_out: hb.routed, weights: hb.ones, shared: shared.and(mb.shared_out), h: a.h });
            return;
        }
        match self.streaming {
            None => {
                let mut stack = |f: fn(&'m Mlp) -> &'m Matrix| ExpertWeights::Stack(p.weight(weights.experts.iter().map(f).collect(), false, true, true));
                let stacks = [stack(|m| &m.gate), stack(|m| &m.up), stack(|m| &m.down)];
                if self.group_experts {
                    ops.push(Op::GroupExperts { k, experts: c.n_routed_experts, rows: [c.moe_intermediate_size, c.hidden_size], ids: mb.ids });
                }
                ops.extend(experts(stacks, self.group_experts));
            }
            Some(guess) => {
                // The next MoE layer's router on this layer's hidden state (its last token): a
                // guess at the experts it will want, uploaded early.
                // Only where the next MoE layer streams too (not the host's).
                let next_streams = self.placement.get(moe + 1).is_none_or(|p| *p == LayerPlacement::Gpu);
                let predicts_next = match (guess, self.ids.next_moe(moe).filter(|_| next_streams)) {
                    (Some(g), Some((norm, router, bias))) => {
                        ops.push(self.norm(norm, g.xn, Rows::Last));
                        ops.push(Op::Matmul { w: router, x: g.xn, y: g.logits, rows: Rows::Last, accumulate: false });
                        ops.push(self.route(g.logits, bias, g.ids, g.weights, Rows::Last));
                        true
                    }
                    _ => false,
                };
                ops.push(Op::Streamed { layer: moe, predicts_next, ops: experts([ExpertWeights::Pools; 3], false) });
            }
        }
        if let (Some(shared), Some(shared_out)) = (shared, mb.shared_out) {
            mlp(ops, shared, c.n_shared_experts * c.moe_intermediate_size, a.xn, a.ffn, shared_out, false);
        }
        ops.push(Op::MoeCombine { dim: c.hidden_size, k, expert_out: mb.expert_out, weights: mb.weights, shared: shared.and(mb.shared_out), h: a.h });
    }

    /// The final norm and lm_head for `rows`.
    fn head(&self, rows: Rows) -> Vec<Op> {
        vec![self.norm(self.ids.final_norm, self.a.xn, rows), Op::Matmul { w: self.ids.lm_head, x: self.a.xn, y: self.a.logits, rows, accumulate: false }]
    }

    /// The MTP step's head for its last row (`shared_head.norm` into `hidden` row 0, a chained
    /// draft's input, then `shared_head.head`), or for every row.
    fn mtp_head(&self, m: &MtpIds, b: &MtpBuffers, rows: Rows) -> Vec<Op> {
        vec![self.norm(m.head_norm, b.hidden, rows), Op::Matmul { w: m.head, x: b.hidden, y: self.a.logits, rows, accumulate: false }]
    }
}

/// The plan for `model` with room for `capacity` tokens of context in each of
/// `options.sequences` sequences, on a backend with `target`'s limits, under `options`' weight
/// format and memory budget.
pub fn build<'m>(model: &'m Model, capacity: usize, options: &GpuOptions, target: &Target) -> Result<Plan<'m>> {
    let c = &model.config;
    check_kernel_limits(c, &target.kernels)?;
    let sequences = options.sequences;
    if sequences == 0 || sequences > target.max_chunk {
        return Err(Error::Invalid(format!("{sequences} parallel sequences: this backend decodes 1 to {} sequences together", target.max_chunk)));
    }
    let rope = Rope::new(c);
    let mut p = Declare { buffers: Vec::new(), weights: Vec::new(), host_weights: Vec::new() };
    if options.mtp && model.weights.mtp.is_none() {
        return Err(Error::Invalid("--speculative mtp: this checkpoint has no MTP layer (`dsrun inspect` shows; use --speculative off)".into()));
    }
    let a = Activations::declare(&mut p, model, target, &rope, capacity, options.kv_cache, options.mtp);
    if options.kv_cache != CacheFormat::F32 && !c.latent_dim().is_multiple_of(2) {
        return Err(Error::Invalid(format!("--kv-cache {}: packs pairs of values, and this model's latent width {} is odd (use --kv-cache f32)", options.kv_cache.name(), c.latent_dim())));
    }
    let ids = ModelIds::declare(&mut p, model, capacity * sequences, options.kv_cache, options.mtp);

    // What stays resident whatever the budget; then which MoE layers' experts the host
    // computes, and whether the GPU's all fit.
    let (mut memory, template) = memory_plan(&p, model, options, target);
    let mut shard = match &options.shard {
        Some(shard) => Some(shard_buffers(&mut p, model, options, target, shard, &mut memory)?),
        None => None,
    };
    let budget = memory.budget(options.gpu_mem, target.memory);
    let per_layer: Vec<u64> = model.weights.routed_layers(options.mtp).iter().map(|m| m.experts.len() as u64).collect();
    let host_bytes = (target.max_chunk * (c.hidden_size + 1) * 4) as u64;
    // `N%` keeps everything but the routed experts, the host's routed sums among it.
    let budget = match options.gpu_mem {
        GpuMem::ExpertShare(_) if target.hybrid && options.placement != ExpertPlacement::Stream => budget + host_bytes,
        _ => budget,
    };
    let placement = match &mut shard {
        None => place_experts(memory, budget, &per_layer, host_bytes, options, target, c.num_experts_per_tok)?,
        Some((buffers, plan)) => {
            let memory = divide_shard(buffers, plan, memory, budget, options, target)?;
            Placement { layers: vec![LayerPlacement::Gpu; per_layer.len()], memory }
        }
    };
    let mut memory = placement.memory;
    let host_layers = placement.layers.iter().filter(|l| **l != LayerPlacement::Gpu).count();
    let split: Vec<(usize, u32)> = placement.layers.iter().enumerate().flat_map(|(l, p)| if let LayerPlacement::Split(gpu) = p { gpu.iter().map(|&e| (l, e)).collect() } else { Vec::new() }).collect();
    // Staging slots for a prompt chunk's most used host experts (top-k of them), where
    // uploads are on and the budget has room beside the rest.
    let uploads = options.prompt_uploads.enabled(target.software) && host_layers > 0;
    let staging_bytes = (c.num_experts_per_tok as u64) * memory.expert_bytes;
    let staging = if uploads && memory.all_resident() + staging_bytes <= budget { c.num_experts_per_tok } else { 0 };
    memory.resident += staging as u64 * memory.expert_bytes;
    let host = (host_layers > 0).then(|| HostBuffers {
        routed: p.activation("host routed sum", target.max_chunk * c.hidden_size),
        ones: p.constant("ones", Cow::Owned(vec![1.0; target.max_chunk])),
        gpu_weights: (!split.is_empty() || staging > 0).then(|| p.activation("gpu expert weights", target.max_chunk * c.num_experts_per_tok)),
    });
    // Every expert fits the budget, but a layer's stack of them may not fit one binding: then
    // they go through the slot cache, one slot per expert (pools split at the binding limit).
    let stacked = template.as_ref().map_or(0, |t| t.matrices().iter().map(|m| m.data.as_slice().len() as u64).max().unwrap_or(0) * c.n_routed_experts as u64);
    let slots = match memory.slots(budget)? {
        None if stacked > target.stack_limit => Some(memory.experts as usize),
        slots => slots,
    };
    let streaming = match (slots, &template, &a.moe) {
        (Some(slots), Some(template), Some(mb)) if host_layers < per_layer.len() && split.is_empty() && shard.is_none() => {
            let streamed = placement.layers.iter().enumerate().filter(|(_, p)| **p == LayerPlacement::Gpu).map(|(l, _)| l).collect();
            Some(stream_plan(&mut p, model, options, target, slots, template.clone(), mb.ids, streamed)?)
        }
        _ => None,
    };

    let forward = Forward {
        model,
        a: &a,
        ids: &ids,
        mla: MlaShape { cache: options.kv_cache, ..MlaShape::new(c, capacity, &rope) },
        router: RouterParams::from_config(c),
        streaming: streaming.as_ref().map(|(_, guess)| guess.as_ref()),
        group_experts: target.group_experts,
        placement: &placement.layers,
        staging: staging > 0,
        host,
        shard: shard.as_ref().map(|(b, _)| b),
    };
    let body = forward.body(&mut p);
    let (head_last, head_all) = (forward.head(Rows::Last), forward.head(Rows::All));
    let mtp = match (&ids.mtp, &a.mtp) {
        (Some(m), Some(b)) => Some(MtpPlan {
            body: forward.mtp_body(&mut p, m, b),
            head_last: forward.mtp_head(m, b, Rows::Last),
            head_all: forward.mtp_head(m, b, Rows::All),
            keep_hidden: vec![forward.norm(ids.final_norm, b.hidden, Rows::All)],
            hidden: b.hidden,
        }),
        _ => None,
    };
    let host = (host_layers > 0).then(|| {
        let a = &forward.a;
        let mb = a.moe.as_ref().expect("MoE buffers exist where layers run on the host");
        let hb = forward.host.as_ref().expect("declared with the host layers");
        let pools = match (&template, split.len() + staging) {
            (Some(t), slots) if slots > 0 => Some((slot_pools(t, slots, target)?, t.clone())),
            _ => None,
        };
        Ok::<_, Error>(HostPlan {
            layers: host_layers,
            weights: std::mem::take(&mut p.host_weights),
            buffers: vec![a.xn, mb.ids, mb.weights, a.ffn[0], a.ffn[1], mb.expert_out, hb.routed],
            math: options.math,
            split: pools.map(|(pools, template)| SplitPlan { pools, template, slots: split.clone(), staging, max_pairs: target.max_chunk * c.num_experts_per_tok }),
            uploads: (staging > 0).then_some(options.prompt_uploads == PromptUploads::On),
            counts: options.expert_counts.clone(),
        })
    });
    let host = host.transpose()?;
    Ok(Plan {
        capacity,
        sequences,
        max_chunk: target.max_chunk,
        quant: options.quant,
        buffers: p.buffers,
        weights: p.weights,
        body,
        head_last,
        head_all,
        argmax: Op::Argmax { vocab: c.vocab_size, logits: a.logits, ids: a.argmax_ids },
        tokens: a.tokens,
        positions: a.attention.positions,
        logits: a.logits,
        argmax_ids: a.argmax_ids,
        memory,
        budget,
        streaming: streaming.map(|(s, _)| s),
        host,
        mtp,
        shard: shard.map(|(buffers, mut plan)| {
            if !plan.host_slots.is_empty() {
                let mb = a.moe.as_ref().expect("MoE buffers exist in a divided model");
                plan.host =
                    Some(ShardHost { weights: std::mem::take(&mut p.host_weights), buffers: vec![a.xn, mb.ids, mb.weights, a.ffn[0], a.ffn[1], mb.expert_out, buffers.routed], math: options.math });
            }
            plan
        }),
    })
}

/// Expert parallelism: this device's routed experts (`shard`), and the buffers its stops use;
/// `memory` then counts only those experts ([`divide_shard`] then places them).
fn shard_buffers<'m>(p: &mut Declare, model: &'m Model, options: &GpuOptions, target: &Target, shard: &Arc<ExpertShard>, memory: &mut MemoryPlan) -> Result<(ShardBuffers, ShardPlan<'m>)> {
    let c = &model.config;
    let routed = model.weights.routed_layers(options.mtp);
    if shard.owned.len() != routed.len() {
        return Err(Error::Invalid(format!("an expert shard for {} MoE layers, the model has {}", shard.owned.len(), routed.len())));
    }
    let slots: Vec<(usize, u32)> = shard.owned.iter().enumerate().flat_map(|(l, experts)| experts.iter().map(move |&e| (l, e))).collect();
    if let Some(&(l, e)) = slots.iter().find(|(l, e)| *e as usize >= routed[*l].experts.len()) {
        return Err(Error::Invalid(format!("an expert shard holds expert {e} of MoE layer {l}, which has {}", routed[l].experts.len())));
    }
    let template = routed.first().map(|moe| moe.experts[0].quantized(options.quant)).ok_or_else(|| Error::Invalid("--devices divides routed experts; this model has none".into()))?;
    let k = c.num_experts_per_tok;
    let buffers = ShardBuffers {
        routed: p.activation("rank routed sum", target.max_chunk * c.hidden_size),
        ones: p.constant("ones", Cow::Owned(vec![1.0; target.max_chunk])),
        local_weights: p.activation("rank expert weights", target.max_chunk * k),
        host_layers: Vec::new(),
    };
    memory.experts = slots.len() as u64;
    memory.resident += (target.max_chunk * (c.hidden_size + 1 + k) * 4) as u64;
    let total_experts = routed.iter().map(|m| m.experts.len() as u64).sum();
    let plan = ShardPlan {
        shard: shard.clone(),
        pools: Vec::new(),
        template,
        slots,
        cache: None,
        host_slots: Vec::new(),
        host: None,
        max_pairs: target.max_chunk * k,
        total_experts,
        top_k: k,
        hidden: c.hidden_size,
    };
    Ok((buffers, plan))
}

/// Divides a rank's experts between its GPU (slot pools, within `budget`) and its host's CPU
/// (hybrid placement, where the target is a GPU beside a host): the MoE layers `--cpu-moe` /
/// `--n-cpu-moe` name on the host; of the rest, under `ExpertPlacement::Auto`, the most picked
/// (by the router's counts; without counts the last layers') that fit on the GPU; under
/// `ExpertPlacement::Stream` all of them stream through the slots that fit. Returns the GPU's
/// memory plan.
fn divide_shard(buffers: &mut ShardBuffers, plan: &mut ShardPlan, memory: MemoryPlan, budget: u64, options: &GpuOptions, target: &Target) -> Result<MemoryPlan> {
    let layers = plan.shard.owned.len();
    let forced = if target.hybrid { options.forced_cpu_layers(layers) } else { 0 };
    let (mut gpu, mut host): (Vec<(usize, u32)>, Vec<(usize, u32)>) = plan.slots.iter().partition(|(l, _)| *l >= forced);
    let room = budget.saturating_sub(memory.resident) / memory.expert_bytes.max(1);
    if gpu.len() as u64 > room && options.placement == ExpertPlacement::Stream && room > 0 {
        // The rank's experts stream through the slots that fit (rounds where a step wants more).
        buffers.host_layers = (0..layers).map(|l| host.iter().any(|s| s.0 == l)).collect();
        plan.pools = slot_pools(&plan.template, room as usize, target)?;
        plan.cache = Some((room as usize, options.eviction));
        plan.slots = gpu;
        plan.host_slots = host;
        return Ok(MemoryPlan { experts: room, ..memory });
    }
    if gpu.len() as u64 > room {
        if !target.hybrid || options.placement == ExpertPlacement::Stream || budget < memory.resident {
            return Err(Error::Invalid(format!(
                "this device's share of the model needs {} ({} routed experts of {} plus {} resident), more than its --gpu-mem budget of {}: \
                 divide it among more devices, give this one a smaller --tensor-split weight, or use a smaller --quant",
                crate::util::human_bytes(memory.all_resident()),
                memory.experts,
                crate::util::human_bytes(memory.expert_bytes),
                crate::util::human_bytes(memory.resident),
                crate::util::human_bytes(budget)
            )));
        }
        // The GPU keeps the most picked (earlier runs' counts), else the last layers'.
        let picks = |&(l, e): &(usize, u32)| options.expert_counts.as_ref().and_then(|c| c.layers.get(l)).and_then(|c| c.counts.get(e as usize)).copied().unwrap_or(0);
        gpu.sort_by(|a, b| picks(b).cmp(&picks(a)).then(b.0.cmp(&a.0)).then(a.1.cmp(&b.1)));
        host.extend(gpu.drain(room as usize..));
        gpu.sort_unstable();
        host.sort_unstable();
    }
    buffers.host_layers = (0..layers).map(|l| host.iter().any(|s| s.0 == l)).collect();
    plan.pools = if gpu.is_empty() { Vec::new() } else { slot_pools(&plan.template, gpu.len(), target)? };
    plan.slots = gpu;
    plan.host_slots = host;
    Ok(MemoryPlan { experts: plan.slots.len() as u64, ..memory })
}

/// Where each MoE layer's routed experts are computed, and the memory plan of what the GPU
/// then holds.
struct Placement {
    layers: Vec<LayerPlacement>,
    memory: MemoryPlan,
}

/// Places each MoE layer's routed experts: the layers `--cpu-moe` / `--n-cpu-moe` force onto the
/// host there; under `ExpertPlacement::Auto`, when the rest do not fit `budget`, the GPU keeps
/// as many experts as fit, the most often picked (`options.expert_counts`; without counts whole
/// layers from the last, one layer split), and the host computes the others (`host_bytes`: the
/// GPU's buffers for the host's routed sums, once any layer runs there). Only where the target
/// is a GPU beside the host.
#[allow(clippy::too_many_arguments)]
fn place_experts(memory: MemoryPlan, budget: u64, per_layer: &[u64], host_bytes: u64, options: &GpuOptions, target: &Target, k: usize) -> Result<Placement> {
    let n = per_layer.len();
    if !target.hybrid || n == 0 {
        return Ok(Placement { layers: vec![LayerPlacement::Gpu; n], memory });
    }
    let forced = options.forced_cpu_layers(n);
    let mut layers: Vec<LayerPlacement> = (0..n).map(|l| if l < forced { LayerPlacement::Host } else { LayerPlacement::Gpu }).collect();
    let on_gpu = |layers: &[LayerPlacement]| {
        let experts = layers.iter().zip(per_layer).map(|(p, &e)| match p {
            LayerPlacement::Gpu => e,
            LayerPlacement::Host => 0,
            LayerPlacement::Split(gpu) => gpu.len() as u64,
        });
        let host = layers.iter().any(|p| *p != LayerPlacement::Gpu);
        MemoryPlan { experts: experts.sum(), resident: memory.resident + if host { host_bytes } else { 0 }, ..memory }
    };
    if options.placement == ExpertPlacement::Auto && on_gpu(&layers).all_resident() > budget {
        let resident = memory.resident + host_bytes;
        if budget < resident {
            return Err(Error::Invalid(format!(
                "--gpu-mem {} ({budget} bytes) is below what stays on the GPU with every routed expert on the CPU: {} ({resident} bytes: \
                 weights other than routed experts, latent KV cache, activations); raise --gpu-mem, lower --ctx, or use a smaller --quant",
                crate::util::human_bytes(budget),
                crate::util::human_bytes(resident),
            )));
        }
        let slots = ((budget - resident) / memory.expert_bytes.max(1)) as usize;
        let experts: Vec<usize> = per_layer.iter().map(|&e| e as usize).collect();
        let uniform;
        let counts = match &options.expert_counts {
            Some(c) => &**c,
            None => {
                uniform = ExpertCounts::new(&experts, None);
                &uniform
            }
        };
        layers = counts.place(&experts, k, forced, slots);
    }
    let memory = on_gpu(&layers);
    Ok(Placement { layers, memory })
}
