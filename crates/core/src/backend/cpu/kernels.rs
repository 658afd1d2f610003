//! The CPU backend's kernels: each plan op over the backend's host buffers, for `n` tokens.
//! An op writes one buffer (its destination), which lowering checks is none of its inputs: the
//! destination is taken out of the buffer list while the op runs, so inputs are borrowed
//! alongside it without copies or unsafe code.

use super::blocks::{Disjoint, Slots};
use super::gemm::{self, PANEL_ROWS};

use super::matmul;
use super::pool::{for_each_chunk, pool};
use super::scratch::{sized, with_scratch};
use super::vector::Simd;
use super::{absorb, attention, bf16, indexer, router};
use crate::error::{Error, Result};
use crate::model::math;
use crate::model::router::RouterParams;
use crate::model::weights::Matrix;
use crate::plan::budget::Math;
use crate::plan::{IndexerShape, MlaShape, Rows};
use std::sync::Arc;

/// Output rows per task of a one-token matmul: enough work per task to amortise its
/// scheduling.
const ROWS_PER_TASK: usize = 16;

/// Tokens per task of a multi-token matmul: their rows (4 KiB each at 1024 columns) stay in
/// the core's L2 while it computes a panel of weight rows for them.
const TOKEN_CHUNK: usize = 64;

/// A weight matrix or a stack of experts, as the checkpoint stores it (sharing its mapping).
#[derive(Debug)]
pub struct CpuMatrix {
    pub(super) stack: Vec<Matrix>,
}

impl CpuMatrix {
    /// Matrices in the stack (experts, or 1).
    pub fn count(&self) -> usize {
        self.stack.len()
    }

    /// Matrix `i` of the stack, as stored (or converted at load).
    pub fn matrix(&self, i: usize) -> &Matrix {
        &self.stack[i]
    }
}

/// One lowered op: buffer indices and the weights it reads.
#[derive(Debug)]
pub enum Kernel {
    Embed { table: Arc<CpuMatrix>, tokens: usize, out: usize },
    RmsNorm { dim: usize, eps: f32, x: usize, weight: usize, out: usize, rows: Rows },
    Matmul { w: Arc<CpuMatrix>, x: usize, y: usize, rows: Rows, accumulate: bool },
    SiluMul { width: usize, gate: usize, up: usize },
    Router { params: RouterParams, experts: usize, logits: usize, bias: Option<usize>, ids: usize, weights: usize, rows: Rows },
    ExpertMatmul { w: Arc<CpuMatrix>, x_div: usize, k: usize, x: usize, y: usize, ids: usize },
    MoeCombine { dim: usize, k: usize, expert_out: usize, weights: usize, shared: Option<usize>, h: usize },
    Argmax { vocab: usize, logits: usize, ids: usize },
    RopeQ { q: usize, inv_freq: usize, positions: usize, mla: MlaShape },
    LatentStore { kv: usize, norm: usize, inv_freq: usize, positions: usize, cache: usize, mla: MlaShape },
    QAbsorb { kv_b: Arc<CpuMatrix>, q: usize, q_lat: usize, mla: MlaShape },
    Attention { q: usize, q_lat: usize, positions: usize, cache: usize, o_lat: usize, mla: MlaShape, sparse: Option<(usize, usize)> },
    VUp { kv_b: Arc<CpuMatrix>, o_lat: usize, o: usize, mla: MlaShape },
    IndexerPrepare { keys: usize, queries: usize, norm: usize, bias: usize, inv_freq: usize, positions: usize, cache: usize, shape: IndexerShape },
    IndexerScores { queries: usize, weights: usize, positions: usize, cache: usize, scores: usize, shape: IndexerShape },
    IndexerTopK { scores: usize, positions: usize, selected: usize, shape: IndexerShape },
}

fn f32s(words: &[u32]) -> &[f32] {
    bytemuck::cast_slice(words)
}

fn f32s_mut(words: &mut [u32]) -> &mut [f32] {
    bytemuck::cast_slice_mut(words)
}

/// Rows an op covers in a step of `n` tokens.
fn rows_of(rows: Rows, n: usize) -> usize {
    match rows {
        Rows::All => n,
        Rows::Last => 1,
    }
}

