//! The forward pass's operations as CUDA launches: each op is made once at load (kernel,
//! arguments) with its grid as a function of the step's token count, like the wgpu backend's
//! dispatches, and with the same kernel contracts.

use super::runtime::{Arg, Buffer, Kernel, KernelCache, Launch, Runtime};
use super::sources;
use crate::backend::layout::{MatmulShape, MlaShape, PackedStack, LATENT_NORM_EPS};
use crate::config::ScoringFunc;
use crate::error::Result;
use crate::model::router::RouterParams;
use crate::model::weights::Matrix;
use crate::quant::DType;

/// Workgroup counts as a function of the step's token count.
pub type Grid = Box<dyn Fn(u32) -> [u32; 3]>;

pub struct Op {
    pub name: &'static str,
    pub kernel: Kernel,
    pub block: u32,
    pub args: Vec<Arg>,
    pub grid: Grid,
    /// A variant for single-token steps (decode), used instead when n == 1.
    pub decode: Option<Box<Op>>,
}

impl Op {
    fn clone_with_grid(&self, grid: Grid) -> Op {
        Op { name: self.name, kernel: self.kernel.clone(), block: self.block, args: self.args.clone(), grid, decode: None }
    }

    /// The launch for a step of `n` tokens.
    pub fn launch(&self, n: u32) -> Launch {
        let op = match (&self.decode, n) {
            (Some(d), 1) => d.as_ref(),
            _ => self,
        };
        Launch { kernel: op.kernel.clone(), grid: (op.grid)(n), block: [op.block, 1, 1], args: op.args.clone() }
    }
}

/// A weight matrix (or expert stack) on the device in its checkpoint format.
pub struct CudaMatrix {
    pub format: u32,
    pub rows: usize,
    pub cols: usize,
    /// Whether rows and scale blocks come in whole fours (the matmul's vector path).
    pub layout: Buffer,
    pub weights: Buffer,
    pub scales: Buffer,
    pub bytes: u64,
}

/// The kernels' FORMAT code for a weight dtype (common.cuh).
pub fn format_code(dtype: DType) -> u32 {
    match dtype {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
        DType::F8E4M3 => 3,
        DType::Q8 => 4,
        DType::Q4 => 5,
    }
}

impl CudaMatrix {
    /// Uploads one matrix or a stack of same-shaped experts.
    pub fn upload(rt: &Runtime, stack: &[&Matrix]) -> Result<CudaMatrix> {
        let first = stack[0];
        PackedStack::check(stack)?;
        let packed = PackedStack::new(stack, 0, first.rows);
        Ok(CudaMatrix {
            format: format_code(first.dtype),
            rows: first.rows,
            cols: first.cols,
            layout: rt.upload(&[packed.layout])?,
            weights: rt.upload(&packed.data)?,
            scales: rt.upload(&packed.scales)?,
            bytes: packed.data.len() as u64 + packed.scales.len() as u64 * 4,
        })
    }
}

/// Builds ops; holds the step buffer every kernel reads and the compiled kernel families.
pub struct Ops<'a> {
    pub rt: &'a Runtime,
    pub kernels: KernelCache,
    /// `Step` of common.cuh: n_tokens, start, logits_row0, 0.
    pub step: Buffer,
    pub dummy: Buffer,
}

/// Matmul tiles (matmul.cu): slots per block for prefill (and for an expert's group of slots);
/// decode and listed experts take one.
const PREFILL_TILE: u32 = 8;
/// matmul.cu's flag for slots grouped by expert.
const GROUPED: u32 = 8;

/// Room for a step's slots grouped by expert (moe.cu's group_by_expert output).
#[derive(Debug, Clone, Copy)]
pub struct ExpertGroups {
    pub buffer: Buffer,
    pub top_k: u32,
    pub experts: u32,
    pub max_tokens: u32,
}

impl ExpertGroups {
    pub fn new(rt: &Runtime, top_k: usize, experts: usize, max_tokens: usize) -> Result<ExpertGroups> {
        let mut g = ExpertGroups { buffer: Buffer { ptr: 0, bytes: 0 }, top_k: top_k as u32, experts: experts as u32, max_tokens: max_tokens as u32 };
        let words = 2 + 3 * g.max_tiles(g.max_tokens) as usize + max_tokens * top_k;
        g.buffer = rt.alloc(words * 4)?;
        Ok(g)
    }

