//! The wgpu backend: plan ops lowered to dispatches made once at load; a step writes the step
//! uniform, records its dispatches into one command encoder (a whole step in one compute pass)
//! and submits once when it reads back, so a step that never stops for the host is one submit.

use super::context::GpuContext;
use super::lower::{Builder, Dispatch, ExpertMatrix as GroupedMatrix, MatmulShape};
use super::pools::SlotPool;
use super::tensors::{storage, GpuMatrix};
use crate::backend::{Backend, IntoBackend, Resources, StepKind, StepValues, WorkCounters};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::hot_path::driver;
use crate::model::weights::{Matrix, Mlp};
use crate::plan::{ExpertMatrix, ExpertWeights, KernelLimits, MlaShape, Op, Rows, Target};

/// router.wgsl's MAX_EXPERTS, MAX_GROUPS and MAX_TOP_K; indexer.wgsl's key in workgroup memory.
const KERNEL_LIMITS: KernelLimits = KernelLimits { experts: 1024, groups: 64, top_k: 16, index_dim: 1024 };

pub struct WgpuBackend {
    pub builder: Builder,
    /// The step being recorded, until it is submitted.
    encoder: Option<wgpu::CommandEncoder>,
    /// Where read-backs land, and their host copy (sized at load, grown if a read is larger).
    readback: Option<wgpu::Buffer>,
    host: Vec<u8>,
    /// Dispatches recorded and submits made.
    work: WorkCounters,
    /// `DSRUN_PROFILE=N`: each dispatch runs alone N times and the last is timed (slow; for
    /// finding hot kernels). The step's own work is then done by the profiler's runs.
    profile: Option<Profiler>,
    /// Where each MoE layer groups its step's expert slots by expert (shared by the layers,
    /// which run one after the other); made with the target.
    expert_groups: Option<wgpu::Buffer>,
    /// Routed experts per MoE layer (the grouped matmuls' tile counts).
    experts: u32,
}

impl IntoBackend<WgpuBackend> for GpuContext {
    fn into_backend(self) -> Result<WgpuBackend> {
        WgpuBackend::new(self)
    }
}

impl WgpuBackend {
    pub fn new(ctx: GpuContext) -> Result<WgpuBackend> {
        Ok(WgpuBackend {
            builder: Builder::new(ctx)?,
            encoder: None,
            readback: None,
            host: Vec::new(),
            work: WorkCounters::new(["dispatches", "submits"]),
            profile: Profiler::from_env(),
            expert_groups: None,
            experts: 0,
        })
    }

    pub fn ctx(&self) -> &GpuContext {
        &self.builder.ctx
    }

    /// Room to read back `bytes` (made at load for the largest read a step makes).
    fn reserve_readback(&mut self, bytes: usize) {
        if self.readback.as_ref().is_some_and(|r| r.size() >= bytes as u64) {
            return;
        }
        self.readback = Some(self.ctx().device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes.max(4) as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        }));
        self.host.resize(bytes.max(4), 0);
    }

    fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        let device = &self.builder.ctx.device;
        self.encoder.get_or_insert_with(|| driver(|| device.create_command_encoder(&Default::default())))
    }

    /// Records `(ops, n)` parts into one compute pass of the step's encoder.
    fn encode(&mut self, parts: &[(&[Dispatch], u32)]) {
        if parts.iter().all(|(ops, _)| ops.is_empty()) {
            return;
        }
        if let Some(profiler) = &mut self.profile {
            parts.iter().for_each(|&(ops, n)| profiler.time(&self.builder.ctx, ops, n));
            self.work.counts[0] += parts.iter().map(|(ops, _)| ops.len() as u64).sum::<u64>();
            return;
        }
        let encoder = self.encoder();
        // Counted as recorded: a dispatch the step skips (no workgroups) is not work.
        let recorded = driver(|| {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            parts.iter().map(|&(ops, n)| ops.iter().filter(|d| d.record(&mut pass, n)).count()).sum::<usize>()
        });
        self.work.counts[0] += recorded as u64;
    }

    fn wait(&self, what: &str) -> Result<()> {
        let ctx = self.ctx();
        driver(|| ctx.device.poll(wgpu::PollType::Wait { submission_index: None, timeout: None })).map(|_| ()).map_err(|e| ctx.failed(what, e))
    }
}

