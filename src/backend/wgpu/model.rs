//! The forward pass lowered to wgpu: every dispatch's pipeline and bind group is made once at
//! load; a step writes the step uniform and token ids, records the whole layer stack into one
//! command encoder, submits once, and reads back only the logits or the greedy token id.

use super::context::GpuContext;
use super::kernels::Pipelines;
use super::lower::{AttentionBuffers, Builder, Dispatch, GpuAttention, GpuQuery, MatmulShape, MlaShape, StepUniform};
use super::streaming::{StreamBuffers, StreamedLayer, Streaming};
use super::tensors::{storage, uniform, GpuMatrix};
use crate::budget::{GpuOptions, MemoryPlan};
use crate::config::ModelConfig;
use crate::model::router::RouterParams;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::rope::Rope;
use crate::model::weights::{FeedForward, Matrix, Mlp, QueryProjection};
use crate::quant::QuantTarget;
use rayon::prelude::*;
use crate::model::{check_request, Logits, Model};

/// Counters for `--verbose` stats.
#[derive(Debug, Default, Clone, Copy)]
pub struct GpuCounters {
    pub steps: u64,
    pub submits: u64,
    pub dispatches: u64,
    pub readback_bytes: u64,
    pub tokens: u64,
    pub step_seconds: f64,
}

pub struct GpuModel {
    ctx: GpuContext,
    config: ModelConfig,
    /// Embedding and the layer stack: run for every token.
    body: Vec<Dispatch>,
    /// Final norm + lm_head for the last position, or for every position of the chunk.
    head_last: Vec<Dispatch>,
    head_all: Vec<Dispatch>,
    argmax: Dispatch,
    step: wgpu::Buffer,
    tokens: wgpu::Buffer,
    logits: wgpu::Buffer,
    argmax_ids: wgpu::Buffer,
    readback: wgpu::Buffer,
    /// Most tokens one submit processes; longer prompts run in chunks.
    max_chunk: usize,
    capacity: usize,
    len: usize,
    weight_bytes: u64,
    pub counters: GpuCounters,
    /// `DSRUN_PROFILE=N`: run each dispatch alone N times and time the last (slow; for finding
    /// hot kernels). The step's own work is then done by the profiler's runs.
    profile: Option<Profiler>,
    /// Routed experts in a GPU slot cache, when they do not all fit the memory budget.
    streaming: Option<Streaming>,
    plan: MemoryPlan,
}

/// Activation buffers, sized for `chunk` tokens.
struct Activations {
    h: wgpu::Buffer,
    xn: wgpu::Buffer,
    qa: wgpu::Buffer,
    qa_norm: wgpu::Buffer,
    q: wgpu::Buffer,
    kv: wgpu::Buffer,
    q_lat: wgpu::Buffer,
    o_lat: wgpu::Buffer,
    o: wgpu::Buffer,
    scores: wgpu::Buffer,
    router_logits: wgpu::Buffer,
    ids: wgpu::Buffer,
    route_weights: wgpu::Buffer,
    ffn_a: wgpu::Buffer,
    ffn_b: wgpu::Buffer,
    expert_out: wgpu::Buffer,
    shared_out: wgpu::Buffer,
}

impl Activations {
    fn bytes(&self) -> u64 {
        [
            &self.h, &self.xn, &self.qa, &self.qa_norm, &self.q, &self.kv, &self.q_lat, &self.o_lat, &self.o, &self.scores,
            &self.router_logits, &self.ids, &self.route_weights, &self.ffn_a, &self.ffn_b, &self.expert_out, &self.shared_out,
        ]
        .iter()
        .map(|b| b.size())
        .sum()
    }
}

/// The next MoE layer's router run early on one token (expert prefetch under streaming).
struct Guess {
    xn: wgpu::Buffer,
    logits: wgpu::Buffer,
    ids: wgpu::Buffer,
    weights: wgpu::Buffer,
}

impl GpuModel {
    /// Uploads `model`'s weights in their checkpoint formats and lowers the forward pass.
    /// `quant` converts weight matrices at load (the router stays as stored: it is small and
    /// routing is sensitive to it).
    pub fn new(ctx: GpuContext, model: &Model, capacity: usize, quant: QuantTarget) -> Result<GpuModel> {
        Self::with_options(ctx, model, capacity, &GpuOptions::with_quant(quant))
    }

