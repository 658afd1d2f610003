//! The forward pass on CUDA: weights uploaded in their checkpoint formats (or `--quant`'s),
//! every op made once at load (ops.rs), a step = write the step values and tokens, launch the
//! ops, read back the logits or the greedy id. Single-token steps are captured as CUDA graphs on
//! first use and replayed after, whatever the position (positions live in device memory).

use super::ops::{AttentionBuffers, AttentionSplit, CudaAttention, CudaMatrix, CudaQuery, ExpertGroups, Op, Ops};
use super::runtime::{Buffer, Graph, Runtime};
use super::streaming::{CudaStreaming, StreamBuffers};
use crate::budget::{GpuOptions, MemoryPlan};
use crate::backend::layout::{MatmulShape, MlaShape};
use crate::config::ModelConfig;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::rope::Rope;
use crate::model::router::RouterParams;
use crate::model::weights::{FeedForward, Matrix, Mlp, QueryProjection};
use crate::model::{check_request, Logits, Model};
use crate::quant::QuantTarget;
use std::collections::HashMap;

/// Most tokens one step processes; longer prompts run in chunks.
const MAX_CHUNK: usize = 64;
/// Device memory for the attention's per-split partial results.
const PARTIAL_BYTES: usize = 64 << 20;

#[derive(Debug, Default, Clone, Copy)]
pub struct CudaCounters {
    pub steps: u64,
    pub tokens: u64,
    pub step_seconds: f64,
    pub launches: u64,
    pub graph_replays: u64,
    pub readback_bytes: u64,
}

pub struct CudaModel {
    rt: Runtime,
    config: ModelConfig,
    body: Vec<Op>,
    head_last: Vec<Op>,
    head_all: Vec<Op>,
    argmax: Op,
    step: Buffer,
    tokens: Buffer,
    logits: Buffer,
    argmax_ids: Buffer,
    /// Captured single-token steps by (head: 0 none, 1 last row, 2 all rows; greedy).
    graphs: HashMap<(u8, bool), Graph>,
    use_graphs: bool,
    capacity: usize,
    len: usize,
    weight_bytes: u64,
    pub counters: CudaCounters,
    /// Routed experts in a device slot cache, when they do not all fit the memory budget.
    streaming: Option<CudaStreaming>,
    plan: MemoryPlan,
}

/// The next MoE layer's router run early on one token (expert prefetch under streaming).
struct Guess {
    xn: Buffer,
    logits: Buffer,
    ids: Buffer,
    weights: Buffer,
}

/// Activation buffers, sized for MAX_CHUNK tokens.
struct Activations {
    h: Buffer,
    xn: Buffer,
    qa: Buffer,
    qa_norm: Buffer,
    q: Buffer,
    kv: Buffer,
    q_lat: Buffer,
    partial: Buffer,
    o_lat: Buffer,
    o: Buffer,
    router_logits: Buffer,
    ids: Buffer,
    route_weights: Buffer,
    ffn_a: Buffer,
    ffn_b: Buffer,
    expert_out: Buffer,
    shared_out: Buffer,
}

impl Activations {
    fn bytes(&self) -> u64 {
        [
            &self.h, &self.xn, &self.qa, &self.qa_norm, &self.q, &self.kv, &self.q_lat, &self.partial, &self.o_lat, &self.o,
            &self.router_logits, &self.ids, &self.route_weights, &self.ffn_a, &self.ffn_b, &self.expert_out, &self.shared_out,
        ]
        .iter()
        .map(|b| b.bytes as u64)
        .sum()
    }
}

impl CudaModel {
    /// Uploads `model` (converted to `quant` unless kept) and lowers the forward pass.
    pub fn new(rt: Runtime, model: &Model, capacity: usize, quant: QuantTarget) -> Result<CudaModel> {
        Self::with_options(rt, model, capacity, &GpuOptions::with_quant(quant))
    }