impl Kernel {
    /// The buffer the op writes (without allocating: this runs every step).
    fn dst(&self) -> usize {
        match *self {
            Kernel::Embed { out, .. } | Kernel::RmsNorm { out, .. } => out,
            Kernel::Matmul { y, .. } | Kernel::ExpertMatmul { y, .. } => y,
            Kernel::SiluMul { gate, .. } => gate,
            Kernel::Router { ids, .. } | Kernel::Argmax { ids, .. } => ids,
            Kernel::MoeCombine { h, .. } => h,
            Kernel::RopeQ { q, .. } => q,
            Kernel::LatentStore { cache, .. } | Kernel::IndexerPrepare { cache, .. } => cache,
            Kernel::QAbsorb { q_lat, .. } => q_lat,
            Kernel::Attention { o_lat, .. } => o_lat,
            Kernel::VUp { o, .. } => o,
            Kernel::IndexerScores { scores, .. } => scores,
            Kernel::IndexerTopK { selected, .. } => selected,
        }
    }

    /// The buffer the op writes, and the others it touches (the router's second output among
    /// them: no two may be the same).
    fn buffers(&self) -> (usize, Vec<usize>) {
        match *self {
            Kernel::Embed { tokens, out, .. } => (out, vec![tokens]),
            Kernel::RmsNorm { x, weight, out, .. } => (out, vec![x, weight]),
            Kernel::Matmul { x, y, .. } => (y, vec![x]),
            Kernel::SiluMul { gate, up, .. } => (gate, vec![up]),
            Kernel::Router { logits, bias, ids, weights, .. } => (ids, [logits, weights].into_iter().chain(bias).collect()),
            Kernel::ExpertMatmul { x, y, ids, .. } => (y, vec![x, ids]),
            Kernel::MoeCombine { expert_out, weights, shared, h, .. } => (h, [expert_out, weights].into_iter().chain(shared).collect()),
            Kernel::Argmax { logits, ids, .. } => (ids, vec![logits]),
            Kernel::RopeQ { q, inv_freq, positions, .. } => (q, vec![inv_freq, positions]),
            Kernel::LatentStore { kv, norm, inv_freq, positions, cache, .. } => (cache, vec![kv, norm, inv_freq, positions]),
            Kernel::QAbsorb { q, q_lat, .. } => (q_lat, vec![q]),
            Kernel::Attention { q, q_lat, positions, cache, o_lat, sparse, .. } => (o_lat, [q, q_lat, positions, cache].into_iter().chain(sparse.map(|(s, _)| s)).collect()),
            Kernel::VUp { o_lat, o, .. } => (o, vec![o_lat]),
            // Two outputs (the cache, the queries in place): the queries are among the others.
            Kernel::IndexerPrepare { keys, queries, norm, bias, inv_freq, positions, cache, .. } => (cache, vec![keys, queries, norm, bias, inv_freq, positions]),
            Kernel::IndexerScores { queries, weights, positions, cache, scores, .. } => (scores, vec![queries, weights, positions, cache]),
            Kernel::IndexerTopK { scores, positions, selected, .. } => (selected, vec![scores, positions]),
        }
    }

    /// What the op is, for `DSRUN_PROFILE`: its kind, and for matmuls the weights' shape and
    /// format, in a step of `n` tokens.
    pub fn label(&self, n: usize) -> String {
        let kind = match self {
            Kernel::Embed { .. } => "Embed",
            Kernel::RmsNorm { .. } => "RmsNorm",
            Kernel::Matmul { .. } => "Matmul",
            Kernel::SiluMul { .. } => "SiluMul",
            Kernel::Router { .. } => "Router",
            Kernel::ExpertMatmul { .. } => "ExpertMatmul",
            Kernel::MoeCombine { .. } => "MoeCombine",
            Kernel::Argmax { .. } => "Argmax",
            Kernel::RopeQ { .. } => "RopeQ",
            Kernel::LatentStore { .. } => "LatentStore",
            Kernel::QAbsorb { .. } => "QAbsorb",
            Kernel::Attention { .. } => "Attention",
            Kernel::VUp { .. } => "VUp",
            Kernel::IndexerPrepare { .. } => "IndexerPrepare",
            Kernel::IndexerScores { .. } => "IndexerScores",
            Kernel::IndexerTopK { .. } => "IndexerTopK",
        };
        let shape = match self {
            Kernel::Matmul { w, .. } | Kernel::ExpertMatmul { w, .. } => {
                let m = &w.stack[0];
                format!(" {}x{} {:?}", m.rows, m.cols, m.dtype)
            }
            _ => String::new(),
        };
        format!("{kind}{shape} n={n}")
    }

