//! The wgpu lowering of each op: a dispatch (pipeline + bind group + grid) made once, and a
//! builder that creates them for each kernel with its parameters. `WgpuBackend::lower` maps
//! plan ops onto these; kernel tests and benchmarks call them directly.

use super::context::GpuContext;
use super::kernels::{Kernel, Pipelines};
use super::tensors::{storage_init, uniform, GpuChunk, GpuMatrix};
use crate::backend::Grid;
use crate::config::ScoringFunc;
use crate::model::router::RouterParams;
pub use crate::plan::layout::{MatmulShape, MlaShape, LATENT_NORM_EPS};
use crate::plan::IndexerShape;
use crate::quant::DType;

pub struct Dispatch {
    pub kernel: Kernel,
    pub pipeline: wgpu::ComputePipeline,
    pub bind_group: wgpu::BindGroup,
    pub grid: Grid,
    /// A variant specialised for single-token steps (decode), used instead when n == 1.
    pub decode: Option<Box<Dispatch>>,
    /// Variants for steps of a few tokens (sequences decoded together): `(most, variant)` in
    /// increasing `most`, the first that covers the step is used instead (for a single token
    /// only where there is no `decode` variant).
    pub small: Vec<(u32, Dispatch)>,
    /// Workgroup counts read from this buffer at this offset instead of `grid` (lists the host
    /// sizes between submits: expert-cache pools).
    pub indirect: Option<(wgpu::Buffer, u64)>,
}

impl Dispatch {
    /// The variant to run for a step of `n` tokens and its workgroup counts.
    pub fn for_tokens(&self, n: u32) -> (&Dispatch, [u32; 3]) {
        let small = || self.small.iter().find(|(most, _)| n <= *most).map(|(_, d)| d);
        let d = match (&self.decode, n) {
            (Some(decode), 1) => decode.as_ref(),
            (None, 1) | (_, 2..) => small().unwrap_or(self),
            _ => self,
        };
        (d, d.grid.at(n))
    }

    /// Records the variant for `n` tokens; false where the step skips it.
    pub fn record(&self, pass: &mut wgpu::ComputePass, n: u32) -> bool {
        let (d, grid) = self.for_tokens(n);
        d.encode(pass, grid)
    }

    /// Records this dispatch (already resolved with `for_tokens`) with workgroup counts `grid`;
    /// false where the grid has no workgroups (a kernel the step skips: grouping experts in
    /// decode).
    pub fn encode(&self, pass: &mut wgpu::ComputePass, [x, y, z]: [u32; 3]) -> bool {
        if self.indirect.is_none() && x * y * z == 0 {
            return false;
        }
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        match &self.indirect {
            Some((buffer, offset)) => pass.dispatch_workgroups_indirect(buffer, *offset),
            None => pass.dispatch_workgroups(x, y, z),
        }
        true
    }
}

/// Matmul kernel parameters (mirrors `Params` in shaders/matmul.wgsl).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct MatmulParams {
    slots_per_token: u32,
    x_div: u32,
    fixed_slots: u32,
    accumulate: u32,
}

/// A matmul.wgsl variant: ROWS output rows per lane group, TILE slots per workgroup, in groups
/// of CL lanes (64 / CL groups per workgroup).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile {
    pub rows: u32,
    pub slots: u32,
    pub lanes: u32,
}

impl Tile {
    const fn new(rows: u32, slots: u32, lanes: u32) -> Tile {
        Tile { rows, slots, lanes }
    }

    pub fn rows_per_workgroup(self) -> u32 {
        self.rows * (64 / self.lanes)
    }
}

/// The matmul variants an adapter runs. All share one lane grouping, which fixes the order of
/// each row's sums: a row then comes out bitwise the same whatever variant computed it (batched
/// decoding equals decoding alone; streamed experts equal resident ones).
pub struct MatmulTiles {
    /// Single-slot work (decode, routed experts per slot, listed expert-cache slots).
    pub decode: Tile,
    /// Steps of 2, and of 3 to 4, tokens (a few sequences decoded together): tiles that waste
    /// at most a slot of work, with more rows per workgroup than prefill's.
    pub small: [Tile; 2],
    /// Prefill chunks (where the tiled GEMM does not take them).
    pub prefill: Tile,
    /// Routed experts grouped by expert: up to `slots` slots of one expert per tile.
    pub grouped: Tile,
}