    /// Most tiles `n` tokens' slots need: whole tiles, plus one partial tile per expert.
    pub fn max_tiles(&self, n: u32) -> u32 {
        let slots = n * self.top_k;
        slots.div_ceil(PREFILL_TILE) + slots.min(self.experts)
    }
}
const MATMUL_WARPS: u32 = 8;
const THREADS: u32 = 256;

impl<'a> Ops<'a> {
    pub fn new(rt: &'a Runtime) -> Result<Ops<'a>> {
        Ok(Ops { rt, kernels: KernelCache::default(), step: rt.alloc(16)?, dummy: rt.alloc(16)? })
    }

    pub fn kernel(&self, source: &'static str, defines: &[(&str, u32)], name: &str) -> Result<Kernel> {
        self.kernels.get(self.rt, source, defines, name)
    }

    fn op(&self, name: &'static str, kernel: Kernel, args: Vec<Arg>, grid: Grid) -> Op {
        Op { name, kernel, block: THREADS, args, grid, decode: None }
    }

    /// One matmul.cu launch shape: `tile` slots per block, `ids` and `flags` as the kernel
    /// reads them (`flags` adds the shape's accumulate/ids/list bits).
    fn matmul_op(&self, w: &CudaMatrix, tile: u32, shape: MatmulShape, bufs: [&Buffer; 3], flags: u32, grid: Grid) -> Result<Op> {
        let [x, y, ids] = bufs;
        let kernel = self.kernel(sources::MATMUL, &[("FORMAT", w.format), ("TILE", tile)], "matmul")?;
        let flags = flags | shape.accumulate as u32 | (shape.use_ids as u32) << 1 | (shape.slot_list as u32) << 2;
        let args = vec![
            w.layout.into(),
            w.weights.into(),
            w.scales.into(),
            self.step.into(),
            x.into(),
            y.into(),
            ids.into(),
            shape.slots_per_token.into(),
            shape.x_div.into(),
            shape.fixed_slots.unwrap_or(0).into(),
            flags.into(),
        ];
        Ok(Op { name: "matmul", kernel, block: 32 * MATMUL_WARPS, args, grid, decode: None })
    }

    /// `y[s] = W_e(s) x[s / x_div]` over the step's slots (matmul.cu), with a one-slot variant
    /// for decode steps.
    pub fn matmul_shaped(&self, w: &CudaMatrix, shape: MatmulShape, x: &Buffer, y: &Buffer, ids: Option<&Buffer>) -> Result<Op> {
        let row_blocks = (w.rows as u32).div_ceil(MATMUL_WARPS);
        let variant = |tile: u32| -> Result<Op> {
            let (per_token, fixed) = (shape.slots_per_token, shape.fixed_slots);
            // A listed matmul's "token count" is the number of listed pairs, one block row each.
            let grid: Grid = match shape.slot_list {
                true => Box::new(move |pairs| [row_blocks, pairs, 1]),
                false => Box::new(move |n| [row_blocks, fixed.unwrap_or(n * per_token).div_ceil(tile), 1]),
            };
            self.matmul_op(w, tile, shape, [x, y, ids.unwrap_or(&self.dummy)], 0, grid)
        };
        if shape.use_ids || shape.fixed_slots.is_some() || shape.slot_list {
            return variant(1);
        }
        let mut op = variant(PREFILL_TILE)?;
        op.decode = Some(Box::new(variant(1)?));
        Ok(op)
    }

    pub fn matmul(&self, w: &CudaMatrix, x: &Buffer, y: &Buffer, accumulate: bool) -> Result<Op> {
        self.matmul_shaped(w, MatmulShape { accumulate, ..MatmulShape::PLAIN }, x, y, None)
    }

    /// Routed experts: slot `t * k + i` multiplies by expert `ids[t * k + i]` (read on the
    /// device). Steps of several tokens go by `groups` (filled by `group_by_expert` after the
    /// router): each block computes up to a tile of slots of one expert, reading its weights
    /// once for them; single-token steps take one slot per block.
    /// `groups: None` takes one slot per block for every step (for comparing the two).
    pub fn expert_matmul(&self, w: &CudaMatrix, k: u32, x_div: u32, x: &Buffer, y: &Buffer, ids: &Buffer, groups: Option<&ExpertGroups>) -> Result<Op> {
        let per_slot = MatmulShape { slots_per_token: k, x_div, use_ids: true, fixed_slots: None, slot_list: false, accumulate: false };
        let Some(groups) = groups else { return self.matmul_shaped(w, per_slot, x, y, Some(ids)) };
        let grouped = MatmulShape { use_ids: false, ..per_slot };
        let (row_blocks, g) = ((w.rows as u32).div_ceil(MATMUL_WARPS), *groups);
        let mut op = self.matmul_op(w, PREFILL_TILE, grouped, [x, y, &groups.buffer], GROUPED, Box::new(move |n| [row_blocks, g.max_tiles(n), 1]))?;
        op.decode = Some(Box::new(self.matmul_shaped(w, per_slot, x, y, Some(ids))?));
        Ok(op)
    }

    /// The step's slots grouped by expert into `groups` for `expert_matmul` (skipped for
    /// single-token steps, which do not use it).
    pub fn group_by_expert(&self, ids: &Buffer, groups: &ExpertGroups) -> Result<Op> {
        let kernel = self.kernel(sources::MOE, &[], "group_by_expert")?;
        let g = *groups;
        let args = vec![self.step.into(), ids.into(), g.buffer.into(), g.top_k.into(), g.experts.into(), PREFILL_TILE.into(), g.max_tiles(g.max_tokens).into()];
        let mut op = Op { name: "group_by_expert", kernel, block: 32, args, grid: Box::new(|_| [1, 1, 1]), decode: None };
        let mut skip = op.clone_with_grid(Box::new(|_| [0, 1, 1]));
        skip.name = "group_by_expert (skipped)";
        op.decode = Some(Box::new(skip));
        Ok(op)
    }

    pub fn embed(&self, table: &CudaMatrix, tokens: &Buffer, out: &Buffer) -> Result<Op> {
        let kernel = self.kernel(sources::MATMUL, &[("FORMAT", table.format), ("TILE", 1)], "embed")?;
        let cols = (table.cols as u32).div_ceil(THREADS);
        let args = vec![table.layout.into(), table.weights.into(), table.scales.into(), self.step.into(), tokens.into(), out.into()];
        Ok(self.op("embed", kernel, args, Box::new(move |n| [cols, n, 1])))
    }

    pub fn rmsnorm(&self, dim: usize, eps: f64, src: &Buffer, weight: &Buffer, dst: &Buffer, last_row: bool) -> Result<Op> {
        let kernel = self.kernel(sources::NORM, &[], "rmsnorm")?;
        let args = vec![self.step.into(), src.into(), weight.into(), dst.into(), (dim as u32).into(), (eps as f32).into(), (last_row as u32).into()];
        let grid: Grid = if last_row { Box::new(|_| [1, 1, 1]) } else { Box::new(|n| [n, 1, 1]) };
        Ok(self.op("rmsnorm", kernel, args, grid))
    }

    pub fn silu_mul(&self, per_token: usize, gate: &Buffer, up: &Buffer) -> Result<Op> {
        let kernel = self.kernel(sources::MOE, &[], "silu_mul")?;
        let per = per_token as u32;
        let args = vec![self.step.into(), gate.into(), up.into(), per.into()];
        Ok(self.op("silu_mul", kernel, args, Box::new(move |n| [(n * per).div_ceil(THREADS), 1, 1])))
    }

    pub fn vector(&self, values: &[f32]) -> Result<Buffer> {
        self.rt.upload(values)
    }

    /// Expert choice per token: `logits [n, experts]` to `ids [n, k]` and `weights [n, k]`.
    pub fn router(&self, r: &RouterParams, experts: usize, logits: &Buffer, bias: Option<&Buffer>, ids: &Buffer, weights: &Buffer) -> Result<Op> {
        let defines = [
            ("EXPERTS", experts as u32),
            ("TOP_K", r.top_k as u32),
            ("N_GROUP", r.n_group as u32),
            ("TOPK_GROUP", r.topk_group as u32),
            ("SOFTMAX", (r.scoring == ScoringFunc::Softmax) as u32),
            ("METHOD", r.method_code()),
            ("NORMALIZE", r.normalize as u32),
            ("HAS_BIAS", bias.is_some() as u32),
        ];
        let kernel = self.kernel(sources::ROUTER, &defines, "router")?;
        let args = vec![self.step.into(), logits.into(), bias.unwrap_or(&self.dummy).into(), ids.into(), weights.into(), r.scaling.into()];
        Ok(self.op("router", kernel, args, Box::new(|n| [n, 1, 1])))
    }

    /// `h[t] += sum_i w[t, i] * expert_out[t * k + i] + shared[t]`.
    pub fn moe_combine(&self, dim: usize, k: usize, expert_out: &Buffer, route_weights: &Buffer, shared_out: Option<&Buffer>, h: &Buffer) -> Result<Op> {
        let kernel = self.kernel(sources::MOE, &[], "moe_combine")?;
        let d = dim as u32;
        let args = vec![
            self.step.into(),
            expert_out.into(),
            route_weights.into(),
            shared_out.unwrap_or(&self.dummy).into(),
            h.into(),
            d.into(),
            (k as u32).into(),
            (shared_out.is_some() as u32).into(),
        ];
        Ok(self.op("moe_combine", kernel, args, Box::new(move |n| [d.div_ceil(THREADS), n, 1])))
    }

    /// The index of each computed logits row's largest value.
    pub fn argmax(&self, vocab: usize, logits: &Buffer, ids: &Buffer) -> Result<Op> {
        let kernel = self.kernel(sources::MOE, &[], "argmax")?;
        let args = vec![logits.into(), ids.into(), (vocab as u32).into()];
        Ok(self.op("argmax", kernel, args, Box::new(|rows| [rows, 1, 1])))
    }

    /// Multi-head latent attention for the step's tokens, the absorbed form (SPEC.md), as the
    /// wgpu backend lowers it: query projections, `kv_a`, the latent store, query RoPE,
    /// `q_lat = W_UK^T q_nope`, attention split over the cache and merged, `W_UV`, and `o_proj`
    /// added to `bufs.out`.
    pub fn attention(&self, s: &MlaShape, w: &CudaAttention, bufs: &AttentionBuffers) -> Result<Vec<Op>> {
        let mut ops = Vec::new();
        match &w.q {
            CudaQuery::LowRank { a, norm, b } => {
                ops.push(self.matmul(a, bufs.x, bufs.qa, false)?);
                ops.push(self.rmsnorm(a.rows, LATENT_NORM_EPS, bufs.qa, norm, bufs.qa_norm, false)?);
                ops.push(self.matmul(b, bufs.qa_norm, bufs.q, false)?);
            }
            CudaQuery::Direct(q) => ops.push(self.matmul(q, bufs.x, bufs.q, false)?),
        }
        ops.push(self.matmul(&w.kv_a, bufs.x, bufs.kv, false)?);

        let (heads, qk, nope, v, lora) = (s.heads as u32, (s.nope + s.rope) as u32, s.nope as u32, s.v as u32, s.lora as u32);
        let latent = self.kernel(sources::ROPE, &[], "latent_store")?;
        let args = vec![
            self.step.into(),
            bufs.kv.into(),
            w.kv_norm.into(),
            bufs.inv_freq.into(),
            w.cache.into(),
            lora.into(),
            (s.rope as u32).into(),
            (LATENT_NORM_EPS as f32).into(),
            s.rope_scale.into(),
        ];
        ops.push(self.op("latent_store", latent, args, Box::new(|n| [n, 1, 1])));
        let rope = self.kernel(sources::ROPE, &[], "rope_q")?;
        let args = vec![self.step.into(), bufs.inv_freq.into(), bufs.q.into(), heads.into(), qk.into(), nope.into(), s.rope_scale.into()];
        let rotations = heads * s.rope as u32 / 2;
        ops.push(self.op("rope_q", rope, args, Box::new(move |n| [(n * rotations).div_ceil(THREADS), 1, 1])));

        let kv_b = &w.kv_b;
        let mla = |name: &str| self.kernel(sources::MLA, &[("FORMAT", kv_b.format), ("LORA", lora), ("ROPE", s.rope as u32)], name);
        let args = vec![kv_b.layout.into(), kv_b.weights.into(), kv_b.scales.into(), self.step.into(), bufs.q.into(), bufs.q_lat.into(), heads.into(), nope.into(), v.into(), qk.into()];
        ops.push(self.op("q_absorb", mla("q_absorb")?, args, Box::new(move |n| [lora.div_ceil(THREADS), n * heads, 1])));

        let attention_bufs = [bufs.q, bufs.q_lat, &w.cache, bufs.partial, bufs.o_lat];
        let decode = self.mla_attention(s, kv_b.format, attention_bufs, bufs.decode_split)?;
        for (mut op, decode) in self.mla_attention(s, kv_b.format, attention_bufs, bufs.split)?.into_iter().zip(decode) {
            op.decode = Some(Box::new(decode));
            ops.push(op);
        }

        let args = vec![kv_b.layout.into(), kv_b.weights.into(), kv_b.scales.into(), self.step.into(), bufs.o_lat.into(), bufs.o.into(), heads.into(), nope.into(), v.into()];
        ops.push(self.op("v_up", mla("v_up")?, args, Box::new(move |n| [v.div_ceil(THREADS), n * heads, 1])));
        ops.push(self.matmul(&w.o, bufs.o, bufs.out, true)?);
        Ok(ops)
    }
}

impl Ops<'_> {
    /// Causal attention of the step's queries over the latent cache, split over the sequence
    /// and merged (mla.cu); `bufs` are q, q_lat, cache, partial, o_lat. `format` only picks
    /// the module variant (the family's absorb kernels read kv_b_proj).
    pub fn mla_attention(&self, s: &MlaShape, format: u32, bufs: [&Buffer; 5], split: AttentionSplit) -> Result<[Op; 2]> {
        let [q, q_lat, cache, partial, o_lat] = bufs;
        let (heads, qk, nope, lora) = (s.heads as u32, (s.nope + s.rope) as u32, s.nope as u32, s.lora as u32);
        let mla = |name: &str| self.kernel(sources::MLA, &[("FORMAT", format), ("LORA", lora), ("ROPE", s.rope as u32)], name);
        let args = vec![self.step.into(), q.into(), q_lat.into(), cache.into(), partial.into(), heads.into(), qk.into(), nope.into(), split.chunk.into(), s.scale.into()];
        let (groups, splits) = (heads.div_ceil(HEAD_GROUP), split.splits);
        let partial_op = self.op("mla_partial", mla("mla_partial")?, args, Box::new(move |n| [groups, n, splits]));
        let args = vec![partial.into(), o_lat.into(), heads.into(), splits.into()];
        let merge = self.op("mla_merge", mla("mla_merge")?, args, Box::new(move |n| [heads, n, 1]));
        Ok([partial_op, merge])
    }
}