    /// Refuses an op whose destination is also one of its inputs (the kernels read inputs while
    /// the destination is out of the list).
    pub fn check_aliasing(&self) -> Result<()> {
        let (dst, srcs) = self.buffers();
        let distinct = |a: &[usize]| a.iter().enumerate().all(|(i, x)| !a[..i].contains(x));
        let router_outputs_apart = match self {
            Kernel::Router { logits, bias, weights, .. } => distinct(&[Some(*logits), Some(*weights), *bias].into_iter().flatten().collect::<Vec<_>>()),
            Kernel::IndexerPrepare { .. } => distinct(&srcs),
            _ => true,
        };
        if srcs.contains(&dst) || !router_outputs_apart {
            return Err(Error::Invalid(format!("CPU backend: {self:?} writes a buffer it also reads")));
        }
        Ok(())
    }

    /// Runs the op over `buffers` for a step of `n` tokens, matmuls at `simd`'s level with
    /// `math`'s activations.
    pub fn run(&self, buffers: &mut [Vec<u32>], n: usize, simd: Simd, math: Math) {
        match self {
            Kernel::Router { .. } => return run_router(self, buffers, n),
            Kernel::IndexerPrepare { .. } => return run_indexer_prepare(self, buffers, n),
            _ => {}
        }
        let dst = self.dst();
        let mut out = std::mem::take(&mut buffers[dst]);
        self.compute(buffers, &mut out, n, simd, math);
        buffers[dst] = out;
    }