impl Backend for WgpuBackend {
    type Buffer = wgpu::Buffer;
    type Matrix = GpuMatrix;
    type Pool = SlotPool;
    type Op = Dispatch;

    fn describe(&self) -> String {
        self.ctx().describe()
    }

    fn target(&mut self, config: &ModelConfig, capacity: usize) -> Result<Target> {
        let ctx = self.ctx().clone();
        let mla = MlaShape::new(config, capacity, &crate::model::rope::Rope::new(config));
        // The attention's split results: one split per (token, head) must fit a binding.
        let per_token = (mla.heads * (2 + mla.lora) * 4) as u64;
        if per_token > ctx.max_binding() {
            return Err(ctx.limit(format!("{} attention heads' results do not fit this adapter's buffers", mla.heads)));
        }
        let max_chunk = crate::backend::wgpu::lower::ATTENTION_TOKENS;
        let readback = (max_chunk * config.vocab_size).max((max_chunk + 1) * config.num_experts_per_tok) * 4;
        self.reserve_readback(readback);
        let mut private = readback as u64;
        if config.n_routed_experts > 0 {
            let groups = Builder::expert_groups(&ctx, max_chunk * config.num_experts_per_tok)?;
            private += groups.size();
            self.expert_groups = Some(groups);
            self.experts = config.n_routed_experts as u32;
        }
        Ok(Target {
            max_chunk,
            attention_scratch: Builder::attention_scratch(&mla, max_chunk, ctx.max_binding()),
            binding_limit: ctx.chunk_limit(),
            stack_limit: ctx.max_binding(),
            private_bytes: private,
            memory: ctx.memory,
            software: ctx.info.device_type == wgpu::DeviceType::Cpu,
            kernels: KERNEL_LIMITS,
            group_experts: ctx.group_experts && self.expert_groups.is_some(),
            hybrid: true,
        })
    }

