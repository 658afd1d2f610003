//! The CUDA backend: plan ops lowered to launches made once at load; a step writes the step
//! values to device memory and launches its ops on one stream; a single-token step that never
//! stops for the host is captured as a CUDA graph on first use and replayed after, whatever the
//! position (positions live in device memory).

use super::device::{Buffer, Device, Graph};
use super::ops::{AttentionSplit, CudaMatrix, ExpertGroups, Op as Launchable, Ops};
use super::pools::CudaPool;
use crate::backend::{Backend, IntoBackend, Resources, StepKind, StepValues, WorkCounters};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::weights::{Matrix, Mlp};
use crate::plan::layout::MatmulShape;
use crate::plan::{ExpertMatrix, ExpertWeights, KernelLimits, MlaShape, Op, Rows, Target};
use std::collections::HashMap;
use std::sync::Arc;

/// Most tokens one step processes; longer prompts run in chunks.
const MAX_CHUNK: usize = 64;
/// router.cu's MAX_EXPERTS, MAX_GROUPS and MAX_TOP_K; indexer.cu's MAX_INDEX_DIM.
const KERNEL_LIMITS: KernelLimits = KernelLimits { experts: 1024, groups: 64, top_k: 16, index_dim: 1024 };
/// The attention kernel keeps a latent row per position of a cache tile in shared memory.
const MAX_LATENT: usize = 768;

pub struct CudaBackend {
    pub ops: Ops,
    /// Prefill's routed slots grouped by expert on the device (`DSRUN_CUDA_GROUPED=0`: one
    /// slot per block, to compare on a device).
    grouped: bool,
    /// The grouping's device buffer, made with the target.
    groups: Option<ExpertGroups>,
    max_chunk: usize,
    /// The attention's cache split for prefill and decode steps instead of the one chosen from
    /// the context (tests force several splits on short contexts).
    pub attention_split: Option<(AttentionSplit, AttentionSplit)>,
    /// Captured single-token steps by kind (`DSRUN_CUDA_GRAPHS=0` turns them off).
    graphs: HashMap<StepKind, Graph>,
    use_graphs: bool,
    host: Vec<u8>,
    /// Launches recorded (replayed ones included) and graph replays.
    work: WorkCounters,
}

impl IntoBackend<CudaBackend> for Arc<Device> {
    fn into_backend(self) -> Result<CudaBackend> {
        CudaBackend::new(self)
    }
}

impl IntoBackend<CudaBackend> for Device {
    fn into_backend(self) -> Result<CudaBackend> {
        CudaBackend::new(Arc::new(self))
    }
}

impl CudaBackend {
    pub fn new(device: Arc<Device>) -> Result<CudaBackend> {
        let use_graphs = !device.is_emulated() && std::env::var("DSRUN_CUDA_GRAPHS").as_deref() != Ok("0");
        Ok(CudaBackend {
            ops: Ops::new(device)?,
            grouped: std::env::var("DSRUN_CUDA_GROUPED").as_deref() != Ok("0"),
            groups: None,
            max_chunk: MAX_CHUNK,
            attention_split: None,
            graphs: HashMap::new(),
            use_graphs,
            host: Vec::new(),
            work: WorkCounters::new(["launches", "graph replays"]),
        })
    }

    pub fn device(&self) -> &Device {
        &self.ops.rt
    }

    fn splits(&self, s: &MlaShape) -> (AttentionSplit, AttentionSplit) {
        self.attention_split.unwrap_or_else(|| AttentionSplit::for_shape(s, self.max_chunk))
    }

    fn reserve_host(&mut self, bytes: usize) {
        if self.host.len() < bytes {
            self.host.resize(bytes, 0);
        }
    }

    fn launch(&mut self, ops: &[Launchable], n: u32) -> Result<()> {
        for op in ops {
            let (op, grid) = op.resolve(n);
            self.ops.rt.launch_args(&op.kernel, grid, [op.block, 1, 1], &op.args)?;
        }
        self.work.counts[0] += ops.len() as u64;
        Ok(())
    }
}

impl Backend for CudaBackend {
    type Buffer = Buffer;
    type Matrix = CudaMatrix;
    type Pool = CudaPool;
    type Op = Launchable;

    fn describe(&self) -> String {
        self.device().describe()
    }

