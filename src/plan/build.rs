//! The DeepSeek forward pass written once as plan ops (SPEC.md): embedding; per layer RMSNorm,
//! MLA in its absorbed form, RMSNorm, a dense MLP or a MoE block (router, routed experts,
//! shared experts, combine); the final norm and lm_head; the greedy argmax.

use super::*;
use crate::backend::layout::{SlotLayout, LATENT_NORM_EPS};
use crate::budget::GpuOptions;
use crate::error::{Error, Result};
use crate::model::rope::Rope;
use crate::model::router::RouterParams;
use crate::model::weights::{FeedForward, QueryProjection};
use crate::model::Model;

/// The routing shapes the GPU router kernels hold in registers and workgroup memory.
const MAX_EXPERTS: usize = 1024;
const MAX_GROUPS: usize = 64;
const MAX_TOP_K: usize = 16;

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
}

/// Multi-head latent attention for a step's tokens, the absorbed form SPEC.md gives: query
/// projections, `kv_a`, the latent store (norm + RoPE into the cache), query RoPE,
/// `q_lat = W_UK^T q_nope`, causal attention over the cache, `W_UV`, and `o_proj` added to the
/// residual stream.
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
    ops.push(Op::LatentStore { kv: b.kv, norm: w.kv_norm, inv_freq: b.inv_freq, cache: w.cache, mla: *mla });
    ops.push(Op::RopeQ { q: b.q, inv_freq: b.inv_freq, mla: *mla });
    ops.push(Op::QAbsorb { kv_b: w.kv_b, q: b.q, q_lat: b.q_lat, mla: *mla });
    ops.push(Op::Attention { q: b.q, q_lat: b.q_lat, cache: w.cache, scratch: b.scratch, o_lat: b.o_lat, mla: *mla });
    ops.push(Op::VUp { kv_b: w.kv_b, o_lat: b.o_lat, o: b.o, mla: *mla });
    ops.push(matmul(w.o, b.o, b.out, true));
    ops
}

/// Ids handed out while the plan is declared.
struct Declare<'m> {
    buffers: Vec<BufferSpec<'m>>,
    weights: Vec<WeightSpec<'m>>,
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

    /// A matrix only matmul (or the embedding gather) reads: row chunks allowed.
    fn matrix(&mut self, m: &'m Matrix) -> WeightId {
        self.weight(vec![m], true, true, false)
    }

    fn mlp(&mut self, m: &'m Mlp) -> [WeightId; 3] {
        [self.matrix(&m.gate), self.matrix(&m.up), self.matrix(&m.down)]
    }
}

enum FfnIds {
    Dense([WeightId; 3]),
    Moe { moe: usize, router: WeightId, bias: Option<BufferId>, shared: Option<[WeightId; 3]> },
}

struct LayerIds {
    input_norm: BufferId,
    post_norm: BufferId,
    attention: AttentionWeights,
    ffn: FfnIds,
}

/// `out = down · (silu(gate · x) ⊙ (up · x))`, through `a` and `b` of `width` per token.
fn mlp(ops: &mut Vec<Op>, [gate, up, down]: [WeightId; 3], width: usize, x: BufferId, [a, b]: [BufferId; 2], out: BufferId, accumulate: bool) {
    ops.push(Op::Matmul { w: gate, x, y: a, rows: Rows::All, accumulate: false });
    ops.push(Op::Matmul { w: up, x, y: b, rows: Rows::All, accumulate: false });
    ops.push(Op::SiluMul { width, gate: a, up: b });
    ops.push(Op::Matmul { w: down, x: a, y: out, rows: Rows::All, accumulate });
}

/// Rejects routing shapes the GPU router kernels cannot hold.
fn check_router(c: &crate::config::ModelConfig) -> Result<()> {
    if c.n_routed_experts > MAX_EXPERTS || c.n_group > MAX_GROUPS || c.num_experts_per_tok > MAX_TOP_K {
        return Err(Error::Invalid(format!(
            "the GPU router handles at most {MAX_EXPERTS} experts in {MAX_GROUPS} groups and {MAX_TOP_K} per token; \
             this model has {} experts in {} groups, {} per token (use --gpu cpu)",
            c.n_routed_experts, c.n_group, c.num_experts_per_tok
        )));
    }
    Ok(())
}