    fn checked<T>(&mut self, load: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        // A shader or binding the adapter rejects becomes an error, not a panic.
        let scope = self.ctx().device.push_error_scope(wgpu::ErrorFilter::Validation);
        let loaded = load(self);
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(crate::error::Error::Kernel { device: self.describe(), reason: e.to_string() });
        }
        loaded
    }

    fn alloc(&mut self, name: &str, words: usize) -> Result<wgpu::Buffer> {
        storage(self.ctx(), name, words)
    }

    fn upload(&mut self, name: &str, values: &[f32]) -> Result<wgpu::Buffer> {
        if values.len() as u64 * 4 > self.ctx().max_binding() {
            return Err(self.ctx().limit(format!("`{name}` takes more than this adapter binds at once")));
        }
        Ok(self.builder.vector(name, values))
    }

    fn upload_matrix(&mut self, stack: &[&Matrix], chunked: bool) -> Result<GpuMatrix> {
        match stack {
            [m] if chunked => GpuMatrix::upload_chunked(self.ctx(), m),
            _ => GpuMatrix::upload(self.ctx(), stack),
        }
    }

    fn matrix_bytes(m: &GpuMatrix) -> u64 {
        m.bytes
    }

    fn write(&mut self, dst: &wgpu::Buffer, data: &[u8]) -> Result<()> {
        let queue = &self.builder.ctx.queue;
        driver(|| queue.write_buffer(dst, 0, data));
        Ok(())
    }

    fn pool(&mut self, expert: &Mlp, slots: usize, max_pairs: usize) -> Result<SlotPool> {
        SlotPool::new(self.ctx(), expert, slots, max_pairs)
    }

    fn write_expert(&mut self, pool: &SlotPool, slot: usize, expert: &Mlp) -> Result<u64> {
        let queue = &self.ctx().queue;
        Ok(driver(|| pool.write(queue, slot, expert)))
    }

    fn write_slot_list(&mut self, pool: &SlotPool, pairs: &[u32]) -> Result<()> {
        let queue = &self.ctx().queue;
        driver(|| pool.write_list(queue, pairs));
        Ok(())
    }

    fn lower(&mut self, op: &Op, res: &Resources<Self>, out: &mut Vec<Dispatch>) -> Result<()> {
        let b = &self.builder;
        let buf = |id| res.buf(id);
        match *op {
            Op::Embed { table, tokens, out: o } => out.extend(b.embed(res.weight(table), buf(tokens), buf(o))),
            Op::RmsNorm { dim, eps, x, weight, out: o, rows } => out.push(b.rmsnorm(dim, eps as f64, buf(x), buf(weight), buf(o), rows == Rows::Last)),
            Op::Matmul { w, x, y, rows, accumulate } => {
                let fixed_slots = (rows == Rows::Last).then_some(1);
                out.extend(b.matmul_shaped(res.weight(w), MatmulShape { accumulate, fixed_slots, ..MatmulShape::PLAIN }, buf(x), buf(y), None))
            }
            Op::SiluMul { width, gate, up } => out.push(b.silu_mul(width, buf(gate), buf(up))),
            Op::LatentStore { kv, norm, inv_freq, positions, cache, ref mla } => out.push(b.latent_store(mla, buf(kv), buf(norm), buf(inv_freq), buf(positions), buf(cache))),
            Op::RopeQ { q, inv_freq, positions, ref mla } => out.push(b.rope_q(mla, buf(inv_freq), buf(positions), buf(q))),
            Op::QAbsorb { kv_b, q, q_lat, ref mla } => out.push(b.absorb(mla, res.weight(kv_b), buf(q), buf(q_lat), false)),
            Op::Attention { q, q_lat, positions, cache, scratch, o_lat, ref mla, sparse } => {
                let sparse = sparse.map(|(selected, topk)| (buf(selected), topk));
                out.extend(b.mla_attention(mla, [buf(q), buf(q_lat), buf(positions), buf(cache), buf(scratch), buf(o_lat)], sparse))
            }
            Op::IndexerPrepare { keys, queries, norm, bias, inv_freq, positions, cache, ref shape } => {
                out.push(b.indexer_prepare(shape, [keys, queries, norm, bias, inv_freq, positions, cache].map(buf)))
            }
            Op::IndexerScores { queries, weights, positions, cache, scores, ref shape } => out.push(b.indexer_scores(shape, [queries, weights, positions, cache, scores].map(buf))),
            Op::IndexerTopK { scores, positions, selected, ref shape } => out.push(b.indexer_top_k(shape, [scores, positions, selected].map(buf))),
            Op::VUp { kv_b, o_lat, o, ref mla } => out.push(b.absorb(mla, res.weight(kv_b), buf(o_lat), buf(o), true)),
            Op::Router { ref params, experts, logits, bias, ids, weights, rows } => out.push(b.router(params, experts, buf(logits), bias.map(buf), buf(ids), buf(weights), rows == Rows::Last)),
            Op::GroupExperts { k, experts, rows, ids } => {
                let groups = self.expert_groups.as_ref().ok_or_else(|| crate::error::Error::Invalid("GroupExperts on a plan for a model without routed experts".into()))?;
                out.push(b.group_experts(k as u32, experts as u32, rows, buf(ids), groups))
            }
            Op::ExpertMatmul { matrix, weights, k, x, y, ids, grouped } => {
                let (k32, x_div) = (k as u32, matrix.x_div(k) as u32);
                match weights {
                    // Grouped by expert across the step's tokens (the tiles `GroupExperts` wrote),
                    // else one slot per workgroup.
                    ExpertWeights::Stack(w) => match (&self.expert_groups, grouped) {
                        (Some(groups), true) => {
                            let which = if matrix == ExpertMatrix::Down { GroupedMatrix::Down } else { GroupedMatrix::GateUp };
                            out.push(b.grouped_expert_matmul(res.weight(w), which, k32, self.experts, x_div, buf(x), buf(y), buf(ids), groups))
                        }
                        _ => out.extend(b.expert_matmul(res.weight(w), k32, x_div, buf(x), buf(y), buf(ids))),
                    },
                    // Each pool computes the slots its list names.
                    ExpertWeights::Pools => res.pools.iter().for_each(|p| out.push(p.matmul(b, matrix, k32, buf(x), buf(y)))),
                }
            }
            Op::Streamed { .. } | Op::HostExperts { .. } | Op::ShardExperts { .. } => unreachable!("the runtime handles a streamed, host or shard layer's stop itself"),
            Op::MoeCombine { dim, k, expert_out, weights, shared, h } => out.push(b.moe_combine(dim, k, buf(expert_out), buf(weights), shared.map(buf), buf(h))),
            Op::Argmax { vocab, logits, ids } => out.push(b.argmax(vocab, buf(logits), buf(ids))),
        }
        Ok(())
    }

    fn begin_step(&mut self, step: StepValues) -> Result<()> {
        let (queue, uniform) = (&self.builder.ctx.queue, &self.builder.step);
        driver(|| queue.write_buffer(uniform, 0, bytemuck::bytes_of(&step)));
        Ok(())
    }

    fn record(&mut self, ops: &[Dispatch], n: u32) -> Result<()> {
        self.encode(&[(ops, n)]);
        Ok(())
    }

    fn record_step(&mut self, _kind: StepKind, parts: [(&[Dispatch], u32); 3]) -> Result<()> {
        self.encode(&parts);
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if let Some(encoder) = self.encoder.take() {
            let queue = &self.builder.ctx.queue;
            driver(|| queue.submit([encoder.finish()]));
            self.work.counts[1] += 1;
        }
        Ok(())
    }

    fn read(&mut self, parts: &[(&wgpu::Buffer, usize)]) -> Result<&[u8]> {
        let total: usize = parts.iter().map(|(_, bytes)| bytes).sum();
        self.reserve_readback(total);
        let readback = self.readback.clone().expect("reserved above");
        let encoder = self.encoder();
        let mut offset = 0;
        for &(src, bytes) in parts {
            driver(|| encoder.copy_buffer_to_buffer(src, 0, &readback, offset, bytes as u64));
            offset += bytes as u64;
        }
        self.flush()?;
        if total == 0 {
            self.wait("waiting for the step")?;
            return Ok(&[]);
        }
        let slice = readback.slice(..total as u64);
        driver(|| slice.map_async(wgpu::MapMode::Read, |_| {}));
        self.wait("waiting for the step")?;
        let ctx = &self.builder.ctx;
        let view = driver(|| slice.get_mapped_range()).map_err(|e| ctx.failed("reading results back", e))?;
        self.host[..total].copy_from_slice(&view);
        drop(view);
        driver(|| readback.unmap());
        Ok(&self.host[..total])
    }

    fn work(&self) -> WorkCounters {
        self.work
    }

    fn reset_work(&mut self) {
        self.work.reset()
    }

    fn profile_report(&self) -> Option<String> {
        self.profile.as_ref().map(Profiler::report)
    }
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

    fn time(&mut self, ctx: &GpuContext, ops: &[Dispatch], n: u32) {
        let wait = || ctx.device.poll(wgpu::PollType::Wait { submission_index: None, timeout: None });
        for op in ops {
            let (d, grid) = op.for_tokens(n);
            let mut seconds = 0.0;
            for _ in 0..self.repeats {
                let started = std::time::Instant::now();
                let mut encoder = ctx.device.create_command_encoder(&Default::default());
                {
                    let mut pass = encoder.begin_compute_pass(&Default::default());
                    d.encode(&mut pass, grid);
                }
                ctx.queue.submit([encoder.finish()]);
                let _ = wait();
                seconds = started.elapsed().as_secs_f64();
            }
            let [x, y, z] = grid;
            let entry = self.totals.entry(format!("{:?} {x}x{y}x{z}", d.kernel)).or_default();
            entry.0 += 1;
            entry.1 += seconds;
        }
    }

    fn report(&self) -> String {
        let mut rows: Vec<_> = self.totals.iter().collect();
        rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        rows.iter().take(15).map(|(name, (count, seconds))| format!("{:>9.3} ms total {:>6} x  {name}", seconds * 1e3, count)).collect::<Vec<_>>().join("\n")
    }
}