    fn compute(&self, b: &[Vec<u32>], out: &mut [u32], n: usize, simd: Simd, math: Math) {
        match self {
            Kernel::Embed { table, tokens, .. } => {
                let m = &table.stack[0];
                let out = f32s_mut(out);
                for (t, &token) in b[*tokens][..n].iter().enumerate() {
                    m.decode_row(token as usize, &mut out[t * m.cols..(t + 1) * m.cols]);
                }
            }
            Kernel::RmsNorm { dim, eps, x, weight, rows, .. } => {
                let r = rows_of(*rows, n);
                // Rows::Last reads the step's last row and writes row 0.
                let first = n - r;
                let (x, w, out) = (&f32s(&b[*x])[first * dim..n * dim], &f32s(&b[*weight])[..*dim], &mut f32s_mut(out)[..r * dim]);
                out.copy_from_slice(x);
                for_each_chunk(out, *dim, |_, row| math::rms_norm(row, w, *eps as f64));
            }
            Kernel::Matmul { w, x, rows, accumulate, .. } => {
                let m = &w.stack[0];
                let r = rows_of(*rows, n);
                matmul(simd, math, m, &f32s(&b[*x])[..r * m.cols], r, &mut f32s_mut(out)[..r * m.rows], *accumulate);
            }
            Kernel::SiluMul { width, up, .. } => {
                // A row a task: a prompt's rows over the pool (`exp` is most of it).
                let (len, up) = (n * width, f32s(&b[*up]));
                for_each_chunk(&mut f32s_mut(out)[..len], *width, |t, row| math::silu_mul(row, &up[t * width..(t + 1) * width]));
            }
            // Two outputs: `run` hands them to their own functions.
            Kernel::Router { .. } | Kernel::IndexerPrepare { .. } => unreachable!("run_router and run_indexer_prepare run these"),
            Kernel::IndexerScores { queries, weights, positions, cache, shape, .. } => {
                let cache = attention::Cache { words: &b[*cache], format: shape.cache };
                indexer::scores(f32s_mut(out), f32s(&b[*queries]), f32s(&b[*weights]), &b[*positions][..2 * n], &cache, shape, n)
            }
            Kernel::IndexerTopK { scores, positions, shape, .. } => indexer::top_k(out, f32s(&b[*scores]), &b[*positions][..2 * n], shape, n),
            Kernel::ExpertMatmul { w, x_div, k, x, ids, .. } => {
                let rows = w.stack[0].rows;
                let (x, ids, out) = (f32s(&b[*x]), &b[*ids][..n * k], &mut f32s_mut(out)[..n * k * rows]);
                if n == 1 {
                    expert_rows(simd, math, w, x, *x_div, ids, out);
                } else {
                    expert_blocks(simd, math, w, x, *x_div, ids, out);
                }
            }
            Kernel::MoeCombine { dim, k, expert_out, weights, shared, .. } => {
                let (eo, wt, h) = (f32s(&b[*expert_out]), f32s(&b[*weights]), f32s_mut(out));
                for t in 0..n {
                    let ht = &mut h[t * dim..(t + 1) * dim];
                    // A zero weight adds nothing, whatever its row holds (a slot another
                    // device computes, hybrid placement).
                    for i in (0..*k).filter(|i| wt[t * k + i] != 0.0) {
                        math::axpy(wt[t * k + i], &eo[(t * k + i) * dim..][..*dim], ht);
                    }
                    if let Some(s) = shared {
                        math::add_in_place(ht, &f32s(&b[*s])[t * dim..(t + 1) * dim]);
                    }
                }
            }
            Kernel::RopeQ { inv_freq, positions, mla, .. } => attention::rope_q(f32s_mut(out), inv_freq_of(b, *inv_freq, mla), &b[*positions][..2 * n], mla, n),
            Kernel::LatentStore { kv, norm, inv_freq, positions, mla, .. } => {
                attention::latent_store(out, f32s(&b[*kv]), &f32s(&b[*norm])[..mla.lora], inv_freq_of(b, *inv_freq, mla), &b[*positions][..2 * n], mla, n)
            }
            Kernel::QAbsorb { kv_b, q, mla, .. } => absorb::q_absorb(simd, f32s_mut(out), &kv_b.stack[0], f32s(&b[*q]), mla, n),
            Kernel::Attention { q, q_lat, positions, cache, mla, sparse, .. } => {
                let cache = attention::Cache { words: &b[*cache], format: mla.cache };
                let sparse = sparse.map(|(selected, topk)| (&b[selected][..], topk));
                attention::attention(simd, f32s_mut(out), f32s(&b[*q]), f32s(&b[*q_lat]), &b[*positions][..2 * n], &cache, mla, sparse, n)
            }
            Kernel::VUp { kv_b, o_lat, mla, .. } => absorb::v_up(simd, math, f32s_mut(out), &kv_b.stack[0], f32s(&b[*o_lat]), mla, n),
            Kernel::Argmax { vocab, logits, .. } => {
                let logits = f32s(&b[*logits]);
                for (r, id) in out[..n].iter_mut().enumerate() {
                    let row = &logits[r * vocab..(r + 1) * vocab];
                    *id = match row.iter().all(|x| x.is_finite()) {
                        true => math::argmax(row) as u32,
                        false => crate::model::NON_FINITE_ID,
                    };
                }
            }
        }
    }
}

/// The rotary inverse frequencies: one per rotated pair.
fn inv_freq_of<'b>(b: &'b [Vec<u32>], inv_freq: usize, s: &MlaShape) -> &'b [f32] {
    &f32s(&b[inv_freq])[..s.rope / 2]
}

/// `y = W x` for `n` rows of `x` (`[n, cols]` into `[n, rows]`), or `y += W x`. One token:
/// blocks of rows over the pool, each row a dot fused with its stored bytes. Several: tasks of
/// a panel of weight rows by a chunk of tokens ([`gemm`]).
fn matmul(simd: Simd, math: Math, m: &Matrix, x: &[f32], n: usize, y: &mut [f32], accumulate: bool) {
    let (rows, cols) = (m.rows, m.cols);
    if n == 1 {
        // The input laid out once, on this thread, for every task (out of the scratch while the
        // pool runs: this thread takes tasks too).
        let mut layouts = with_scratch(|s| std::mem::take(&mut s.layouts));
        let input = layouts.prepare(x, m, math);
        for_each_chunk(y, ROWS_PER_TASK, |task, dst| {
            with_scratch(|scratch| {
                let row = sized(&mut scratch.row, cols);
                if !accumulate {
                    return matmul::rows_at(simd, m, task * ROWS_PER_TASK, input, dst, row);
                }
                let mut sums = [0f32; ROWS_PER_TASK];
                let sums = &mut sums[..dst.len()];
                matmul::rows_at(simd, m, task * ROWS_PER_TASK, input, sums, row);
                math::add_in_place(dst, sums);
            })
        });
        with_scratch(|s| s.layouts = layouts);
        return;
    }
    let (mut slots, mut tokens16) = with_scratch(|s| (std::mem::take(&mut s.slots), std::mem::take(&mut s.tokens16)));
    slots.clear();
    slots.extend(0..n as u32);
    let x = &x[..n * cols];
    let tokens = Tokens::of(simd, math, x, &mut tokens16);
    let (chunks, panels) = (n.div_ceil(TOKEN_CHUNK), rows.div_ceil(PANEL_ROWS));
    let out = Disjoint::new(&mut y[..n * rows]);
    pool().run(chunks * panels, &|task| {
        let (chunk, first) = (task / panels, (task % panels) * PANEL_ROWS);
        let count = PANEL_ROWS.min(rows - first);
        tokens.block(simd, m, first, count, 1, &slots[chunk * TOKEN_CHUNK..n.min((chunk + 1) * TOKEN_CHUNK)], &out, accumulate);
    });
    with_scratch(|s| (s.slots, s.tokens16) = (slots, tokens16));
}