    /// As `new`, with a memory budget (`--gpu-mem`): routed experts that do not fit stream
    /// through a device cache.
    pub fn with_options(rt: Runtime, model: &Model, capacity: usize, options: &GpuOptions) -> Result<CudaModel> {
        let quant = options.quant;
        let c = model.config.clone();
        let w = &model.weights;
        let (d, heads) = (c.hidden_size, c.num_attention_heads);
        let (qk, lora, latent, v_dim) = (c.qk_head_dim(), c.kv_lora_rank, c.latent_dim(), c.v_head_dim);
        let k = c.num_experts_per_tok;
        if c.n_routed_experts > 1024 || c.n_group > 64 || k > 16 {
            return Err(Error::Invalid("the CUDA router handles at most 1024 experts in 64 groups and 16 per token".into()));
        }
        if latent > 768 {
            return Err(Error::Invalid(format!("the CUDA attention kernel takes latents of at most 768 values (kv_lora_rank + qk_rope_head_dim); this model has {latent}")));
        }
        let ops = Ops::new(&rt)?;
        let f32s = |n: usize| rt.alloc(n * 4);
        let n = MAX_CHUNK;
        let per_split = heads * (2 + lora) * 4;
        let prefill_split = AttentionSplit::new(capacity, (PARTIAL_BYTES / (n * per_split)).max(1) as u32);
        let decode_split = AttentionSplit::new(capacity, (PARTIAL_BYTES / per_split).max(1) as u32);
        let partial_floats = prefill_split.partial_floats(n, heads, lora).max(decode_split.partial_floats(1, heads, lora));
        let ffn_width = [c.intermediate_size, k * c.moe_intermediate_size, c.n_shared_experts * c.moe_intermediate_size].into_iter().max().unwrap();
        let a = Activations {
            h: f32s(n * d)?,
            xn: f32s(n * d)?,
            qa: f32s(n * c.q_lora_rank.unwrap_or(1))?,
            qa_norm: f32s(n * c.q_lora_rank.unwrap_or(1))?,
            q: f32s(n * heads * qk)?,
            kv: f32s(n * latent)?,
            q_lat: f32s(n * heads * lora)?,
            partial: f32s(partial_floats)?,
            o_lat: f32s(n * heads * lora)?,
            o: f32s(n * heads * v_dim)?,
            router_logits: f32s(n * c.n_routed_experts)?,
            ids: f32s(n * k)?,
            route_weights: f32s(n * k)?,
            ffn_a: f32s(n * ffn_width)?,
            ffn_b: f32s(n * ffn_width)?,
            expert_out: f32s(n * k * d)?,
            shared_out: f32s(n * d)?,
        };
        let tokens = f32s(n)?;
        let logits = f32s(n * c.vocab_size)?;
        let argmax_ids = f32s(n)?;

        // What stays on the device whatever the budget, and what one routed expert takes there.
        let moe_layers = w.moe_layers();
        let kv_bytes = (c.num_hidden_layers * capacity * latent * 4) as u64;
        let plan = MemoryPlan::for_weights(w, quant, k, kv_bytes + a.bytes() + (2 * n + n * c.vocab_size) as u64 * 4);
        let budget = plan.budget(options.gpu_mem, rt.memory());
        // Prefetch needs a device that copies while it computes: on unless turned off (the
        // emulator follows the option too, so the path is tested).
        let prefetch = options.prefetch != crate::budget::Prefetch::Off;
        let guess = Guess { xn: f32s(d)?, logits: f32s(c.n_routed_experts)?, ids: f32s(k)?, weights: f32s(k)? };
        let mut streaming = match plan.slots(budget)? {
            None => None,
            Some(slots) => {
                // Host copies of every routed expert in the device's format (views of the
                // memory-mapped checkpoint when the format is kept).
                let host: Vec<Vec<Mlp>> = moe_layers.iter().map(|(_, moe)| moe.experts.iter().map(|m| m.quantized(quant)).collect()).collect();
                let s = CudaStreaming::new(&rt, host, slots, k, n, options.eviction, &a.ids, prefetch.then_some(&guess.ids))?;
                log::info!(
                    "expert streaming: {} slots of {} for {} experts; budget {}, resident {}",
                    s.slots(),
                    crate::inspect::human_bytes(s.slot_bytes()),
                    plan.experts,
                    crate::inspect::human_bytes(budget),
                    crate::inspect::human_bytes(plan.resident)
                );
                Some(s)
            }
        };
        let groups = ExpertGroups::new(&rt, k, c.n_routed_experts, n)?;
        // Prefill's routed slots grouped by expert (DSRUN_CUDA_GROUPED=0: one slot per block, to
        // compare on a device).
        let grouped = std::env::var("DSRUN_CUDA_GROUPED").as_deref() != Ok("0");
        let stream_bufs = StreamBuffers { x: &a.xn, gate_out: &a.ffn_a, up_out: &a.ffn_b, expert_out: &a.expert_out, ids: &a.ids };

        let weight_bytes = std::cell::Cell::new(0u64);
        let up = |stack: &[&Matrix]| -> Result<CudaMatrix> {
            let m = if quant == QuantTarget::Keep {
                CudaMatrix::upload(&rt, stack)?
            } else {
                let converted: Vec<Matrix> = stack.iter().map(|m| m.quantized(quant)).collect();
                CudaMatrix::upload(&rt, &converted.iter().collect::<Vec<_>>())?
            };
            weight_bytes.set(weight_bytes.get() + m.bytes);
            Ok(m)
        };
        let rope = Rope::new(&c);
        let inv_freq = ops.vector(&rope.inv_freq)?;
        let embed = up(&[&w.embed])?;
        let mut body = vec![ops.embed(&embed, &tokens, &a.h)?];
        let eps = c.rms_norm_eps;
        let mla = MlaShape::new(&c, capacity, &rope);
        for layer in w.layers.iter() {
            let at = &layer.attention;
            body.push(ops.rmsnorm(d, eps, &a.h, &ops.vector(&layer.input_norm)?, &a.xn, false)?);
            let attention = CudaAttention {
                q: match &at.q {
                    QueryProjection::LowRank { a: qa, norm, b } => CudaQuery::LowRank { a: up(&[qa])?, norm: ops.vector(norm)?, b: up(&[b])? },
                    QueryProjection::Direct(q) => CudaQuery::Direct(up(&[q])?),
                },
                kv_a: up(&[&at.kv_a])?,
                kv_norm: ops.vector(&at.kv_norm)?,
                kv_b: up(&[&at.kv_b])?,
                o: up(&[&at.o])?,
                cache: f32s(capacity * latent)?,
            };
            let bufs = AttentionBuffers {
                x: &a.xn,
                qa: &a.qa,
                qa_norm: &a.qa_norm,
                q: &a.q,
                kv: &a.kv,
                q_lat: &a.q_lat,
                partial: &a.partial,
                split: prefill_split,
                decode_split,
                o_lat: &a.o_lat,
                o: &a.o,
                out: &a.h,
                inv_freq: &inv_freq,
            };
            body.extend(ops.attention(&mla, &attention, &bufs)?);

            body.push(ops.rmsnorm(d, eps, &a.h, &ops.vector(&layer.post_attention_norm)?, &a.xn, false)?);
            let mlp = |m: &Mlp, out: &Buffer, accumulate: bool, body: &mut Vec<Op>| -> Result<()> {
                let (gate, upm, down) = (up(&[&m.gate])?, up(&[&m.up])?, up(&[&m.down])?);
                body.push(ops.matmul(&gate, &a.xn, &a.ffn_a, false)?);
                body.push(ops.matmul(&upm, &a.xn, &a.ffn_b, false)?);
                body.push(ops.silu_mul(gate.rows, &a.ffn_a, &a.ffn_b)?);
                body.push(ops.matmul(&down, &a.ffn_a, out, accumulate)?);
                Ok(())
            };
            match &layer.ffn {
                FeedForward::Dense(m) => mlp(m, &a.h, true, &mut body)?,
                FeedForward::Moe(moe) => {
                    // The router stays as stored: small, and routing is sensitive to it.
                    let router = CudaMatrix::upload(&rt, &[&moe.router])?;
                    body.push(ops.matmul(&router, &a.xn, &a.router_logits, false)?);
                    let bias = moe.correction_bias.as_ref().map(|v| ops.vector(v)).transpose()?;
                    body.push(ops.router(&RouterParams::from_config(&c), c.n_routed_experts, &a.router_logits, bias.as_ref(), &a.ids, &a.route_weights)?);
                    if let Some(streaming) = &mut streaming {
                        let j = streaming.layers.len();
                        let next = moe_layers.get(j + 1).map(|&(i, _)| i);
                        let predicts_next = prefetch && next.is_some();
                        if let (true, Some(next)) = (predicts_next, next) {
                            // The next MoE layer's router on this layer's hidden state (its last
                            // token): a guess at the experts it will want, uploaded early.
                            let next_moe = moe_layers[j + 1].1;
                            let norm = ops.vector(&w.layers[next].post_attention_norm)?;
                            body.push(ops.rmsnorm(d, eps, &a.h, &norm, &guess.xn, true)?);
                            let router = CudaMatrix::upload(&rt, &[&next_moe.router])?;
                            let one = MatmulShape { fixed_slots: Some(1), ..MatmulShape::PLAIN };
                            body.push(ops.matmul_shaped(&router, one, &guess.xn, &guess.logits, None)?);
                            let bias = next_moe.correction_bias.as_ref().map(|v| ops.vector(v)).transpose()?;
                            let mut op = ops.router(&RouterParams::from_config(&c), c.n_routed_experts, &guess.logits, bias.as_ref(), &guess.ids, &guess.weights)?;
                            op.grid = Box::new(|_| [1, 1, 1]);
                            body.push(op);
                        }
                        streaming.add_layer(&ops, &stream_bufs, c.moe_intermediate_size, body.len(), predicts_next)?;
                        if let Some(shared) = &moe.shared {
                            mlp(shared, &a.shared_out, false, &mut body)?;
                        }
                        let shared_out = moe.shared.as_ref().map(|_| &a.shared_out);
                        body.push(ops.moe_combine(d, k, &a.expert_out, &a.route_weights, shared_out, &a.h)?);
                        continue;
                    }
                    let stack = |f: fn(&Mlp) -> &Matrix| moe.experts.iter().map(f).collect::<Vec<_>>();
                    let (gate, upm, down) = (up(&stack(|m| &m.gate))?, up(&stack(|m| &m.up))?, up(&stack(|m| &m.down))?);
                    let k32 = k as u32;
                    let groups = grouped.then_some(&groups);
                    if let Some(groups) = groups {
                        body.push(ops.group_by_expert(&a.ids, groups)?);
                    }
                    body.push(ops.expert_matmul(&gate, k32, k32, &a.xn, &a.ffn_a, &a.ids, groups)?);
                    body.push(ops.expert_matmul(&upm, k32, k32, &a.xn, &a.ffn_b, &a.ids, groups)?);
                    body.push(ops.silu_mul(k * gate.rows, &a.ffn_a, &a.ffn_b)?);
                    body.push(ops.expert_matmul(&down, k32, 1, &a.ffn_a, &a.expert_out, &a.ids, groups)?);
                    if let Some(shared) = &moe.shared {
                        mlp(shared, &a.shared_out, false, &mut body)?;
                    }
                    let shared_out = moe.shared.as_ref().map(|_| &a.shared_out);
                    body.push(ops.moe_combine(d, k, &a.expert_out, &a.route_weights, shared_out, &a.h)?);
                }
            }
        }
        let final_norm = ops.vector(&w.final_norm)?;
        let lm_head = up(&[&w.lm_head])?;
        let head_all = vec![ops.rmsnorm(d, eps, &a.h, &final_norm, &a.xn, false)?, ops.matmul(&lm_head, &a.xn, &logits, false)?];
        let last = MatmulShape { fixed_slots: Some(1), ..MatmulShape::PLAIN };
        let head_last = vec![ops.rmsnorm(d, eps, &a.h, &final_norm, &a.xn, true)?, ops.matmul_shaped(&lm_head, last, &a.xn, &logits, None)?];
        let argmax = ops.argmax(c.vocab_size, &logits, &argmax_ids)?;
        let step = ops.step;
        drop(ops);
        Ok(CudaModel {
            // Streaming steps stop at every MoE layer for the host: no whole-step graph.
            use_graphs: !rt.is_emulated() && streaming.is_none() && std::env::var("DSRUN_CUDA_GRAPHS").as_deref() != Ok("0"),
            rt,
            config: c,
            body,
            head_last,
            head_all,
            argmax,
            step,
            tokens,
            logits,
            argmax_ids,
            graphs: HashMap::new(),
            capacity,
            len: 0,
            weight_bytes: weight_bytes.get(),
            counters: CudaCounters::default(),
            streaming,
            plan,
        })
    }