    /// As `new`, with a memory budget (`--gpu-mem`) and expert-cache settings.
    pub fn with_options(ctx: GpuContext, model: &Model, capacity: usize, options: &GpuOptions) -> Result<GpuModel> {
        // A shader or binding the adapter rejects becomes an error, not a panic.
        let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let built = Self::build(ctx, model, capacity, options)?;
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Invalid(format!("GPU: {} rejected the model's kernels: {e}", built.ctx.describe())));
        }
        Ok(built)
    }

    fn build(ctx: GpuContext, model: &Model, capacity: usize, options: &GpuOptions) -> Result<GpuModel> {
        let quant = options.quant;
        let c = model.config.clone();
        let w = &model.weights;
        let (d, heads) = (c.hidden_size, c.num_attention_heads);
        let (qk, lora, latent, v_dim) = (c.qk_head_dim(), c.kv_lora_rank, c.latent_dim(), c.v_head_dim);
        let k = c.num_experts_per_tok;
        if c.n_routed_experts > 1024 || c.n_group > 64 || k > 16 {
            return Err(Error::Invalid("the GPU router handles at most 1024 experts in 64 groups and 16 per token".into()));
        }

        // The attention scratch holds one row of `capacity` scores per (token, head).
        let per_token_scores = heads * capacity * 4;
        let max_chunk = ((ctx.max_binding() as usize / per_token_scores.max(1)).min(64)).max(1);
        if per_token_scores as u64 > ctx.max_binding() {
            return Err(Error::Invalid(format!("--ctx {capacity} is too long for this adapter's buffers")));
        }
        let step = uniform(&ctx, "step", &[0u8; 16]);
        let b = Builder { ctx: ctx.clone(), pipelines: Pipelines::new(&ctx.device, ctx.subgroups), step: step.clone(), dummy: storage(&ctx, "dummy", 4)? };

        let ffn_width = [
            c.intermediate_size,
            k * c.moe_intermediate_size,
            c.n_shared_experts * c.moe_intermediate_size,
        ]
        .into_iter()
        .max()
        .unwrap();
        let n = max_chunk;
        let a = Activations {
            h: storage(&ctx, "h", n * d)?,
            xn: storage(&ctx, "xn", n * d)?,
            qa: storage(&ctx, "qa", n * c.q_lora_rank.unwrap_or(1))?,
            qa_norm: storage(&ctx, "qa_norm", n * c.q_lora_rank.unwrap_or(1))?,
            q: storage(&ctx, "q", n * heads * qk)?,
            kv: storage(&ctx, "kv", n * latent)?,
            q_lat: storage(&ctx, "q_lat", n * heads * lora)?,
            o_lat: storage(&ctx, "o_lat", n * heads * lora)?,
            o: storage(&ctx, "o", n * heads * v_dim)?,
            scores: storage(&ctx, "attention scores", n * heads * capacity)?,
            router_logits: storage(&ctx, "router logits", n * c.n_routed_experts)?,
            ids: storage(&ctx, "expert ids", n * k)?,
            route_weights: storage(&ctx, "expert weights", n * k)?,
            ffn_a: storage(&ctx, "ffn gate", n * ffn_width)?,
            ffn_b: storage(&ctx, "ffn up", n * ffn_width)?,
            expert_out: storage(&ctx, "expert out", n * k * d)?,
            shared_out: storage(&ctx, "shared expert out", n * d)?,
        };
        let tokens = storage(&ctx, "tokens", n)?;
        let logits = storage(&ctx, "logits", n * c.vocab_size)?;
        let argmax_ids = storage(&ctx, "argmax", n)?;
        let readback = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: (n * c.vocab_size * 4) as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });

        // What stays on the GPU whatever the budget, and what one routed expert takes there.
        let moe_layers = w.moe_layers();
        let kv_bytes = (c.num_hidden_layers * capacity * latent * 4) as u64;
        let buffer_bytes = a.bytes() + tokens.size() + logits.size() + argmax_ids.size() + readback.size();
        let plan = MemoryPlan::for_weights(w, quant, k, kv_bytes + buffer_bytes);
        let slots = plan.slots(plan.budget(options.gpu_mem, ctx.memory))?;
        let prefetch = options.prefetch.enabled(ctx.info.device_type);
        let guess_buffers = match slots {
            Some(_) if prefetch => Some(Guess {
                xn: storage(&ctx, "guess xn", d)?,
                logits: storage(&ctx, "guess router logits", c.n_routed_experts)?,
                ids: storage(&ctx, "guessed expert ids", k)?,
                weights: storage(&ctx, "guessed expert weights", k)?,
            }),
            _ => None,
        };
        let stream_bufs = StreamBuffers {
            x: &a.xn,
            gate_out: &a.ffn_a,
            up_out: &a.ffn_b,
            expert_out: &a.expert_out,
            ids: &a.ids,
            pred_ids: guess_buffers.as_ref().map_or(&a.ids, |g| &g.ids),
        };
        let progress = quant_progress(model, quant);
        let mut streaming = match slots {
            None => None,
            Some(slots) => {
                // Host copies of every routed expert in the GPU's format (views of the
                // memory-mapped checkpoint when the format is kept).
                let host: Vec<Vec<Mlp>> = moe_layers
                    .iter()
                    .map(|(_, moe)| {
                        let experts = &moe.experts;
                        progress.inc(3 * experts.len() as u64);
                        experts.par_iter().map(|m| m.quantized(quant)).collect()
                    })
                    .collect();
                let s = Streaming::new(&ctx, host, slots, k, max_chunk, options.eviction, prefetch, &stream_bufs)?;
                log::info!(
                    "expert streaming: {} slots of {} ({} pools) for {} experts; budget {}, resident {}",
                    s.slots(),
                    crate::inspect::human_bytes(s.slot_bytes()),
                    s.pools(),
                    plan.experts,
                    crate::inspect::human_bytes(plan.budget(options.gpu_mem, ctx.memory)),
                    crate::inspect::human_bytes(plan.resident)
                );
                Some(s)
            }
        };

        let rope = Rope::new(&c);
        let inv_freq = b.vector("inv_freq", &rope.inv_freq);
        let weight_bytes = std::cell::Cell::new(0u64);
        let upload = |stack: &[&Matrix], quant: QuantTarget| -> Result<GpuMatrix> {
            let m = if quant == QuantTarget::Keep {
                GpuMatrix::upload(&ctx, stack)?
            } else {
                let converted: Vec<Matrix> = stack.par_iter().map(|m| m.quantized(quant)).collect();
                progress.inc(converted.len() as u64);
                GpuMatrix::upload(&ctx, &converted.iter().collect::<Vec<_>>())?
            };
            weight_bytes.set(weight_bytes.get() + m.bytes);
            Ok(m)
        };
        let up = |stack: &[&Matrix]| upload(stack, quant);
        // Matrices that only matmul/embedding read may be split into row chunks.
        let up_chunked = |m: &Matrix| -> Result<GpuMatrix> {
            let m = if quant == QuantTarget::Keep { m.clone() } else { m.quantized(quant) };
            progress.inc(1);
            let gm = GpuMatrix::upload_chunked(&ctx, &m)?;
            weight_bytes.set(weight_bytes.get() + gm.bytes);
            Ok(gm)
        };

        let embed = up_chunked(&w.embed)?;
        let mut body = b.embed(&embed, &tokens, &a.h);

        let eps = c.rms_norm_eps;
        let mla = MlaShape::new(&c, capacity, &rope);
        let attention_buffers = AttentionBuffers {
            x: &a.xn,
            qa: &a.qa,
            qa_norm: &a.qa_norm,
            q: &a.q,
            kv: &a.kv,
            q_lat: &a.q_lat,
            scores: &a.scores,
            o_lat: &a.o_lat,
            o: &a.o,
            out: &a.h,
            inv_freq: &inv_freq,
        };
        for (i, layer) in w.layers.iter().enumerate() {
            let at = &layer.attention;
            body.push(b.rmsnorm(d, eps, &a.h, &b.vector("input_norm", &layer.input_norm), &a.xn, false));
            let gpu_attention = GpuAttention {
                q: match &at.q {
                    QueryProjection::LowRank { a: qa, norm, b: qb } => {
                        GpuQuery::LowRank { a: up_chunked(qa)?, norm: b.vector("q_a_norm", norm), b: up_chunked(qb)? }
                    }
                    QueryProjection::Direct(q) => GpuQuery::Direct(up_chunked(q)?),
                },
                kv_a: up_chunked(&at.kv_a)?,
                kv_norm: b.vector("kv_norm", &at.kv_norm),
                kv_b: up(&[&at.kv_b])?,
                o: up_chunked(&at.o)?,
                cache: storage(&ctx, &format!("latent cache {i}"), capacity * latent)?,
            };
            body.extend(b.attention(&mla, &gpu_attention, &attention_buffers));

            body.push(b.rmsnorm(d, eps, &a.h, &b.vector("post_attention_norm", &layer.post_attention_norm), &a.xn, false));
            let mlp = |m: &Mlp, out: &wgpu::Buffer, accumulate: bool, body: &mut Vec<Dispatch>| -> Result<()> {
                let (gate, upm, down) = (up_chunked(&m.gate)?, up_chunked(&m.up)?, up_chunked(&m.down)?);
                body.extend(b.matmul(&gate, &a.xn, &a.ffn_a, false));
                body.extend(b.matmul(&upm, &a.xn, &a.ffn_b, false));
                body.push(b.silu_mul(gate.rows, &a.ffn_a, &a.ffn_b));
                body.extend(b.matmul(&down, &a.ffn_a, out, accumulate));
                Ok(())
            };
            match &layer.ffn {
                FeedForward::Dense(m) => mlp(m, &a.h, true, &mut body)?,
                FeedForward::Moe(moe) => {
                    let router = upload(&[&moe.router], QuantTarget::Keep)?;
                    body.extend(b.matmul(&router, &a.xn, &a.router_logits, false));
                    let bias = moe.correction_bias.as_ref().map(|v| b.vector("correction bias", v));
                    body.push(b.router(&RouterParams::from_config(&c), c.n_routed_experts, &a.router_logits, bias.as_ref(), &a.ids, &a.route_weights));
                    if let Some(streaming) = &mut streaming {
                        let j = streaming.layers.len();
                        let next = moe_layers.get(j + 1).map(|&(i, _)| i);
                        let mut predicts_next = false;
                        if let (Some(g), Some(next)) = (&guess_buffers, next) {
                            // The next MoE layer's router on this layer's hidden state (its last
                            // token): a guess at the experts it will want, uploaded early.
                            let next_moe = moe_layers[j + 1].1;
                            let norm = b.vector("next post_attention_norm", &w.layers[next].post_attention_norm);
                            body.push(b.rmsnorm(d, eps, &a.h, &norm, &g.xn, true));
                            let router = upload(&[&next_moe.router], QuantTarget::Keep)?;
                            let one = MatmulShape { fixed_slots: Some(1), ..MatmulShape::PLAIN };
                            body.extend(b.matmul_shaped(&router, one, &g.xn, &g.logits, None));
                            let bias = next_moe.correction_bias.as_ref().map(|v| b.vector("next correction bias", v));
                            let mut guess = b.router(&RouterParams::from_config(&c), c.n_routed_experts, &g.logits, bias.as_ref(), &g.ids, &g.weights);
                            guess.grid = Box::new(|_| [1, 1, 1]);
                            body.push(guess);
                            predicts_next = true;
                        }
                        let dispatches = streaming.layer_dispatches(&b, &stream_bufs, c.moe_intermediate_size);
                        streaming.layers.push(StreamedLayer { body_index: body.len(), dispatches, predicts_next });
                        if let Some(shared) = &moe.shared {
                            mlp(shared, &a.shared_out, false, &mut body)?;
                        }
                        let shared_out = moe.shared.as_ref().map(|_| &a.shared_out);
                        body.push(b.moe_combine(d, k, &a.expert_out, &a.route_weights, shared_out, &a.h));
                        continue;
                    }
                    let stack = |f: fn(&Mlp) -> &Matrix| moe.experts.iter().map(f).collect::<Vec<_>>();
                    let gate = up(&stack(|m| &m.gate))?;
                    let upm = up(&stack(|m| &m.up))?;
                    let down = up(&stack(|m| &m.down))?;
                    let k32 = k as u32;
                    body.extend(b.expert_matmul(&gate, k32, k32, &a.xn, &a.ffn_a, &a.ids));
                    body.extend(b.expert_matmul(&upm, k32, k32, &a.xn, &a.ffn_b, &a.ids));
                    body.push(b.silu_mul(k * gate.rows, &a.ffn_a, &a.ffn_b));
                    body.extend(b.expert_matmul(&down, k32, 1, &a.ffn_a, &a.expert_out, &a.ids));
                    if let Some(shared) = &moe.shared {
                        mlp(shared, &a.shared_out, false, &mut body)?;
                    }
                    let shared_out = moe.shared.as_ref().map(|_| &a.shared_out);
                    body.push(b.moe_combine(d, k, &a.expert_out, &a.route_weights, shared_out, &a.h));
                }
            }
        }

        progress.finish_and_clear();
        let final_norm = b.vector("final norm", &w.final_norm);
        let lm_head = up_chunked(&w.lm_head)?;
        let mut head_all = vec![b.rmsnorm(d, eps, &a.h, &final_norm, &a.xn, false)];
        head_all.extend(b.matmul(&lm_head, &a.xn, &logits, false));
        let last = MatmulShape { fixed_slots: Some(1), ..MatmulShape::PLAIN };
        let lm_last = b.matmul_shaped(&lm_head, last, &a.xn, &logits, None);
        let mut head_last = vec![b.rmsnorm(d, eps, &a.h, &final_norm, &a.xn, true)];
        head_last.extend(lm_last);
        let argmax = b.argmax(c.vocab_size, &logits, &argmax_ids);

        Ok(GpuModel {
            ctx,
            config: c,
            body,
            head_last,
            head_all,
            argmax,
            step,
            tokens,
            logits,
            argmax_ids,
            readback,
            max_chunk,
            capacity,
            len: 0,
            weight_bytes: weight_bytes.get(),
            counters: GpuCounters::default(),
            profile: if streaming.is_some() { None } else { Profiler::from_env() },
            streaming,
            plan,
        })
    }

    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    pub fn max_chunk(&self) -> usize {
        self.max_chunk
    }

    /// What the model needs on the GPU: resident bytes and routed-expert bytes.
    pub fn memory_plan(&self) -> MemoryPlan {
        self.plan
    }

    /// Expert-cache slots, when routed experts are streamed.
    pub fn expert_slots(&self) -> Option<usize> {
        self.streaming.as_ref().map(|s| s.slots())
    }

    /// Expert-cache pools (each fits one binding), when routed experts are streamed.
    pub fn expert_pools(&self) -> Option<usize> {
        self.streaming.as_ref().map(|s| s.pools())
    }

    pub fn stream_counters(&self) -> Option<super::streaming::StreamCounters> {
        self.streaming.as_ref().map(|s| s.counters)
    }

    /// Runs one chunk (at most `max_chunk` tokens). `head`: which logits to compute, if any;
    /// `greedy`: also take the argmax of each computed row. Returns the read-back bytes.
    fn step(&mut self, tokens: &[u32], head: Option<Logits>, greedy: bool) -> Result<Vec<u8>> {
        let n = tokens.len() as u32;
        let step = StepUniform { n_tokens: n, start: self.len as u32, logits_row0: n - 1, _pad: 0 };
        self.ctx.queue.write_buffer(&self.step, 0, bytemuck::bytes_of(&step));
        self.ctx.queue.write_buffer(&self.tokens, 0, bytemuck::cast_slice(tokens));

        let head_ops = match head {
            None => &[][..],
            Some(Logits::Last) => &self.head_last[..],
            Some(Logits::All) => &self.head_all[..],
        };
        let rows = match head {
            None => 0,
            Some(Logits::Last) => 1,
            Some(Logits::All) => n,
        };
        // Every dispatch of the step with its workgroup counts; the argmax covers the head's rows.
        let argmax = greedy.then_some((&self.argmax, [rows, 1, 1]));
        let ops: Vec<(&Dispatch, [u32; 3])> =
            self.body.iter().chain(head_ops).map(|d| d.for_tokens(n)).chain(argmax).collect();
        if let Some(profiler) = &mut self.profile {
            profiler.time(&self.ctx, &ops);
        }
        let mut encoder = self.ctx.device.create_command_encoder(&Default::default());
        let record = |encoder: &mut wgpu::CommandEncoder, ops: &[(&Dispatch, [u32; 3])]| {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            for (d, grid) in ops {
                d.encode(&mut pass, *grid);
            }
        };
        if self.profile.is_none() {
            // Under expert streaming the step stops at each MoE layer's router for its choice.
            let mut done = 0;
            if let Some(streaming) = &mut self.streaming {
                for layer in 0..streaming.layers.len() {
                    let at = streaming.layers[layer].body_index;
                    record(&mut encoder, &ops[done..at]);
                    encoder = streaming.sync(&self.ctx, encoder, layer, n)?;
                    self.counters.submits += 1;
                    done = at;
                }
            }
            record(&mut encoder, &ops[done..]);
            self.counters.dispatches += ops.len() as u64;
        }
        let bytes = if greedy { rows as u64 * 4 } else { rows as u64 * self.config.vocab_size as u64 * 4 };
        if bytes > 0 {
            let src = if greedy { &self.argmax_ids } else { &self.logits };
            encoder.copy_buffer_to_buffer(src, 0, &self.readback, 0, bytes);
        }
        self.ctx.queue.submit([encoder.finish()]);
        self.counters.submits += 1;
        self.len += n as usize;
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let slice = self.readback.slice(..bytes);
        slice.map_async(wgpu::MapMode::Read, |_| {});
        self.ctx
            .device
            .poll(wgpu::PollType::Wait { submission_index: None, timeout: None })
            .map_err(|e| Error::Invalid(format!("GPU: waiting for the step failed: {e}")))?;
        let out = slice
            .get_mapped_range()
            .map_err(|e| Error::Invalid(format!("GPU: reading results back failed: {e}")))?
            .to_vec();
        self.readback.unmap();
        self.counters.readback_bytes += bytes;
        Ok(out)
    }

    /// Runs `tokens` in chunks; only the last chunk computes the head unless all logits are wanted.
    fn run(&mut self, tokens: &[u32], which: Logits, greedy: bool) -> Result<Vec<u8>> {
        check_request(&self.config, self.len, self.capacity, tokens)?;
        let started = std::time::Instant::now();
        self.counters.steps += 1;
        self.counters.tokens += tokens.len() as u64;
        let out = crate::engine::run_in_chunks(tokens, self.max_chunk, which, |chunk, head| self.step(chunk, head, greedy))?;
        self.counters.step_seconds += started.elapsed().as_secs_f64();
        Ok(out)
    }
}