/// GPUs: one group of 64 lanes per workgroup; single-slot work takes many rows per workgroup
/// (per-workgroup cost dominates small mat-vecs); grouped tiles of 2 slots (in decode batches
/// most experts serve one or two tokens; a bigger tile leaves lanes idle).
const GPU_TILES: MatmulTiles = MatmulTiles { decode: Tile::new(16, 1, 64), small: [Tile::new(16, 2, 64), Tile::new(8, 4, 64)], prefill: Tile::new(4, 8, 64), grouped: Tile::new(16, 2, 64) };

/// CPU adapters (lavapipe): groups of 4 lanes, each lane sweeping a quarter of the row's words:
/// llvmpipe runs a workgroup's lanes one after another in 8-wide vectors, so lanes add no
/// parallelism, and the fixed cost of a workgroup (setup, the sum across lanes through
/// workgroup memory) is worth paying once per 16 groups' rows. Measured on the 0.58B synth,
/// against one group of 64: decode 2.6x, prefill 2.5x faster; 8 and 2 lanes close behind, 1 and
/// 16 slower. Grouped tiles of 4 slots (a per-slot pass re-reads an expert from memory for each
/// of its slots).
const CPU_TILES: MatmulTiles = MatmulTiles { decode: Tile::new(16, 1, 4), small: [Tile::new(16, 2, 4), Tile::new(8, 4, 4)], prefill: Tile::new(8, 4, 4), grouped: Tile::new(8, 4, 4) };

/// The matmul variants for this adapter (`GpuContext::cpu_shapes`).
pub fn matmul_tiles(ctx: &GpuContext) -> &'static MatmulTiles {
    if ctx.cpu_shapes {
        &CPU_TILES
    } else {
        &GPU_TILES
    }
}

/// Tokens per tile of the prefill GEMM.
const GEMM_TOKENS: u32 = 16;

/// matmul.wgsl's mode switches: expert ids per slot, a listed (slot, expert) pair per
/// workgroup, or grouped tiles.
#[derive(Debug, Clone, Copy)]
struct MatmulModes {
    use_ids: bool,
    slot_list: bool,
    grouped: bool,
}

/// Which of an expert's matrices a grouped matmul computes (they have their own row counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertMatrix {
    GateUp,
    Down,
}
const MAX_DISPATCH: u32 = 65535;

fn split(groups: u32) -> [u32; 2] {
    [groups.min(MAX_DISPATCH), groups.div_ceil(MAX_DISPATCH)]
}

/// Workgroup counts of `listed_expert_matmul` over a matrix of `rows` rows for `pairs` listed
/// slots, with `tile` the adapter's decode tile.
pub fn listed_grid(tile: Tile, rows: usize, pairs: u32) -> [u32; 3] {
    let [x, y] = split((rows as u32).div_ceil(tile.rows_per_workgroup()));
    [x, y, pairs]
}

/// Heads per attention workgroup: each lane keeps HG x ceil(lora / 64) output values (<= 64)
/// and HG x 4 scores per tile are summed across lanes (<= 32).
pub fn attention_head_group(s: &MlaShape) -> u32 {
    let columns = (s.lora as u32).div_ceil(64).max(1);
    (64 / columns).clamp(1, 8).min(s.heads as u32)
}

/// (subgroup size, heads per workgroup) of the one-subgroup attention (attention_subgroup.wgsl)
/// where the adapter takes it: CPU shapes, subgroups of one size, and a latent row of at most
/// 40 column pairs per lane; heads such that each lane keeps at most 80 query and 64 output
/// pairs.
fn subgroup_attention_shape(ctx: &GpuContext, s: &MlaShape) -> Option<(u32, u32)> {
    let sg = ctx.info.subgroup_min_size;
    if !(ctx.cpu_shapes && ctx.subgroups) || sg != ctx.info.subgroup_max_size || !(1..=64).contains(&sg) {
        return None;
    }
    let pairs = ((s.lora + s.rope) as u32).div_ceil(2 * sg);
    let out_pairs = (s.lora as u32).div_ceil(2 * sg).max(1);
    if pairs > 40 {
        return None;
    }
    Some((sg, (80 / pairs).min(64 / out_pairs).clamp(1, 8).min(s.heads as u32)))
}

/// Cache positions per split of the attention, at least (fewer splits below).
const MIN_SPLIT_POSITIONS: u32 = 256;
/// Most splits of a decode step's cache.
const MAX_SPLITS: u32 = 64;
/// The multi-token (prefill) split's results are sized for this many tokens.
pub const ATTENTION_TOKENS: usize = 64;

/// How the attention divides a sequence's cache: `splits` workgroups of `chunk` positions per
/// (head group, token), fixed at lowering (a step's dispatches never depend on its position).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionSplit {
    pub chunk: u32,
    pub splits: u32,
}