    /// What the model needs on the device: resident bytes and routed-expert bytes.
    pub fn memory_plan(&self) -> MemoryPlan {
        self.plan
    }

    /// Expert-cache slots, when routed experts are streamed.
    pub fn expert_slots(&self) -> Option<usize> {
        self.streaming.as_ref().map(|s| s.slots())
    }

    pub fn stream_counters(&self) -> Option<crate::expert_cache::StreamCounters> {
        self.streaming.as_ref().map(|s| s.counters)
    }

    /// One chunk of at most MAX_CHUNK tokens; returns the read-back bytes.
    fn step(&mut self, tokens: &[u32], head: Option<Logits>, greedy: bool) -> Result<Vec<u8>> {
        let n = tokens.len() as u32;
        let step = [n, self.len as u32, n - 1, 0];
        self.rt.write(&self.step, 0, bytemuck::cast_slice(&step))?;
        self.rt.write(&self.tokens, 0, bytemuck::cast_slice(tokens))?;
        let (head_ops, rows) = match head {
            None => (&[][..], 0),
            Some(Logits::Last) => (&self.head_last[..], 1),
            Some(Logits::All) => (&self.head_all[..], n),
        };
        let launches = || -> Vec<_> {
            let ops = self.body.iter().chain(head_ops).map(|op| op.launch(n));
            ops.chain(greedy.then(|| self.argmax.launch(rows))).collect()
        };
        self.counters.launches += (self.body.len() + head_ops.len() + greedy as usize) as u64;
        if n == 1 && self.use_graphs {
            let key = (head.map_or(0, |h| if h == Logits::Last { 1 } else { 2 }), greedy);
            if !self.graphs.contains_key(&key) {
                self.graphs.insert(key, Graph::capture(&self.rt, launches())?);
            }
            self.graphs[&key].replay(&self.rt)?;
            self.counters.graph_replays += 1;
        } else {
            // Under expert streaming the step stops at each MoE layer's router for its choice.
            let launches = launches();
            let mut done = 0;
            if let Some(streaming) = &mut self.streaming {
                for layer in 0..streaming.layers.len() {
                    let at = streaming.layers[layer].body_index;
                    launches[done..at].iter().try_for_each(|l| self.rt.launch(l))?;
                    let rounds = streaming.counters.rounds;
                    streaming.sync(&self.rt, layer, n)?;
                    // Each round launches the listed gate, up and down matmuls and SwiGLU.
                    self.counters.launches += 4 * (streaming.counters.rounds - rounds);
                    done = at;
                }
            }
            launches[done..].iter().try_for_each(|l| self.rt.launch(l))?;
        }
        self.len += n as usize;
        let bytes = if greedy { rows as usize * 4 } else { rows as usize * self.config.vocab_size * 4 };
        let mut out = vec![0u8; bytes];
        if bytes > 0 {
            let src = if greedy { &self.argmax_ids } else { &self.logits };
            self.rt.read(src, 0, &mut out)?;
        } else {
            self.rt.synchronize()?;
        }
        self.counters.readback_bytes += bytes as u64;
        Ok(out)
    }