/// A multi-token matmul's tokens as its blocks read them: f32, or rounded to bf16 once for
/// bf16 dots (`--math fast` on a CPU that has them).
#[derive(Clone, Copy)]
enum Tokens<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl<'a> Tokens<'a> {
    /// `x` for `math` at `simd`; `rounded` holds the bf16 copy.
    fn of(simd: Simd, math: Math, x: &'a [f32], rounded: &'a mut Vec<u16>) -> Tokens<'a> {
        if !bf16::applies(simd, math) {
            return Tokens::F32(x);
        }
        bf16::round_into(x, rounded);
        Tokens::Bf16(rounded)
    }

    /// Rows `first..first + count` of `m` for `slots` (reading row `slot / x_div` of the
    /// tokens), on this thread with its scratch.
    #[allow(clippy::too_many_arguments)] // one block's whole description, as gemm::block_at's
    fn block(self, simd: Simd, m: &Matrix, first: usize, count: usize, x_div: usize, slots: &[u32], out: &Disjoint, accumulate: bool) {
        with_scratch(|scratch| match self {
            Tokens::F32(x) => gemm::block_at(simd, m, first, count, Slots { x, x_div, slots }, out, accumulate, sized(&mut scratch.panel, count * m.cols)),
            Tokens::Bf16(x) => {
                let decode = |r: usize, row: &mut [f32]| gemm::decode_panel_at(simd, m, r, 1, row);
                let panel = bf16::panel(m, first, count, &decode, &mut scratch.panel, &mut scratch.panel16);
                bf16::block(simd, panel, count, Slots { x, x_div, slots }, out, m.rows, first, accumulate)
            }
        })
    }
}

/// One token's experts: each (token, choice) slot's rows from its expert, fused dots. The input
/// is laid out once where every slot reads the token's row (gate and up), else by the task
/// that computes the slot (down: each slot its own row).
fn expert_rows(simd: Simd, math: Math, w: &CpuMatrix, x: &[f32], x_div: usize, ids: &[u32], out: &mut [f32]) {
    let (rows, cols) = (w.stack[0].rows, w.stack[0].cols);
    if x_div >= ids.len() {
        // Every expert of the stack shares a format and shape: one layout serves them all.
        let mut layouts = with_scratch(|s| std::mem::take(&mut s.layouts));
        let input = layouts.prepare(&x[..cols], &w.stack[0], math);
        for_each_chunk(out, rows, |s, y| match w.stack.get(ids[s] as usize) {
            Some(m) => with_scratch(|scratch| matmul::rows_at(simd, m, 0, input, y, sized(&mut scratch.row, cols))),
            None => y.fill(0.0),
        });
        with_scratch(|s| s.layouts = layouts);
        return;
    }
    for_each_chunk(out, rows, |s, y| {
        let Some(m) = w.stack.get(ids[s] as usize) else {
            return y.fill(0.0);
        };
        let xs = &x[(s / x_div) * cols..][..cols];
        with_scratch(|scratch| {
            let row = sized(&mut scratch.row, cols);
            matmul::rows_at(simd, m, 0, scratch.layouts.prepare(xs, m, math), y, row)
        });
    });
}

