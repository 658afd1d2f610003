//! The CUDA lowering of each op: a launch (kernel, arguments, grid as a function of the step's
//! token count) made once at load, with the same kernel contracts as the wgpu dispatches.
//! `CudaBackend::lower` maps plan ops onto these; kernel tests and benchmarks call them directly.

use super::device::{Arg, Buffer, Device, Kernel, KernelCache, Launch};
use super::sources;
use crate::backend::Grid;
use crate::config::ScoringFunc;
use crate::error::Result;
use crate::model::router::RouterParams;
use crate::model::weights::Matrix;
use crate::plan::layout::{MatmulShape, MlaShape, PackedStack, LATENT_NORM_EPS};
use crate::plan::IndexerShape;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// The FORMAT the attention kernels of the MLA family are compiled with: they read no weights,
/// so one fixed variant serves every model (no dependence on which absorb was lowered last).
const ATTENTION_FORMAT: u32 = 0;

pub struct Op {
    pub name: &'static str,
    pub kernel: Kernel,
    pub block: u32,
    pub args: Vec<Arg>,
    pub grid: Grid,
    /// A variant for single-token steps (decode), used instead when n == 1.
    pub decode: Option<Box<Op>>,
    /// The grid counts the pairs of an expert pool's current slot list instead of tokens (the
    /// host sets the count with the list).
    pub pairs: Option<Arc<AtomicU32>>,
}

impl Op {
    /// The variant to launch for a step of `n` tokens and its grid.
    pub fn resolve(&self, n: u32) -> (&Op, [u32; 3]) {
        let op = match (&self.decode, n) {
            (Some(d), 1) => d.as_ref(),
            _ => self,
        };
        let count = op.pairs.as_ref().map_or(n, |p| p.load(Ordering::Relaxed));
        (op, op.grid.at(count))
    }

    /// The launch for a step of `n` tokens, as a value (graph captures, benchmarks).
    pub fn launch(&self, n: u32) -> Launch {
        let (op, grid) = self.resolve(n);
        Launch { kernel: op.kernel.clone(), grid, block: [op.block, 1, 1], args: op.args.clone() }
    }
}

/// A weight matrix (or expert stack) on the device in its checkpoint format.
pub struct CudaMatrix {
    /// The kernels' FORMAT code (the format table's).
    pub format: u32,
    pub rows: usize,
    pub cols: usize,
    /// Matrices stacked (experts, or cache slots).
    pub experts: usize,
    pub layout: Buffer,
    pub weights: Buffer,
    pub scales: Buffer,
    pub bytes: u64,
}

impl CudaMatrix {
    /// Uploads one matrix or a stack of same-shaped experts.
    pub fn upload(rt: &Device, stack: &[&Matrix]) -> Result<CudaMatrix> {
        let first = stack[0];
        PackedStack::check(stack)?;
        let packed = PackedStack::new(stack, 0, first.rows);
        Ok(CudaMatrix {
            format: first.dtype.format().code,
            rows: first.rows,
            cols: first.cols,
            experts: stack.len(),
            layout: rt.upload(&[packed.layout])?,
            weights: rt.upload(&packed.data)?,
            scales: rt.upload(&packed.scales)?,
            bytes: packed.data.len() as u64 + packed.scales.len() as u64 * 4,
        })
    }
}

/// Builds ops; holds the step buffer every kernel reads and the compiled kernel families.
pub struct Ops {
    pub rt: Arc<Device>,
    pub kernels: KernelCache,
    /// `Step` of common.cuh: n_tokens, logits_row0, 0, 0.
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
    pub fn new(rt: &Device, top_k: usize, experts: usize, max_tokens: usize) -> Result<ExpertGroups> {
        let mut g = ExpertGroups { buffer: Buffer { ptr: 0, bytes: 0 }, top_k: top_k as u32, experts: experts as u32, max_tokens: max_tokens as u32 };
        g.buffer = rt.alloc(Self::bytes(top_k, experts, max_tokens))?;
        Ok(g)
    }

    /// Device bytes of the groups of `max_tokens` tokens' slots.
    pub fn bytes(top_k: usize, experts: usize, max_tokens: usize) -> usize {
        (2 + 3 * max_tiles(max_tokens as u32, top_k as u32, experts as u32) as usize + max_tokens * top_k) * 4
    }