    fn target(&mut self, config: &ModelConfig, capacity: usize) -> Result<Target> {
        let latent = config.latent_dim();
        if latent > MAX_LATENT {
            return Err(Error::DeviceLimit {
                device: self.describe(),
                what: format!("the CUDA attention kernel takes latents of at most {MAX_LATENT} values (kv_lora_rank + qk_rope_head_dim); this model has {latent} (use --gpu vulkan)"),
            });
        }
        let mla = MlaShape::new(config, capacity, &crate::model::rope::Rope::new(config));
        let (prefill, decode) = self.splits(&mla);
        let (heads, lora) = (mla.heads, mla.lora);
        let k = config.num_experts_per_tok;
        // Prefill's expert grouping: its device buffer, made with the target so every lowering
        // finds it whatever the order ops are lowered in.
        let grouping = self.grouped && config.n_routed_experts > 0;
        self.groups = if grouping { Some(ExpertGroups::new(&self.ops.rt, k, config.n_routed_experts, self.max_chunk)?) } else { None };
        let groups = if grouping { ExpertGroups::bytes(k, config.n_routed_experts, self.max_chunk) } else { 0 };
        self.reserve_host((self.max_chunk * config.vocab_size).max((self.max_chunk + 1) * k) * 4);
        Ok(Target {
            max_chunk: self.max_chunk,
            attention_scratch: prefill.partial_floats(self.max_chunk, heads, lora).max(decode.partial_floats(1, heads, lora)),
            binding_limit: u64::MAX,
            stack_limit: u64::MAX,
            private_bytes: groups as u64,
            memory: self.device().memory(),
            software: self.device().is_emulated(),
            kernels: KERNEL_LIMITS,
            group_experts: grouping,
            hybrid: true,
        })
    }

    fn alloc(&mut self, _name: &str, words: usize) -> Result<Buffer> {
        self.ops.rt.alloc(words * 4)
    }

    fn upload(&mut self, _name: &str, values: &[f32]) -> Result<Buffer> {
        self.ops.rt.upload(values)
    }

    fn upload_matrix(&mut self, stack: &[&Matrix], _chunked: bool) -> Result<CudaMatrix> {
        CudaMatrix::upload(&self.ops.rt, stack)
    }

    fn matrix_bytes(m: &CudaMatrix) -> u64 {
        m.bytes
    }

    fn write(&mut self, dst: &Buffer, data: &[u8]) -> Result<()> {
        self.ops.rt.write(dst, 0, data)
    }

    fn pool(&mut self, expert: &Mlp, slots: usize, max_pairs: usize) -> Result<CudaPool> {
        CudaPool::new(&self.ops.rt, expert, slots, max_pairs)
    }

    fn write_expert(&mut self, pool: &CudaPool, slot: usize, expert: &Mlp) -> Result<u64> {
        pool.write(&self.ops.rt, slot, expert)
    }

    fn write_slot_list(&mut self, pool: &CudaPool, pairs: &[u32]) -> Result<()> {
        pool.write_list(&self.ops.rt, pairs)
    }

    fn uploads_begin(&mut self) -> Result<()> {
        self.ops.rt.uploads_begin()
    }

    fn uploads_done(&mut self) -> Result<()> {
        self.ops.rt.uploads_done()
    }