/// The plan for `model` with room for `capacity` tokens of context, on a backend with `target`'s
/// limits, under `options`' weight format and memory budget.
pub fn build<'m>(model: &'m Model, capacity: usize, options: &GpuOptions, target: &Target) -> Result<Plan<'m>> {
    let c = &model.config;
    let w = &model.weights;
    check_router(c)?;
    let (n, d, k, heads) = (target.max_chunk, c.hidden_size, c.num_experts_per_tok, c.num_attention_heads);
    let rope = Rope::new(c);
    let mla = MlaShape::new(c, capacity, &rope);
    let moe_layers = w.moe_layers();
    let mut p = Declare { buffers: Vec::new(), weights: Vec::new() };

    // Activations, sized for a step of `n` tokens.
    let tokens = p.activation("tokens", n);
    let h = p.activation("h", n * d);
    let xn = p.activation("xn", n * d);
    let q_lora = c.q_lora_rank.map(|r| (p.activation("qa", n * r), p.activation("qa_norm", n * r)));
    let attention_buffers = AttentionBuffers {
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
    };
    let dense = w.layers.iter().any(|l| matches!(l.ffn, FeedForward::Dense(_)));
    let shared_width = c.n_shared_experts * c.moe_intermediate_size;
    let has_shared = moe_layers.iter().any(|(_, m)| m.shared.is_some());
    let ffn_width = [
        if dense { c.intermediate_size } else { 0 },
        if moe_layers.is_empty() { 0 } else { k * c.moe_intermediate_size },
        if has_shared { shared_width } else { 0 },
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    let ffn = [p.activation("ffn gate", n * ffn_width), p.activation("ffn up", n * ffn_width)];
    let moe_buffers = (!moe_layers.is_empty()).then(|| MoeBuffers {
        logits: p.activation("router logits", n * c.n_routed_experts),
        ids: p.activation("expert ids", n * k),
        weights: p.activation("expert weights", n * k),
        expert_out: p.activation("expert out", n * k * d),
        shared_out: has_shared.then(|| p.activation("shared expert out", n * d)),
    });
    let logits = p.activation("logits", n * c.vocab_size);
    let argmax_ids = p.activation("argmax ids", n);

    // Weights and constants, layer by layer.
    let embed = p.matrix(&w.embed);
    let mut layers = Vec::new();
    for (i, layer) in w.layers.iter().enumerate() {
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
            cache: p.buffer(format!("latent cache {i}"), capacity * c.latent_dim(), BufferKind::Cache),
        };
        let ffn = match &layer.ffn {
            FeedForward::Dense(m) => FfnIds::Dense(p.mlp(m)),
            FeedForward::Moe(moe) => FfnIds::Moe {
                moe: layers.iter().filter(|l: &&LayerIds| matches!(l.ffn, FfnIds::Moe { .. })).count(),
                router: p.weight(vec![&moe.router], true, false, false),
                bias: moe.correction_bias.as_deref().map(|b| p.constant(format!("correction bias {i}"), Cow::Borrowed(b))),
                shared: moe.shared.as_ref().map(|m| p.mlp(m)),
            },
        };
        layers.push(LayerIds {
            input_norm: p.constant(format!("input_layernorm {i}"), Cow::Borrowed(&layer.input_norm)),
            post_norm: p.constant(format!("post_attention_layernorm {i}"), Cow::Borrowed(&layer.post_attention_norm)),
            attention,
            ffn,
        });
    }
    let final_norm = p.constant("final norm", Cow::Borrowed(&w.final_norm));
    // Tied embeddings project with the embedding's own upload.
    let tied = std::ptr::eq(w.lm_head.data.as_slice().as_ptr(), w.embed.data.as_slice().as_ptr());
    let lm_head = if tied { embed } else { p.matrix(&w.lm_head) };

    // The memory plan: what stays resident whatever the budget, and what one routed expert
    // takes in a cache slot; then whether the experts all fit.
    let quant = options.quant;
    let prefetch = options.prefetch.enabled(target.software);
    // The next MoE layer's early router (prefetch) takes a hidden row, router logits and ids;
    // counted whether or not it runs, so the minimum budget does not depend on --prefetch.
    let guess_words = if moe_layers.len() >= 2 { d + c.n_routed_experts + 2 * k } else { 0 };
    let template = moe_layers.first().map(|(_, moe)| moe.experts[0].quantized(quant));
    let buffer_bytes: u64 = p.buffers.iter().map(|b| b.words as u64 * 4).sum();
    let resident_weights: u64 = p.weights.iter().map(|w| w.device_bytes(quant)).sum();
    let memory = MemoryPlan {
        resident: resident_weights + buffer_bytes + guess_words as u64 * 4 + target.private_bytes,
        expert_bytes: template.as_ref().map_or(0, |e| e.matrices().iter().map(|m| SlotLayout::new(m).slot_bytes()).sum()),
        experts: moe_layers.iter().map(|(_, moe)| moe.experts.len() as u64).sum(),
        top_k: k as u64,
    };
    let budget = memory.budget(options.gpu_mem, target.memory);
    let slots = memory.slots(budget)?;
    let streaming = match (slots, &template, &moe_buffers) {
        (Some(slots), Some(template), Some(mb)) => {
            let largest = template.matrices().iter().map(|m| SlotLayout::new(m).data_stride).max().unwrap_or(1).max(1);
            let per_pool = (target.binding_limit / largest).min(slots as u64) as usize;
            if per_pool == 0 {
                return Err(Error::Invalid(format!(
                    "one routed expert matrix takes {}, more than this device binds at once ({})",
                    crate::inspect::human_bytes(largest),
                    crate::inspect::human_bytes(target.binding_limit)
                )));
            }
            let pools = (0..slots).step_by(per_pool).map(|first| PoolSpec { first, slots: per_pool.min(slots - first) }).collect();
            let guess = (prefetch && moe_layers.len() >= 2).then(|| Guess {
                xn: p.activation("guess xn", d),
                logits: p.activation("guess router logits", c.n_routed_experts),
                ids: p.activation("guessed expert ids", k),
                weights: p.activation("guessed expert weights", k),
            });
            let plan = StreamPlan {
                slots,
                pools,
                eviction: options.eviction,
                prefetch: guess.is_some(),
                template: template.clone(),
                ids: mb.ids,
                guess_ids: guess.as_ref().map(|g| g.ids),
                max_pairs: n * k,
            };
            Some((plan, guess))
        }
        _ => None,
    };

    // The step's ops.
    let router = RouterParams::from_config(c);
    let eps = c.rms_norm_eps as f32;
    let norm = |weight, out, rows| Op::RmsNorm { dim: d, eps, x: h, weight, out, rows };
    let mut body = vec![Op::Embed { table: embed, tokens, out: h }];
    for (i, l) in layers.iter().enumerate() {
        body.push(norm(l.input_norm, xn, Rows::All));
        body.extend(attention(&mla, &l.attention, &attention_buffers));
        body.push(norm(l.post_norm, xn, Rows::All));
        match l.ffn {
            FfnIds::Dense(m) => mlp(&mut body, m, c.intermediate_size, xn, ffn, h, true),
            FfnIds::Moe { moe, router: router_w, bias, shared } => {
                let mb = moe_buffers.as_ref().expect("MoE buffers exist in a model with MoE layers");
                body.push(Op::Matmul { w: router_w, x: xn, y: mb.logits, rows: Rows::All, accumulate: false });
                let route = |logits, bias, ids, weights, rows| Op::Router { params: router.clone(), experts: c.n_routed_experts, logits, bias, ids, weights, rows };
                body.push(route(mb.logits, bias, mb.ids, mb.weights, Rows::All));
                let experts = match &streaming {
                    None => {
                        let FeedForward::Moe(weights) = &w.layers[i].ffn else { unreachable!("a MoE layer's ids") };
                        let mut stack = |f: fn(&'m Mlp) -> &'m Matrix| p.weight(weights.experts.iter().map(f).collect(), false, true, true);
                        Experts::Resident { gate: stack(|m| &m.gate), up: stack(|m| &m.up), down: stack(|m| &m.down) }
                    }
                    Some((_, guess)) => {
                        // The next MoE layer's router on this layer's hidden state (its last
                        // token): a guess at the experts it will want, uploaded early.
                        let next = layers.iter().find_map(|l| match l.ffn {
                            FfnIds::Moe { moe: m, router, bias, .. } if m == moe + 1 => Some((l.post_norm, router, bias)),
                            _ => None,
                        });
                        let predicts_next = match (guess, next) {
                            (Some(g), Some((next_norm, next_router, next_bias))) => {
                                body.push(norm(next_norm, g.xn, Rows::Last));
                                body.push(Op::Matmul { w: next_router, x: g.xn, y: g.logits, rows: Rows::Last, accumulate: false });
                                body.push(route(g.logits, next_bias, g.ids, g.weights, Rows::Last));
                                true
                            }
                            _ => false,
                        };
                        Experts::Streamed { layer: moe, predicts_next }
                    }
                };
                let [gate_out, up_out] = ffn;
                body.push(Op::RoutedExperts { experts, k, width: c.moe_intermediate_size, x: xn, ids: mb.ids, gate_out, up_out, out: mb.expert_out });
                if let (Some(shared), Some(shared_out)) = (shared, mb.shared_out) {
                    mlp(&mut body, shared, shared_width, xn, ffn, shared_out, false);
                }
                body.push(Op::MoeCombine { dim: d, k, expert_out: mb.expert_out, weights: mb.weights, shared: shared.and(mb.shared_out), h });
            }
        }
    }
    let head = |rows| vec![norm(final_norm, xn, rows), Op::Matmul { w: lm_head, x: xn, y: logits, rows, accumulate: false }];
    Ok(Plan {
        capacity,
        max_chunk: n,
        quant,
        buffers: p.buffers,
        weights: p.weights,
        body,
        head_last: head(Rows::Last),
        head_all: head(Rows::All),
        argmax: Op::Argmax { vocab: c.vocab_size, logits, ids: argmax_ids },
        tokens,
        logits,
        argmax_ids,
        memory,
        budget,
        streaming: streaming.map(|(s, _)| s),
    })
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