    /// Most tiles `n` tokens' slots need.
    pub fn max_tiles(&self, n: u32) -> u32 {
        max_tiles(n, self.top_k, self.experts)
    }
}

/// Most tiles `n` tokens' slots need: whole tiles, plus one partial tile per expert.
fn max_tiles(n: u32, top_k: u32, experts: u32) -> u32 {
    let slots = n * top_k;
    slots.div_ceil(PREFILL_TILE) + slots.min(experts)
}

const MATMUL_WARPS: u32 = 8;
const THREADS: u32 = 256;

impl Ops {
    pub fn new(rt: Arc<Device>) -> Result<Ops> {
        let (step, dummy) = (rt.alloc(16)?, rt.alloc(16)?);
        Ok(Ops { rt, kernels: KernelCache::default(), step, dummy })
    }

    pub fn kernel(&self, source: &'static str, defines: &[(&str, u32)], name: &str) -> Result<Kernel> {
        self.kernels.get(&self.rt, source, defines, name)
    }

    fn op(&self, name: &'static str, kernel: Kernel, args: Vec<Arg>, grid: Grid) -> Op {
        Op { name, kernel, block: THREADS, args, grid, decode: None, pairs: None }
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
        Ok(Op { name: "matmul", kernel, block: 32 * MATMUL_WARPS, args, grid, decode: None, pairs: None })
    }