impl AttentionSplit {
    /// Splits of at least MIN_SPLIT_POSITIONS positions, at most `most`, chunks whole tiles.
    fn new(ctx: usize, most: u32) -> AttentionSplit {
        let ctx = ctx.max(1) as u32;
        let splits = ctx.div_ceil(MIN_SPLIT_POSITIONS).clamp(1, most.max(1));
        let chunk = ctx.div_ceil(splits).next_multiple_of(4);
        AttentionSplit { chunk, splits: ctx.div_ceil(chunk) }
    }

    /// (decode, prefill): single-token steps, and steps of up to ATTENTION_TOKENS tokens, each
    /// with its results within one binding.
    pub fn for_shape(s: &MlaShape, max_binding: u64) -> (AttentionSplit, AttentionSplit) {
        let per_split = (s.heads * (2 + s.lora) * 4) as u64;
        let most = |tokens: u64| (max_binding / (tokens * per_split).max(1)).min(MAX_SPLITS as u64) as u32;
        (AttentionSplit::new(s.ctx, most(1)), AttentionSplit::new(s.ctx, most(ATTENTION_TOKENS as u64)))
    }

    /// Words of results for `tokens` tokens: (m, l, o_lat) per (token, head, split).
    pub fn words(&self, s: &MlaShape, tokens: usize) -> usize {
        tokens * s.heads * self.splits as usize * (2 + s.lora)
    }
}

pub struct Builder {
    pub ctx: GpuContext,
    pub pipelines: Pipelines,
    /// The step's values (`Step` in shaders/step.wgsl), read by most kernels.
    pub step: wgpu::Buffer,
    /// Bound where a kernel's optional buffer is absent.
    pub dummy: wgpu::Buffer,
}

impl Builder {
    pub fn new(ctx: GpuContext) -> crate::error::Result<Builder> {
        let step = uniform(&ctx, "step", &[0u8; 16]);
        let dummy = super::tensors::storage(&ctx, "dummy", 4)?;
        let pipelines = Pipelines::new(&ctx.device, ctx.subgroups);
        Ok(Builder { ctx, pipelines, step, dummy })
    }

    pub fn dispatch(&self, kernel: Kernel, format: Option<DType>, buffers: &[&wgpu::Buffer], grid: Grid) -> Dispatch {
        self.dispatch_with(kernel, format, &[], buffers, grid)
    }