    fn run(&mut self, tokens: &[u32], which: Logits, greedy: bool) -> Result<Vec<u8>> {
        check_request(&self.config, self.len, self.capacity, tokens)?;
        let started = std::time::Instant::now();
        self.counters.steps += 1;
        self.counters.tokens += tokens.len() as u64;
        let out = crate::engine::run_in_chunks(tokens, MAX_CHUNK, which, |chunk, head| self.step(chunk, head, greedy))?;
        self.counters.step_seconds += started.elapsed().as_secs_f64();
        Ok(out)
    }
}

impl Engine for CudaModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn forward(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        let bytes = self.run(tokens, which, false)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    fn forward_greedy(&mut self, tokens: &[u32]) -> Result<u32> {
        let bytes = self.run(tokens, Logits::Last, true)?;
        Ok(u32::from_le_bytes(bytes[..4].try_into().unwrap()))
    }

    fn len(&self) -> usize {
        self.len
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn reset(&mut self) {
        self.len = 0;
    }

    fn device_name(&self) -> String {
        self.rt.describe()
    }

    fn reset_counters(&mut self) {
        self.counters = CudaCounters::default();
        if let Some(s) = &mut self.streaming {
            s.counters = Default::default();
        }
    }

    fn counters(&self) -> Option<String> {
        let c = self.counters;
        let per = |x: u64| x as f64 / c.steps.max(1) as f64;
        let mut lines = format!(
            "{} steps: {:.1} launches, {:.2} graph replays, {:.0} bytes read back per step; weights on GPU {}",
            c.steps,
            per(c.launches),
            per(c.graph_replays),
            per(c.readback_bytes),
            crate::inspect::human_bytes(self.weight_bytes)
        );
        if let Some(s) = &self.streaming {
            lines += "\n";
            lines += &s.summary(c.tokens, c.step_seconds);
        }
        Some(lines)
    }
}