impl Engine for GpuModel {
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
        self.ctx.describe()
    }

    fn reset_counters(&mut self) {
        self.counters = GpuCounters::default();
        if let Some(s) = &mut self.streaming {
            s.counters = Default::default();
        }
    }

    fn counters(&self) -> Option<String> {
        if let Some(profiler) = &self.profile {
            profiler.print();
        }
        let c = self.counters;
        let per = |x: u64| x as f64 / c.steps.max(1) as f64;
        let mut lines = format!(
            "{} steps: {:.1} dispatches, {:.2} submits, {:.0} bytes read back per step; weights on GPU {}",
            c.steps,
            per(c.dispatches),
            per(c.submits),
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

/// A progress bar over the matrices `quant` converts (hidden when there is nothing to convert or
/// stderr is not a terminal).
fn quant_progress(model: &Model, quant: QuantTarget) -> indicatif::ProgressBar {
    if quant == QuantTarget::Keep {
        return indicatif::ProgressBar::hidden();
    }
    let c = &model.config;
    let moe_layers = (0..c.num_hidden_layers).filter(|&l| c.is_moe_layer(l)).count();
    let per_layer = 6 + 3; // attention matrices (at most) + an MLP
    let total = 2 + c.num_hidden_layers * per_layer + moe_layers * (3 * c.n_routed_experts);
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("quantising to {msg} {bar:40} {pos}/{len} matrices")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(format!("{quant:?}").to_lowercase());
    bar
}

/// Per-kernel timing for `DSRUN_PROFILE`: each dispatch submitted alone and waited for.
struct Profiler {
    repeats: u32,
    /// "kernel grid" -> (calls, seconds).
    totals: std::collections::BTreeMap<String, (u32, f64)>,
}

impl Profiler {
    fn from_env() -> Option<Profiler> {
        let value = std::env::var("DSRUN_PROFILE").ok()?;
        Some(Profiler { repeats: value.parse().unwrap_or(1).max(1), totals: Default::default() })
    }

    fn time(&mut self, ctx: &GpuContext, ops: &[(&Dispatch, [u32; 3])]) {
        let wait = || ctx.device.poll(wgpu::PollType::Wait { submission_index: None, timeout: None });
        for (d, [x, y, z]) in ops {
            let mut seconds = 0.0;
            for _ in 0..self.repeats {
                let started = std::time::Instant::now();
                let mut encoder = ctx.device.create_command_encoder(&Default::default());
                {
                    let mut pass = encoder.begin_compute_pass(&Default::default());
                    d.encode(&mut pass, [*x, *y, *z]);
                }
                ctx.queue.submit([encoder.finish()]);
                let _ = wait();
                seconds = started.elapsed().as_secs_f64();
            }
            let entry = self.totals.entry(format!("{:?} {x}x{y}x{z}", d.kernel)).or_default();
            entry.0 += 1;
            entry.1 += seconds;
        }
    }

    fn print(&self) {
        let mut rows: Vec<_> = self.totals.iter().collect();
        rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        for (name, (count, seconds)) in rows.iter().take(15) {
            eprintln!("{:>9.3} ms total {:>6} x  {name}", seconds * 1e3, count);
        }
    }
}