/// Heads per attention block (mla.cu's HEAD_GROUP).
const HEAD_GROUP: u32 = 8;
/// Cache positions per attention split (a multiple of mla.cu's TILE_POSITIONS).
const MIN_SPLIT_POSITIONS: u32 = 256;

/// How the attention divides the cache: `splits` blocks of `chunk` positions per (head group,
/// token). Fixed per model load, so a step's launches do not depend on its position.
#[derive(Debug, Clone, Copy)]
pub struct AttentionSplit {
    pub chunk: u32,
    pub splits: u32,
}

impl AttentionSplit {
    /// Chunks of at least 256 positions, at most `max_splits` of them.
    pub fn new(capacity: usize, max_splits: u32) -> AttentionSplit {
        let capacity = capacity.max(1) as u32;
        let splits = capacity.div_ceil(MIN_SPLIT_POSITIONS).clamp(1, max_splits.max(1));
        let chunk = capacity.div_ceil(splits).next_multiple_of(8);
        AttentionSplit { chunk, splits: capacity.div_ceil(chunk) }
    }

    /// Floats of the partial results for `tokens` tokens: m, l and o_lat per (token, head, split).
    pub fn partial_floats(&self, tokens: usize, heads: usize, lora: usize) -> usize {
        tokens * heads * self.splits as usize * (2 + lora)
    }
}

pub enum CudaQuery {
    LowRank { a: CudaMatrix, norm: Buffer, b: CudaMatrix },
    Direct(CudaMatrix),
}

/// One layer's attention weights on the device, and its latent cache (`[ctx, lora + rope]`).
pub struct CudaAttention {
    pub q: CudaQuery,
    pub kv_a: CudaMatrix,
    pub kv_norm: Buffer,
    pub kv_b: CudaMatrix,
    pub o: CudaMatrix,
    pub cache: Buffer,
}

/// Activations the attention reads and writes, sized for a step's tokens.
pub struct AttentionBuffers<'a> {
    pub x: &'a Buffer,
    pub qa: &'a Buffer,
    pub qa_norm: &'a Buffer,
    pub q: &'a Buffer,
    pub kv: &'a Buffer,
    pub q_lat: &'a Buffer,
    pub partial: &'a Buffer,
    pub split: AttentionSplit,
    /// Single-token steps split the cache finer (one token leaves room for more splits).
    pub decode_split: AttentionSplit,
    pub o_lat: &'a Buffer,
    pub o: &'a Buffer,
    pub out: &'a Buffer,
    pub inv_freq: &'a Buffer,
}