    fn lower(&mut self, op: &Op, res: &Resources<Self>, out: &mut Vec<Launchable>) -> Result<()> {
        let buf = |id| res.buf(id);
        match *op {
            Op::Embed { table, tokens, out: o } => out.push(self.ops.embed(res.weight(table), buf(tokens), buf(o))?),
            Op::RmsNorm { dim, eps, x, weight, out: o, rows } => out.push(self.ops.rmsnorm(dim, eps as f64, buf(x), buf(weight), buf(o), rows == Rows::Last)?),
            Op::Matmul { w, x, y, rows, accumulate } => {
                let fixed_slots = (rows == Rows::Last).then_some(1);
                out.push(self.ops.matmul_shaped(res.weight(w), MatmulShape { accumulate, fixed_slots, ..MatmulShape::PLAIN }, buf(x), buf(y), None)?)
            }
            Op::SiluMul { width, gate, up } => out.push(self.ops.silu_mul(width, buf(gate), buf(up))?),
            Op::LatentStore { kv, norm, inv_freq, positions, cache, ref mla } => out.push(self.ops.latent_store(mla, buf(kv), buf(norm), buf(inv_freq), buf(positions), buf(cache))?),
            Op::RopeQ { q, inv_freq, positions, ref mla } => out.push(self.ops.rope_q(mla, buf(inv_freq), buf(positions), buf(q))?),
            Op::QAbsorb { kv_b, q, q_lat, ref mla } => out.push(self.ops.absorb(mla, res.weight(kv_b), buf(q), buf(q_lat), false)?),
            Op::Attention { q, q_lat, positions, cache, scratch, o_lat, ref mla, sparse } => {
                let bufs = [buf(q), buf(q_lat), buf(positions), buf(cache), buf(scratch), buf(o_lat)];
                // Sparse attention covers at most topk positions: splits sized for that many.
                let splits = self.splits(&mla.attended(sparse.map(|(_, topk)| topk)));
                let sparse = sparse.map(|(selected, topk)| (buf(selected), topk));
                out.extend(self.ops.mla_attention_split(mla, bufs, splits, sparse)?)
            }
            Op::IndexerPrepare { keys, queries, norm, bias, inv_freq, positions, cache, ref shape } => {
                out.push(self.ops.indexer_prepare(shape, [keys, queries, norm, bias, inv_freq, positions, cache].map(buf))?)
            }
            Op::IndexerScores { queries, weights, positions, cache, scores, ref shape } => out.push(self.ops.indexer_scores(shape, [queries, weights, positions, cache, scores].map(buf))?),
            Op::IndexerTopK { scores, positions, selected, ref shape } => out.push(self.ops.indexer_top_k(shape, [scores, positions, selected].map(buf))?),
            Op::VUp { kv_b, o_lat, o, ref mla } => out.push(self.ops.absorb(mla, res.weight(kv_b), buf(o_lat), buf(o), true)?),
            Op::Router { ref params, experts, logits, bias, ids, weights, rows } => {
                out.push(self.ops.router(params, experts, buf(logits), bias.map(buf), buf(ids), buf(weights), rows == Rows::Last)?)
            }
            Op::GroupExperts { ids, .. } => {
                let groups = self.groups.as_ref().ok_or_else(|| Error::Invalid("GroupExperts on a plan this backend does not group for".into()))?;
                out.push(self.ops.group_by_expert(buf(ids), groups)?)
            }
            Op::ExpertMatmul { matrix, weights, k, x, y, ids, grouped } => {
                let (k32, x_div) = (k as u32, matrix.x_div(k) as u32);
                match weights {
                    ExpertWeights::Stack(w) => {
                        let groups = self.groups.as_ref().filter(|_| grouped);
                        out.push(self.ops.expert_matmul(res.weight(w), k32, x_div, buf(x), buf(y), buf(ids), groups)?)
                    }
                    ExpertWeights::Pools => {
                        for p in &res.pools {
                            let slots = match matrix {
                                ExpertMatrix::Gate => &p.gate,
                                ExpertMatrix::Up => &p.up,
                                ExpertMatrix::Down => &p.down,
                            };
                            out.push(p.listed(&self.ops, slots, k32, x_div, buf(x), buf(y))?);
                        }
                    }
                }
            }
            Op::Streamed { .. } | Op::HostExperts { .. } | Op::ShardExperts { .. } => unreachable!("the runtime handles a streamed, host or shard layer's stop itself"),
            Op::MoeCombine { dim, k, expert_out, weights, shared, h } => out.push(self.ops.moe_combine(dim, k, buf(expert_out), buf(weights), shared.map(buf), buf(h))?),
            Op::Argmax { vocab, logits, ids } => out.push(self.ops.argmax(vocab, buf(logits), buf(ids))?),
        }
        Ok(())
    }

    fn begin_step(&mut self, step: StepValues) -> Result<()> {
        self.ops.rt.write(&self.ops.step, 0, bytemuck::bytes_of(&step))
    }

    fn record(&mut self, ops: &[Launchable], n: u32) -> Result<()> {
        self.launch(ops, n)
    }

    fn record_step(&mut self, kind: StepKind, parts: [(&[Launchable], u32); 3]) -> Result<()> {
        if !(self.use_graphs && parts[0].1 == 1) {
            return parts.into_iter().try_for_each(|(ops, n)| self.launch(ops, n));
        }
        if !self.graphs.contains_key(&kind) {
            let launches = parts.iter().flat_map(|(ops, n)| ops.iter().map(|op| op.launch(*n))).collect();
            self.graphs.insert(kind, Graph::capture(&self.ops.rt, launches)?);
        }
        self.graphs[&kind].replay(&self.ops.rt)?;
        self.work.counts[0] += parts.iter().map(|(ops, _)| ops.len() as u64).sum::<u64>();
        self.work.counts[1] += 1;
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        // Launches are queued on the stream as they are recorded.
        Ok(())
    }

    fn read(&mut self, parts: &[(&Buffer, usize)]) -> Result<&[u8]> {
        let total: usize = parts.iter().map(|(_, bytes)| bytes).sum();
        self.reserve_host(total);
        if total == 0 {
            self.ops.rt.synchronize()?;
        }
        let mut offset = 0;
        for &(src, bytes) in parts {
            self.ops.rt.read(src, 0, &mut self.host[offset..offset + bytes])?;
            offset += bytes;
        }
        Ok(&self.host[..total])
    }

    fn work(&self) -> WorkCounters {
        self.work
    }

    fn reset_work(&mut self) {
        self.work.reset()
    }
}