    pub fn dispatch_with(&self, kernel: Kernel, format: Option<DType>, overrides: &[(&'static str, f64)], buffers: &[&wgpu::Buffer], grid: Grid) -> Dispatch {
        let numbered: Vec<(u32, &wgpu::Buffer)> = buffers.iter().enumerate().map(|(i, &b)| (i as u32, b)).collect();
        self.dispatch_bound(kernel, format, overrides, &numbered, grid)
    }

    /// As `dispatch_with`, with each buffer's binding number (entry points of one shader file
    /// that use different subsets of its bindings).
    pub fn dispatch_bound(&self, kernel: Kernel, format: Option<DType>, overrides: &[(&'static str, f64)], buffers: &[(u32, &wgpu::Buffer)], grid: Grid) -> Dispatch {
        let pipeline = self.pipelines.get_with(kernel, format, overrides);
        let layout = pipeline.get_bind_group_layout(0);
        let entries: Vec<wgpu::BindGroupEntry> = buffers.iter().map(|&(binding, b)| wgpu::BindGroupEntry { binding, resource: b.as_entire_binding() }).collect();
        let bind_group = self.ctx.device.create_bind_group(&wgpu::BindGroupDescriptor { label: Some(&format!("{kernel:?}")), layout: &layout, entries: &entries });
        Dispatch { kernel, pipeline, bind_group, grid, decode: None, small: Vec::new(), indirect: None }
    }

    pub fn params<T: bytemuck::Pod>(&self, label: &str, value: &T) -> wgpu::Buffer {
        uniform(&self.ctx, label, bytemuck::bytes_of(value))
    }

    /// `y[s] = W_e(s) x[s / x_div]` over the step's slots, with a single-slot variant for decode
    /// (and for routed experts, whose slots each read a different expert). One dispatch per row
    /// chunk of the matrix.
    pub fn matmul_shaped(&self, w: &GpuMatrix, shape: MatmulShape, x: &wgpu::Buffer, y: &wgpu::Buffer, ids: Option<&wgpu::Buffer>) -> Vec<Dispatch> {
        let p = self.params("matmul", &MatmulParams { slots_per_token: shape.slots_per_token, x_div: shape.x_div, fixed_slots: shape.fixed_slots.unwrap_or(0), accumulate: shape.accumulate as u32 });
        let ids = ids.unwrap_or(&self.dummy);
        let tiles = matmul_tiles(&self.ctx);
        w.chunks
            .iter()
            .map(|chunk| {
                let modes = MatmulModes { use_ids: shape.use_ids, slot_list: shape.slot_list, grouped: false };
                let variant = |t: Tile| {
                    let [gx, gy] = split((chunk.rows as u32).div_ceil(t.rows_per_workgroup()));
                    let grid = match shape.fixed_slots {
                        Some(slots) => Grid::fixed([gx, gy, slots.div_ceil(t.slots)]),
                        None => Grid::new([gx, gy, shape.slots_per_token, t.slots], |n, [x, y, per, tile]| [x, y, (n * per).div_ceil(tile)]),
                    };
                    self.matmul_pipeline(w, chunk, t, modes, [&p, x, y, ids], grid)
                };
                if shape.use_ids || shape.fixed_slots.is_some() {
                    return variant(tiles.decode);
                }
                let mut d = if self.ctx.prefill_gemm && w.whole_words { self.gemm(w, chunk, shape.accumulate, x, y) } else { variant(tiles.prefill) };
                d.decode = Some(Box::new(variant(tiles.decode)));
                d.small = tiles.small.iter().map(|&t| (t.slots, variant(t))).collect();
                d
            })
            .collect()
    }

    /// One matmul.wgsl pipeline over `chunk` of `w`: tile `t`, the kernel's modes, `p` its
    /// parameters and (x, y, ids) its data; 16-byte loads where `w` allows them.
    fn matmul_pipeline(&self, w: &GpuMatrix, chunk: &GpuChunk, t: Tile, modes: MatmulModes, [p, x, y, ids]: [&wgpu::Buffer; 4], grid: Grid) -> Dispatch {
        let wide = self.wide_loads(w);
        let flag = |on: bool| on as u32 as f64;
        let overrides = [
            ("COLS", w.cols as f64),
            ("ROWS", t.rows as f64),
            ("TILE", t.slots as f64),
            ("CL", t.lanes as f64),
            ("WIDE", flag(wide)),
            ("USE_IDS", flag(modes.use_ids)),
            ("SLOT_LIST", flag(modes.slot_list)),
            ("GROUPED", flag(modes.grouped)),
        ];
        let weights4 = if wide { &chunk.weights } else { &self.dummy };
        let buffers = [&chunk.layout, &chunk.weights, &chunk.scales, p, &self.step, x, y, ids, weights4];
        let kernel = if self.f16_math(w) { Kernel::MatmulF16 } else { Kernel::Matmul };
        self.dispatch_with(kernel, Some(w.format), &overrides, &buffers, grid)
    }

    /// Whether matmuls of `w` multiply in f16 (`GpuContext::f16_math`, for the formats whose
    /// weights f16 holds exactly: bf16, f16, FP8, q8).
    pub fn f16_math(&self, w: &GpuMatrix) -> bool {
        self.ctx.f16_math && matches!(w.format, DType::BF16 | DType::F16 | DType::F8E4M3 | DType::Q8)
    }

    /// Whether matmuls of `w` take 16-byte weight loads (matmul.wgsl's WIDE): GPU shapes, a
    /// format of one lane step per word (all but q4 and the GGUF block formats, decoded four
    /// values at a time), rows of whole 16-byte units (so every row
    /// of every expert and slot starts on one). A matrix decides alike resident, streamed or in
    /// chunks, so each row's sums keep one order.
    pub fn wide_loads(&self, w: &GpuMatrix) -> bool {
        !self.ctx.cpu_shapes && w.whole_words && w.format != DType::Q4 && !w.format.format().is_block() && w.format.format().bytes(w.cols).is_multiple_of(16)
    }

    /// The tiled prefill GEMM (gemm.wgsl) of one row chunk: 64 rows by GEMM_TOKENS tokens per
    /// workgroup.
    fn gemm(&self, w: &GpuMatrix, chunk: &GpuChunk, accumulate: bool, x: &wgpu::Buffer, y: &wgpu::Buffer) -> Dispatch {
        let p = self.params("gemm", &[accumulate as u32, 0, 0, 0]);
        let overrides = [("COLS", w.cols as f64), ("TN", GEMM_TOKENS as f64)];
        let [gx, gy] = split((chunk.rows as u32).div_ceil(64));
        let grid = Grid::new([gx, gy, GEMM_TOKENS, 0], |n, [x, y, tile, _]| [x, y, n.div_ceil(tile)]);
        self.dispatch_with(Kernel::Gemm, Some(w.format), &overrides, &[&chunk.layout, &chunk.weights, &chunk.scales, &p, &self.step, x, y], grid)
    }

    /// `y = W x` over the step's tokens (`accumulate`: `y += W x`).
    pub fn matmul(&self, w: &GpuMatrix, x: &wgpu::Buffer, y: &wgpu::Buffer, accumulate: bool) -> Vec<Dispatch> {
        self.matmul_shaped(w, MatmulShape { accumulate, ..MatmulShape::PLAIN }, x, y, None)
    }

    /// Routed experts: slot `t * k + i` multiplies by expert `ids[t * k + i]`; the input row is
    /// the token's (`x_div = k`) for gate/up, the slot's own (`x_div = 1`) for down.
    pub fn expert_matmul(&self, w: &GpuMatrix, k: u32, x_div: u32, x: &wgpu::Buffer, y: &wgpu::Buffer, ids: &wgpu::Buffer) -> Vec<Dispatch> {
        let shape = MatmulShape { slots_per_token: k, x_div, use_ids: true, fixed_slots: None, slot_list: false, accumulate: false };
        self.matmul_shaped(w, shape, x, y, Some(ids))
    }

    /// The buffer `group_experts` writes for steps of at most `slots` expert slots (its
    /// header holds the grouped matmuls' indirect workgroup counts).
    pub fn expert_groups(ctx: &GpuContext, slots: usize) -> crate::error::Result<wgpu::Buffer> {
        let words = 12 + 4 * slots;
        let size = (words * 4) as u64;
        if size > ctx.max_binding() {
            return Err(ctx.limit(format!("grouping {slots} expert slots needs more than this adapter binds at once: lower --ctx")));
        }
        Ok(ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("expert groups"),
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::INDIRECT | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        }))
    }

    /// Groups the step's expert slots (`ids`, k per token) by expert into `groups`
    /// (group_experts.wgsl), in tiles the grouped matmul takes, with the grouped matmuls'
    /// workgroup counts for gate/up matrices of `rows[0]` rows and down of `rows[1]`;
    /// single-token steps skip it.
    pub fn group_experts(&self, k: u32, experts: u32, rows: [usize; 2], ids: &wgpu::Buffer, groups: &wgpu::Buffer) -> Dispatch {
        let tile = matmul_tiles(&self.ctx).grouped;
        let [gate_up, down] = rows.map(|r| (r as u32).div_ceil(tile.rows_per_workgroup()));
        let p = self.params("group", &[k, experts, gate_up, down]);
        let overrides = [("TILE", tile.slots as f64)];
        let grid = Grid::new([0; 4], |n, _| if n > 1 { [1, 1, 1] } else { [0, 1, 1] });
        self.dispatch_with(Kernel::GroupExperts, None, &overrides, &[&p, &self.step, ids, groups], grid)
    }

    /// Routed experts grouped by expert: multi-token steps run `group_experts`' tiles (each
    /// expert's weights decoded once for up to a tile of its slots), one workgroup per tile and
    /// row group through the counts `group_experts` wrote; single-token steps the per-slot
    /// `expert_matmul` over `ids`. Each slot's sums run in the same order either way.
    #[allow(clippy::too_many_arguments)]
    pub fn grouped_expert_matmul(
        &self,
        w: &GpuMatrix,
        which: ExpertMatrix,
        k: u32,
        experts: u32,
        x_div: u32,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        ids: &wgpu::Buffer,
        groups: &wgpu::Buffer,
    ) -> Dispatch {
        let mut per_slot = self.expert_matmul(w, k, x_div, x, y, ids);
        assert_eq!(per_slot.len(), 1, "stacked experts are one binding");
        let chunk = w.single();
        let p = self.params("matmul", &MatmulParams { slots_per_token: k, x_div, fixed_slots: 0, accumulate: 0 });
        let modes = MatmulModes { use_ids: true, slot_list: false, grouped: true };
        let mut d = self.matmul_pipeline(w, chunk, matmul_tiles(&self.ctx).grouped, modes, [&p, x, y, groups], Grid::fixed([0; 3]));
        let offset = match which {
            ExpertMatrix::GateUp => 16,
            ExpertMatrix::Down => 32,
        };
        d.indirect = Some((groups.clone(), offset));
        let per_slot = per_slot.remove(0);
        // On CPU adapters steps of fewer than two slots per expert on average (single tokens
        // among them) run per slot: their tiles would be mostly empty (measured on lavapipe: 8
        // sequences decoded together 1.2x slower grouped). Elsewhere only single tokens do.
        let most = (2 * experts).div_ceil(k).saturating_sub(1);
        if self.ctx.cpu_shapes && most >= 2 {
            d.small = vec![(most, per_slot)];
        } else {
            d.decode = Some(Box::new(per_slot));
        }
        d
    }

    /// Routed experts from one expert-cache pool: only the slots `list` names, as (slot,
    /// pool-local expert) pairs, with workgroup counts read from `args` at `offset` (the host
    /// writes `listed_grid(matmul_tiles(ctx).decode, w.rows, pairs)` there).
    #[allow(clippy::too_many_arguments)]
    pub fn listed_expert_matmul(&self, w: &GpuMatrix, k: u32, x_div: u32, x: &wgpu::Buffer, y: &wgpu::Buffer, list: &wgpu::Buffer, (args, offset): (&wgpu::Buffer, u64)) -> Dispatch {
        let shape = MatmulShape { slots_per_token: k, x_div, use_ids: true, fixed_slots: None, slot_list: true, accumulate: false };
        let mut ops = self.matmul_shaped(w, shape, x, y, Some(list));
        assert_eq!(ops.len(), 1, "expert slots are one binding");
        let mut d = ops.remove(0);
        d.indirect = Some((args.clone(), offset));
        d
    }

    /// Embedding rows of the step's tokens into `out`, one dispatch per row chunk of the table.
    pub fn embed(&self, table: &GpuMatrix, tokens: &wgpu::Buffer, out: &wgpu::Buffer) -> Vec<Dispatch> {
        let groups = (table.cols as u32).div_ceil(64);
        table
            .chunks
            .iter()
            .map(|c| {
                let grid = Grid::new([groups, 0, 0, 0], |n, [x, ..]| [x, n, 1]);
                self.dispatch(Kernel::Embed, Some(table.format), &[&c.layout, &c.weights, &c.scales, &self.step, tokens, out], grid)
            })
            .collect()
    }

    pub fn rmsnorm(&self, dim: usize, eps: f64, src: &wgpu::Buffer, weight: &wgpu::Buffer, dst: &wgpu::Buffer, last_row: bool) -> Dispatch {
        #[repr(C)]
        #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
        struct P {
            dim: u32,
            eps: f32,
            from_logits_row: u32,
            _pad: u32,
        }
        let p = self.params("rmsnorm", &P { dim: dim as u32, eps: eps as f32, from_logits_row: last_row as u32, _pad: 0 });
        let grid = if last_row { Grid::fixed([1, 1, 1]) } else { Grid::per_token() };
        self.dispatch(Kernel::RmsNorm, None, &[&p, &self.step, src, weight, dst], grid)
    }

    pub fn silu_mul(&self, per_token: usize, gate: &wgpu::Buffer, up: &wgpu::Buffer) -> Dispatch {
        let p = self.params("silu_mul", &[per_token as u32, 0, 0, 0]);
        let grid = Grid::new([per_token as u32, 0, 0, 0], |n, [per, ..]| {
            let [x, y] = split((n * per).div_ceil(64));
            [x, y, 1]
        });
        self.dispatch(Kernel::SiluMul, None, &[&p, &self.step, gate, up], grid)
    }

    pub fn vector(&self, label: &str, values: &[f32]) -> wgpu::Buffer {
        storage_init(&self.ctx, label, bytemuck::cast_slice(values))
    }

    /// Expert choice per token: `logits [n, experts]` to `ids [n, k]` and `weights [n, k]`
    /// (`last_row`: one token, row 0). The routing shape is fixed per model, so it is compiled
    /// in as pipeline constants.
    #[allow(clippy::too_many_arguments)]
    pub fn router(&self, r: &RouterParams, experts: usize, logits: &wgpu::Buffer, bias: Option<&wgpu::Buffer>, ids: &wgpu::Buffer, weights: &wgpu::Buffer, last_row: bool) -> Dispatch {
        let p = self.params("router", &[r.scaling, 0.0, 0.0, 0.0]);
        let overrides = [
            ("EXPERTS", experts as f64),
            ("TOP_K", r.top_k as f64),
            ("N_GROUP", r.n_group as f64),
            ("TOPK_GROUP", r.topk_group as f64),
            ("SOFTMAX", (r.scoring == ScoringFunc::Softmax) as u32 as f64),
            ("METHOD", r.method_code() as f64),
            ("NORMALIZE", r.normalize as u32 as f64),
            ("HAS_BIAS", bias.is_some() as u32 as f64),
        ];
        let bias = bias.unwrap_or(&self.dummy);
        let grid = if last_row { Grid::fixed([1, 1, 1]) } else { Grid::per_token() };
        self.dispatch_with(Kernel::Router, None, &overrides, &[&p, &self.step, logits, bias, ids, weights], grid)
    }

    // Small parameter blocks are packed as u32 words in the order of each shader's `Params`
    // struct (f32 fields as their bits): latent.wgsl, rope.wgsl, mla_absorb.wgsl, attention.wgsl.

    /// MLA's latent store: norm + RoPE of the step's latents into the cache.
    pub fn latent_store(&self, s: &MlaShape, kv: &wgpu::Buffer, norm: &wgpu::Buffer, inv_freq: &wgpu::Buffer, positions: &wgpu::Buffer, cache: &wgpu::Buffer) -> Dispatch {
        let p = self.params("latent", &[s.lora as u32, s.rope as u32, (LATENT_NORM_EPS as f32).to_bits(), s.rope_scale.to_bits()]);
        let overrides = [("CACHE", s.cache.code() as f64)];
        self.dispatch_with(Kernel::LatentStore, None, &overrides, &[&p, kv, norm, inv_freq, positions, cache], Grid::per_token())
    }

    /// RoPE of each query head's rope part.
    pub fn rope_q(&self, s: &MlaShape, inv_freq: &wgpu::Buffer, positions: &wgpu::Buffer, q: &wgpu::Buffer) -> Dispatch {
        let (heads, qk) = (s.heads as u32, (s.nope + s.rope) as u32);
        let p = self.params("rope", &[heads, qk, s.nope as u32, s.rope_scale.to_bits()]);
        let grid = Grid::new([heads * s.rope as u32 / 2, 0, 0, 0], |n, [rotations, ..]| [(n * rotations).div_ceil(64), 1, 1]);
        self.dispatch(Kernel::RopeQ, None, &[&p, &self.step, inv_freq, positions, q], grid)
    }

    /// `q_lat = W_UK^T q_nope` (`v_up = false`) or `o = W_UV o_lat` (`v_up = true`) per head.
    pub fn absorb(&self, s: &MlaShape, kv_b: &GpuMatrix, src: &wgpu::Buffer, dst: &wgpu::Buffer, v_up: bool) -> Dispatch {
        let kv_b_chunk = kv_b.single();
        let heads = s.heads as u32;
        let p = self.params("absorb", &[heads, s.nope as u32, s.v as u32, (s.nope + s.rope) as u32]);
        let (kernel, width) = if v_up { (Kernel::VUp, s.v) } else { (Kernel::QAbsorb, s.lora) };
        let grid = Grid::new([(width as u32).div_ceil(64), heads, 0, 0], |n, [x, heads, ..]| [x, n * heads, 1]);
        let buffers = [&kv_b_chunk.layout, &kv_b_chunk.weights, &kv_b_chunk.scales, &p, &self.step, src, dst];
        self.dispatch(kernel, Some(kv_b.format), &buffers, grid)
    }

    /// Causal attention of the step's queries over the latent cache, split over the sequence
    /// and merged (attention_split.wgsl); `bufs` are q, q_lat, positions, cache, the split
    /// results (`attention_scratch` words) and o_lat. Single-token steps split the cache more
    /// finely than multi-token ones (whose results take `tokens` times the room).
    /// `sparse`: V3.2's selected positions and the most per token (splits cover that many).
    pub fn mla_attention(&self, s: &MlaShape, bufs: [&wgpu::Buffer; 6], sparse: Option<(&wgpu::Buffer, usize)>) -> Vec<Dispatch> {
        let [q, q_lat, positions, cache, split_out, o_lat] = bufs;
        let (selected, topk) = sparse.unwrap_or((&self.dummy, 0));
        let s = &s.attended(sparse.map(|(_, k)| k));
        let heads = s.heads as u32;
        let split_overrides = [("LORA", s.lora as f64), ("ROPE", s.rope as f64), ("HG", attention_head_group(s) as f64), ("CACHE", s.cache.code() as f64)];
        // CPU adapters: one subgroup per workgroup, where the adapter has one subgroup size.
        let (kernel, group, overrides) = match subgroup_attention_shape(&self.ctx, s) {
            Some((sg, group)) => {
                let o = vec![("LORA", s.lora as f64), ("ROPE", s.rope as f64), ("HG", group as f64), ("SG", sg as f64), ("CACHE", s.cache.code() as f64)];
                (Kernel::AttentionPartialSubgroup, group, o)
            }
            None => (Kernel::AttentionPartial, attention_head_group(s), split_overrides.to_vec()),
        };
        let pair = |split: AttentionSplit| {
            let p = self.params("attention", &[heads, (s.nope + s.rope) as u32, s.nope as u32, split.chunk, s.scale.to_bits(), split.splits, topk as u32, 0]);
            let grid = Grid::new([heads.div_ceil(group), split.splits, 0, 0], |n, [groups, splits, ..]| [groups, n, splits]);
            let buffers = [(0, &p), (1, q), (2, q_lat), (3, positions), (4, cache), (5, split_out), (7, selected)];
            let partial = self.dispatch_bound(kernel, None, &overrides, &buffers, grid);
            let grid = Grid::new([heads, 0, 0, 0], |n, [heads, ..]| [heads, n, 1]);
            let merge = self.dispatch_bound(Kernel::AttentionMerge, None, &split_overrides, &[(0, &p), (5, split_out), (6, o_lat)], grid);
            [partial, merge]
        };
        let (decode, prefill) = AttentionSplit::for_shape(s, self.ctx.max_binding());
        let [mut partial, mut merge] = pair(prefill);
        let [decode_partial, decode_merge] = pair(decode);
        partial.decode = Some(Box::new(decode_partial));
        merge.decode = Some(Box::new(decode_merge));
        vec![partial, merge]
    }

    /// V3.2's indexer parameters (indexer.wgsl's `Params`).
    fn indexer_params(&self, s: &IndexerShape) -> wgpu::Buffer {
        let (scale, sqrt_heads) = s.scales();
        self.params("indexer", &[s.heads as u32, s.dim as u32, s.rope as u32, s.ctx as u32, s.topk as u32, s.rope_scale.to_bits(), scale.to_bits(), sqrt_heads.to_bits()])
    }

    /// The indexer's keys normalised, rotated and cached, and its queries rotated.
    pub fn indexer_prepare(&self, s: &IndexerShape, [keys, queries, norm, bias, inv_freq, positions, cache]: [&wgpu::Buffer; 7]) -> Dispatch {
        let p = self.indexer_params(s);
        let buffers = [(0, &p), (1, positions), (2, keys), (3, norm), (4, bias), (5, inv_freq), (6, cache), (7, queries)];
        self.dispatch_bound(Kernel::IndexerPrepare, None, &[("CACHE", s.cache.code() as f64)], &buffers, Grid::per_token())
    }

    /// Every visible position's index score, per token.
    pub fn indexer_scores(&self, s: &IndexerShape, [queries, weights, positions, cache, scores]: [&wgpu::Buffer; 5]) -> Dispatch {
        let p = self.indexer_params(s);
        let buffers = [(0, &p), (1, positions), (6, cache), (7, queries), (8, weights), (9, scores)];
        let grid = Grid::new([(s.ctx as u32).div_ceil(64), 0, 0, 0], |n, [x, ..]| [x, n, 1]);
        self.dispatch_bound(Kernel::IndexerScores, None, &[("CACHE", s.cache.code() as f64)], &buffers, grid)
    }

    /// Each token's `topk` best positions, ascending.
    pub fn indexer_top_k(&self, s: &IndexerShape, [scores, positions, selected]: [&wgpu::Buffer; 3]) -> Dispatch {
        let p = self.indexer_params(s);
        self.dispatch_bound(Kernel::IndexerTopK, None, &[], &[(0, &p), (1, positions), (9, scores), (10, selected)], Grid::per_token())
    }

    /// Words the attention's split results take for steps of up to `tokens` tokens.
    pub fn attention_scratch(s: &MlaShape, tokens: usize, max_binding: u64) -> usize {
        let (decode, prefill) = AttentionSplit::for_shape(s, max_binding);
        decode.words(s, 1).max(prefill.words(s, tokens))
    }

    /// `h[t] += sum_i w[t, i] * expert_out[t * k + i] + shared[t]`.
    pub fn moe_combine(&self, dim: usize, k: usize, expert_out: &wgpu::Buffer, route_weights: &wgpu::Buffer, shared_out: Option<&wgpu::Buffer>, h: &wgpu::Buffer) -> Dispatch {
        let p = self.params("combine", &[dim as u32, k as u32, shared_out.is_some() as u32, 0]);
        let grid = Grid::new([(dim as u32).div_ceil(64), 0, 0, 0], |n, [x, ..]| [x, n, 1]);
        self.dispatch(Kernel::MoeCombine, None, &[&p, &self.step, expert_out, route_weights, shared_out.unwrap_or(&self.dummy), h], grid)
    }

    /// The index of each logits row's largest value (run over the rows the head produced).
    pub fn argmax(&self, vocab: usize, logits: &wgpu::Buffer, ids: &wgpu::Buffer) -> Dispatch {
        let p = self.params("argmax", &[vocab as u32, 0, 0, 0]);
        self.dispatch(Kernel::Argmax, None, &[&p, logits, ids], Grid::per_token())
    }
}