    /// `y[s] = W_e(s) x[s / x_div]` over the step's slots (matmul.cu), with a one-slot variant
    /// for decode steps. A listed matmul's grid counts its list's pairs, one block row each.
    pub fn matmul_shaped(&self, w: &CudaMatrix, shape: MatmulShape, x: &Buffer, y: &Buffer, ids: Option<&Buffer>) -> Result<Op> {
        let row_blocks = (w.rows as u32).div_ceil(MATMUL_WARPS);
        let variant = |tile: u32| -> Result<Op> {
            let grid = match (shape.slot_list, shape.fixed_slots) {
                (true, _) => Grid::new([row_blocks, 0, 0, 0], |pairs, [x, ..]| [x, pairs, 1]),
                (false, Some(slots)) => Grid::fixed([row_blocks, slots.div_ceil(tile), 1]),
                (false, None) => Grid::new([row_blocks, shape.slots_per_token, tile, 0], |n, [x, per, tile, _]| [x, (n * per).div_ceil(tile), 1]),
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
    #[allow(clippy::too_many_arguments)]
    pub fn expert_matmul(&self, w: &CudaMatrix, k: u32, x_div: u32, x: &Buffer, y: &Buffer, ids: &Buffer, groups: Option<&ExpertGroups>) -> Result<Op> {
        let per_slot = MatmulShape { slots_per_token: k, x_div, use_ids: true, fixed_slots: None, slot_list: false, accumulate: false };
        let Some(groups) = groups else { return self.matmul_shaped(w, per_slot, x, y, Some(ids)) };
        let grouped = MatmulShape { use_ids: false, ..per_slot };
        let row_blocks = (w.rows as u32).div_ceil(MATMUL_WARPS);
        let grid = Grid::new([row_blocks, groups.top_k, groups.experts, 0], |n, [x, k, experts, _]| [x, max_tiles(n, k, experts), 1]);
        let mut op = self.matmul_op(w, PREFILL_TILE, grouped, [x, y, &groups.buffer], GROUPED, grid)?;
        op.decode = Some(Box::new(self.matmul_shaped(w, per_slot, x, y, Some(ids))?));
        Ok(op)
    }

    /// The step's slots grouped by expert into `groups` for `expert_matmul` (skipped for
    /// single-token steps, which do not use it).
    pub fn group_by_expert(&self, ids: &Buffer, groups: &ExpertGroups) -> Result<Op> {
        let kernel = self.kernel(sources::MOE, &[], "group_by_expert")?;
        let g = *groups;
        let args = vec![self.step.into(), ids.into(), g.buffer.into(), g.top_k.into(), g.experts.into(), PREFILL_TILE.into(), g.max_tiles(g.max_tokens).into()];
        let skip = Op { name: "group_by_expert (skipped)", kernel: kernel.clone(), block: 32, args: args.clone(), grid: Grid::fixed([0, 1, 1]), decode: None, pairs: None };
        Ok(Op { name: "group_by_expert", kernel, block: 32, args, grid: Grid::fixed([1, 1, 1]), decode: Some(Box::new(skip)), pairs: None })
    }

    pub fn embed(&self, table: &CudaMatrix, tokens: &Buffer, out: &Buffer) -> Result<Op> {
        let kernel = self.kernel(sources::MATMUL, &[("FORMAT", table.format), ("TILE", 1)], "embed")?;
        let cols = (table.cols as u32).div_ceil(THREADS);
        let args = vec![table.layout.into(), table.weights.into(), table.scales.into(), self.step.into(), tokens.into(), out.into()];
        Ok(self.op("embed", kernel, args, Grid::new([cols, 0, 0, 0], |n, [x, ..]| [x, n, 1])))
    }

    pub fn rmsnorm(&self, dim: usize, eps: f64, src: &Buffer, weight: &Buffer, dst: &Buffer, last_row: bool) -> Result<Op> {
        let kernel = self.kernel(sources::NORM, &[], "rmsnorm")?;
        let args = vec![self.step.into(), src.into(), weight.into(), dst.into(), (dim as u32).into(), (eps as f32).into(), (last_row as u32).into()];
        let grid = if last_row { Grid::fixed([1, 1, 1]) } else { Grid::per_token() };
        Ok(self.op("rmsnorm", kernel, args, grid))
    }

    pub fn silu_mul(&self, per_token: usize, gate: &Buffer, up: &Buffer) -> Result<Op> {
        let kernel = self.kernel(sources::MOE, &[], "silu_mul")?;
        let per = per_token as u32;
        let args = vec![self.step.into(), gate.into(), up.into(), per.into()];
        Ok(self.op("silu_mul", kernel, args, Grid::new([per, 0, 0, 0], |n, [per, ..]| [(n * per).div_ceil(THREADS), 1, 1])))
    }

    pub fn vector(&self, values: &[f32]) -> Result<Buffer> {
        self.rt.upload(values)
    }

    /// Expert choice per token: `logits [n, experts]` to `ids [n, k]` and `weights [n, k]`
    /// (`last_row`: one token, row 0).
    #[allow(clippy::too_many_arguments)]
    pub fn router(&self, r: &RouterParams, experts: usize, logits: &Buffer, bias: Option<&Buffer>, ids: &Buffer, weights: &Buffer, last_row: bool) -> Result<Op> {
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
        let grid = if last_row { Grid::fixed([1, 1, 1]) } else { Grid::per_token() };
        Ok(self.op("router", kernel, args, grid))
    }

    /// `h[t] += sum_i w[t, i] * expert_out[t * k + i] + shared[t]`.
    pub fn moe_combine(&self, dim: usize, k: usize, expert_out: &Buffer, route_weights: &Buffer, shared_out: Option<&Buffer>, h: &Buffer) -> Result<Op> {
        let kernel = self.kernel(sources::MOE, &[], "moe_combine")?;
        let d = dim as u32;
        let args =
            vec![self.step.into(), expert_out.into(), route_weights.into(), shared_out.unwrap_or(&self.dummy).into(), h.into(), d.into(), (k as u32).into(), (shared_out.is_some() as u32).into()];
        Ok(self.op("moe_combine", kernel, args, Grid::new([d.div_ceil(THREADS), 0, 0, 0], |n, [x, ..]| [x, n, 1])))
    }

    /// The index of each computed logits row's largest value.
    pub fn argmax(&self, vocab: usize, logits: &Buffer, ids: &Buffer) -> Result<Op> {
        let kernel = self.kernel(sources::MOE, &[], "argmax")?;
        let args = vec![logits.into(), ids.into(), (vocab as u32).into()];
        Ok(self.op("argmax", kernel, args, Grid::per_token()))
    }

    /// MLA's latent store: norm + RoPE of the step's latents into the cache.
    pub fn latent_store(&self, s: &MlaShape, kv: &Buffer, norm: &Buffer, inv_freq: &Buffer, positions: &Buffer, cache: &Buffer) -> Result<Op> {
        let kernel = self.kernel(sources::ROPE, &[("CACHE", s.cache.code())], "latent_store")?;
        let args = vec![kv.into(), norm.into(), inv_freq.into(), positions.into(), cache.into(), (s.lora as u32).into(), (s.rope as u32).into(), (LATENT_NORM_EPS as f32).into(), s.rope_scale.into()];
        Ok(self.op("latent_store", kernel, args, Grid::per_token()))
    }

    /// RoPE of each query head's rope part.
    pub fn rope_q(&self, s: &MlaShape, inv_freq: &Buffer, positions: &Buffer, q: &Buffer) -> Result<Op> {
        let kernel = self.kernel(sources::ROPE, &[], "rope_q")?;
        let (heads, qk) = (s.heads as u32, (s.nope + s.rope) as u32);
        let args = vec![self.step.into(), inv_freq.into(), positions.into(), q.into(), heads.into(), qk.into(), (s.nope as u32).into(), s.rope_scale.into()];
        let grid = Grid::new([heads * s.rope as u32 / 2, 0, 0, 0], |n, [rotations, ..]| [(n * rotations).div_ceil(THREADS), 1, 1]);
        Ok(self.op("rope_q", kernel, args, grid))
    }

    /// The MLA family compiled for `format` (kv_b's; `ATTENTION_FORMAT` for the attention
    /// kernels, which read no weights) and the model's latent widths.
    fn mla(&self, s: &MlaShape, format: u32, name: &str) -> Result<Kernel> {
        self.kernel(sources::MLA, &[("FORMAT", format), ("LORA", s.lora as u32), ("ROPE", s.rope as u32), ("CACHE", s.cache.code())], name)
    }

    /// `q_lat = W_UK^T q_nope` (`v_up = false`) or `o = W_UV o_lat` (`v_up = true`) per head.
    pub fn absorb(&self, s: &MlaShape, kv_b: &CudaMatrix, src: &Buffer, dst: &Buffer, v_up: bool) -> Result<Op> {
        let (heads, nope, v) = (s.heads as u32, s.nope as u32, s.v as u32);
        let mut args = vec![kv_b.layout.into(), kv_b.weights.into(), kv_b.scales.into(), self.step.into(), src.into(), dst.into(), heads.into(), nope.into(), v.into()];
        let (name, width) = if v_up { ("v_up", v) } else { ("q_absorb", s.lora as u32) };
        if !v_up {
            args.push(((s.nope + s.rope) as u32).into());
        }
        let grid = Grid::new([width.div_ceil(THREADS), heads, 0, 0], |n, [x, heads, ..]| [x, n * heads, 1]);
        Ok(self.op(name, self.mla(s, kv_b.format, name)?, args, grid))
    }

    /// Causal attention of the step's queries over the latent cache, split over the sequence
    /// and merged (mla.cu); `bufs` are q, q_lat, positions, cache, partial, o_lat. `format`
    /// only picks the module variant (the family's absorb kernels read kv_b_proj).
    /// `sparse`: V3.2's selected positions and the most per token.
    pub fn mla_attention(&self, s: &MlaShape, bufs: [&Buffer; 6], split: AttentionSplit, sparse: Option<(&Buffer, usize)>) -> Result<[Op; 2]> {
        let [q, q_lat, positions, cache, partial, o_lat] = bufs;
        let (heads, qk, nope) = (s.heads as u32, (s.nope + s.rope) as u32, s.nope as u32);
        let (selected, topk) = sparse.unwrap_or((&self.dummy, 0));
        let args = vec![
            q.into(),
            q_lat.into(),
            positions.into(),
            cache.into(),
            partial.into(),
            heads.into(),
            qk.into(),
            nope.into(),
            split.chunk.into(),
            s.scale.into(),
            selected.into(),
            (topk as u32).into(),
        ];
        let grid = Grid::new([heads.div_ceil(HEAD_GROUP), split.splits, 0, 0], |n, [groups, splits, ..]| [groups, n, splits]);
        let partial_op = self.op("mla_partial", self.mla(s, ATTENTION_FORMAT, "mla_partial")?, args, grid);
        let args = vec![partial.into(), o_lat.into(), heads.into(), split.splits.into()];
        let merge = self.op("mla_merge", self.mla(s, ATTENTION_FORMAT, "mla_merge")?, args, Grid::new([heads, 0, 0, 0], |n, [heads, ..]| [heads, n, 1]));
        Ok([partial_op, merge])
    }

    /// The attention with its prefill split and, for single-token steps, its decode split.
    pub fn mla_attention_split(&self, s: &MlaShape, bufs: [&Buffer; 6], (prefill, decode): (AttentionSplit, AttentionSplit), sparse: Option<(&Buffer, usize)>) -> Result<[Op; 2]> {
        let [mut partial, mut merge] = self.mla_attention(s, bufs, prefill, sparse)?;
        let [decode_partial, decode_merge] = self.mla_attention(s, bufs, decode, sparse)?;
        partial.decode = Some(Box::new(decode_partial));
        merge.decode = Some(Box::new(decode_merge));
        Ok([partial, merge])
    }

    /// V3.2's indexer: keys normalised, rotated and cached, queries rotated.
    pub fn indexer_prepare(&self, s: &IndexerShape, [keys, queries, norm, bias, inv_freq, positions, cache]: [&Buffer; 7]) -> Result<Op> {
        let kernel = self.kernel(sources::INDEXER, &[("CACHE", s.cache.code())], "indexer_prepare")?;
        let args = vec![
            keys.into(),
            queries.into(),
            norm.into(),
            bias.into(),
            inv_freq.into(),
            positions.into(),
            cache.into(),
            (s.heads as u32).into(),
            (s.dim as u32).into(),
            (s.rope as u32).into(),
            s.rope_scale.into(),
        ];
        Ok(self.op("indexer_prepare", kernel, args, Grid::per_token()))
    }

    /// Every visible position's index score, per token.
    pub fn indexer_scores(&self, s: &IndexerShape, [queries, weights, positions, cache, scores]: [&Buffer; 5]) -> Result<Op> {
        let kernel = self.kernel(sources::INDEXER, &[("CACHE", s.cache.code())], "indexer_score")?;
        let (scale, sqrt_heads) = s.scales();
        let args =
            vec![queries.into(), weights.into(), positions.into(), cache.into(), scores.into(), (s.heads as u32).into(), (s.dim as u32).into(), (s.ctx as u32).into(), scale.into(), sqrt_heads.into()];
        let grid = Grid::new([(s.ctx as u32).div_ceil(THREADS), 0, 0, 0], |n, [x, ..]| [x, n, 1]);
        Ok(self.op("indexer_score", kernel, args, grid))
    }

    /// Each token's `topk` best positions, ascending.
    pub fn indexer_top_k(&self, s: &IndexerShape, [scores, positions, selected]: [&Buffer; 3]) -> Result<Op> {
        let kernel = self.kernel(sources::INDEXER, &[], "indexer_top_k")?;
        let args = vec![scores.into(), positions.into(), selected.into(), (s.ctx as u32).into(), (s.topk as u32).into()];
        Ok(self.op("indexer_top_k", kernel, args, Grid::per_token()))
    }
}

/// Heads per attention block (mla.cu's HEAD_GROUP).
const HEAD_GROUP: u32 = 8;
/// Cache positions per attention split (a multiple of mla.cu's TILE_POSITIONS).
const MIN_SPLIT_POSITIONS: u32 = 256;
/// Device memory for the attention's per-split partial results.
pub const PARTIAL_BYTES: usize = 64 << 20;

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

    /// The prefill split (for `tokens` tokens) and the decode split of a cache of `s.ctx`
    /// positions, within PARTIAL_BYTES of partial results each.
    pub fn for_shape(s: &MlaShape, tokens: usize) -> (AttentionSplit, AttentionSplit) {
        let per_split = s.heads * (2 + s.lora) * 4;
        let prefill = AttentionSplit::new(s.ctx, (PARTIAL_BYTES / (tokens.max(1) * per_split)).max(1) as u32);
        let decode = AttentionSplit::new(s.ctx, (PARTIAL_BYTES / per_split).max(1) as u32);
        (prefill, decode)
    }

    /// Floats of the partial results for `tokens` tokens: m, l and o_lat per (token, head, split).
    pub fn partial_floats(&self, tokens: usize, heads: usize, lora: usize) -> usize {
        tokens * heads * self.splits as usize * (2 + lora)
    }
}