/// Several tokens' experts, grouped by expert: the slots that chose each expert are gathered
/// (a counting sort of `ids`), and each expert's weights are decoded once per panel for all
/// of them ([`gemm`]), not once per slot.
fn expert_blocks(simd: Simd, math: Math, w: &CpuMatrix, x: &[f32], x_div: usize, ids: &[u32], out: &mut [f32]) {
    let (experts, rows, cols) = (w.stack.len(), w.stack[0].rows, w.stack[0].cols);
    let (mut order, mut starts, mut tokens16) = with_scratch(|s| (std::mem::take(&mut s.slots), std::mem::take(&mut s.starts), std::mem::take(&mut s.tokens16)));
    // starts[e]..starts[e + 1]: expert e's slots in `order`.
    starts.clear();
    starts.resize(experts + 1, 0);
    // A slot another device computes (`NOT_HERE`) is in no expert's group: its row is zeros.
    for (s, &e) in ids.iter().enumerate() {
        match starts.get_mut(e as usize + 1) {
            Some(count) => *count += 1,
            None => out[s * rows..(s + 1) * rows].fill(0.0),
        }
    }
    for e in 0..experts {
        starts[e + 1] += starts[e];
    }
    order.clear();
    order.resize(starts[experts] as usize, 0);
    for (s, &e) in ids.iter().enumerate().filter(|&(_, &e)| (e as usize) < experts) {
        order[starts[e as usize] as usize] = s as u32;
        starts[e as usize] += 1;
    }
    // Each start was advanced to the next expert's: shift them back.
    for e in (1..=experts).rev() {
        starts[e] = starts[e - 1];
    }
    starts[0] = 0;
    let x = &x[..ids.len().div_ceil(x_div) * cols];
    let tokens = Tokens::of(simd, math, x, &mut tokens16);
    let panels = rows.div_ceil(PANEL_ROWS);
    let out = Disjoint::new(out);
    pool().run(experts * panels, &|task| {
        let (e, first) = (task / panels, (task % panels) * PANEL_ROWS);
        let slots = &order[starts[e] as usize..starts[e + 1] as usize];
        if slots.is_empty() {
            return;
        }
        tokens.block(simd, &w.stack[e], first, PANEL_ROWS.min(rows - first), x_div, slots, &out, false);
    });
    with_scratch(|s| (s.slots, s.starts, s.tokens16) = (order, starts, tokens16));
}

/// The router: expert ids (into `ids`) and weights (into `weights`) per token, by the CPU
/// reference's rule.
fn run_router(kernel: &Kernel, buffers: &mut [Vec<u32>], n: usize) {
    let Kernel::Router { params, experts, logits, bias, ids, weights, rows } = kernel else { unreachable!("run_router takes a Router") };
    let r = rows_of(*rows, n);
    let k = params.top_k;
    let (mut id_out, mut weight_out) = (std::mem::take(&mut buffers[*ids]), std::mem::take(&mut buffers[*weights]));
    {
        let logits = f32s(&buffers[*logits]);
        let bias = bias.map(|b| &f32s(&buffers[b])[..*experts]);
        let weight_out = f32s_mut(&mut weight_out);
        for t in 0..r {
            router::route(&logits[t * experts..(t + 1) * experts], bias, params, &mut id_out[t * k..(t + 1) * k], &mut weight_out[t * k..(t + 1) * k]);
        }
    }
    buffers[*ids] = id_out;
    buffers[*weights] = weight_out;
}

/// The indexer's keys into its cache, its queries rotated in place.
fn run_indexer_prepare(kernel: &Kernel, buffers: &mut [Vec<u32>], n: usize) {
    let Kernel::IndexerPrepare { keys, queries, norm, bias, inv_freq, positions, cache, shape } = kernel else { unreachable!("run_indexer_prepare takes IndexerPrepare") };
    let (mut cache_out, mut query_out) = (std::mem::take(&mut buffers[*cache]), std::mem::take(&mut buffers[*queries]));
    indexer::prepare(
        &mut cache_out,
        f32s_mut(&mut query_out),
        f32s(&buffers[*keys]),
        &f32s(&buffers[*norm])[..shape.dim],
        &f32s(&buffers[*bias])[..shape.dim],
        f32s(&buffers[*inv_freq]),
        &buffers[*positions][..2 * n],
        shape,
        n,
    );
    buffers[*cache] = cache_out;
    buffers[*queries] = query_out;
}
