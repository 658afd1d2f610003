//! MLA on the CPU backend, as the plan's attention ops state it: the query's RoPE, the latent
//! store (norm and RoPE of the step's latents into the cache, in the cache's format), the
//! absorbed query, causal attention over each sequence's cached latents (or V3.2's selected
//! positions), and the value projection. Each token's position and its sequence's first cache
//! row come from the `positions` buffer, (position, first row) per token.

use super::gemm::micro;
use super::pool::{for_each_chunk, pool};
use super::scratch::{sized, with_scratch, Scratch};
use super::vector::{dispatch, AtLevel, Simd, Vector, LANES};
use crate::model::math;
use crate::plan::layout::{CacheFormat, MlaShape, LATENT_NORM_EPS};
use half::slice::HalfFloatSliceExt;

/// The latent cache's values as words in `format` (16-bit formats hold value i in the low
/// half of word i / 2 when i is even, the high half when odd).
pub struct Cache<'a> {
    pub words: &'a [u32],
    pub format: CacheFormat,
}

impl Cache<'_> {
    /// Cache row `r` (`out.len()` values wide, an even count) as f32.
    pub fn row(&self, r: usize, out: &mut [f32]) {
        self.values(r * out.len(), out)
    }

    /// `out.len()` values from value `start` (both even) as f32, f16 widened by the level's
    /// vector (through `half`, a call per eight values, it was 6% of a decode step at depth
    /// 4000).
    ///
    /// # Safety
    /// The CPU runs `V`'s level.
    #[inline(always)]
    unsafe fn values_at<V: Vector>(&self, start: usize, out: &mut [f32]) {
        if self.format != CacheFormat::F16 {
            return self.values(start, out);
        }
        let halves: &[u16] = &bytemuck::cast_slice::<u32, u16>(&self.words[start / 2..(start + out.len()).div_ceil(2)])[..out.len()];
        let full = out.len() / LANES * LANES;
        for k in (0..full).step_by(LANES) {
            // SAFETY: the level is the caller's contract; `k + LANES <= full` inside both.
            unsafe { V::load_f16(halves.as_ptr().add(k)).store(out.as_mut_ptr().add(k)) };
        }
        for (o, &h) in out[full..].iter_mut().zip(&halves[full..]) {
            *o = half::f16::from_bits(h).to_f32();
        }
    }

    /// `out.len()` values from value `start` (both even) as f32: contiguous rows in one call.
    fn values(&self, start: usize, out: &mut [f32]) {
        let len = out.len();
        match self.format {
            CacheFormat::F32 => out.copy_from_slice(bytemuck::cast_slice(&self.words[start..start + len])),
            // Two values a word, the even one in the low half: on a little-endian host, the
            // words' bytes are the values in order.
            CacheFormat::F16 | CacheFormat::Bf16 => {
                let halves: &[u16] = bytemuck::cast_slice(&self.words[start / 2..(start + len) / 2]);
                match self.format {
                    // half's slice conversion uses F16C where the CPU has it.
                    CacheFormat::F16 => half::slice::HalfBitsSliceExt::reinterpret_cast::<half::f16>(halves).convert_to_f32_slice(out),
                    _ => out.iter_mut().zip(halves).for_each(|(o, &h)| *o = f32::from_bits((h as u32) << 16)),
                }
            }
        }
    }
}

/// Stores `x` as value `i` of a cache in `format`.
pub fn put(words: &mut [u32], format: CacheFormat, i: usize, x: f32) {
    let bits = match format {
        CacheFormat::F32 => {
            words[i] = x.to_bits();
            return;
        }
        CacheFormat::F16 => half::f16::from_f32(x).to_bits(),
        CacheFormat::Bf16 => half::bf16::from_f32(x).to_bits(),
    };
    let (word, shift) = (&mut words[i >> 1], 16 * (i & 1));
    *word = (*word & !(0xffff << shift)) | ((bits as u32) << shift);
}

/// cos and sin of each rotary pair at `position`, scaled as the model's `Rope::angles`.
pub fn angles(inv_freq: &[f32], position: u32, scale: f32) -> (Vec<f32>, Vec<f32>) {
    inv_freq
        .iter()
        .map(|&f| {
            let angle = position as f32 * f;
            (angle.cos() * scale, angle.sin() * scale)
        })
        .unzip()
}

/// RoPE of interleaved pairs at `position` (`Rope::apply` with `angles`, computed in place).
fn rotate(x: &mut [f32], inv_freq: &[f32], position: u32, scale: f32) {
    for (pair, &f) in x.chunks_exact_mut(2).zip(inv_freq) {
        let angle = position as f32 * f;
        let (c, s) = (angle.cos() * scale, angle.sin() * scale);
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * c - b * s;
        pair[1] = a * s + b * c;
    }
}

/// RoPE of each head's last `rope` query values at its token's position, in place.
pub fn rope_q(q: &mut [f32], inv_freq: &[f32], positions: &[u32], s: &MlaShape, n: usize) {
    let qk = s.nope + s.rope;
    for_each_chunk(&mut q[..n * s.heads * qk], s.heads * qk, |t, token| {
        for head in token.chunks_mut(qk) {
            rotate(&mut head[s.nope..], inv_freq, positions[2 * t], s.rope_scale);
        }
    });
}

/// The step's latents (`kv`, `[n, lora + rope]`) normed and rotated into the cache at each
/// token's row.
pub fn latent_store(cache: &mut [u32], kv: &[f32], norm: &[f32], inv_freq: &[f32], positions: &[u32], s: &MlaShape, n: usize) {
    let latent = s.lora + s.rope;
    with_scratch(|scratch| {
        let row = sized(&mut scratch.row, latent);
        for t in 0..n {
            row.copy_from_slice(&kv[t * latent..(t + 1) * latent]);
            math::rms_norm(&mut row[..s.lora], norm, LATENT_NORM_EPS);
            let (position, first_row) = (positions[2 * t], positions[2 * t + 1]);
            rotate(&mut row[s.lora..], inv_freq, position, s.rope_scale);
            let base = (first_row + position) as usize * latent;
            for (i, &x) in row.iter().enumerate() {
                put(cache, s.cache, base + i, x);
            }
        }
    })
}

/// Positions a block of the attention kernel decodes and scores at a time.
const BLOCK: usize = 16;

/// Causal attention of each head's absorbed query (`q_lat`, and `q`'s rotary part) over its
/// sequence's cached latents up to its position, or only over `sparse`'s selected positions
/// (`[n, topk]`, ascending; the first min(topk, position + 1) are the token's).
///
/// Work is split into units of (token, share of its positions), enough of them to keep every
/// thread busy in a one-token step. A unit reads each cached latent once for all the heads
/// (the scores by the micro-kernel, the softmax online, flash-attention style) into a partial
/// result: per head the weighted latents, the running maximum and the sum. The token's units
/// are then merged into its output.
#[allow(clippy::too_many_arguments)]
pub fn attention(simd: Simd, o_lat: &mut [f32], q: &[f32], q_lat: &[f32], positions: &[u32], cache: &Cache, s: &MlaShape, sparse: Option<(&[u32], usize)>, n: usize) {
    let part_len = s.heads * (s.lora + 2);
    let threads = pool().threads();
    let shares = if n >= threads { 1 } else { threads.div_ceil(n) };
    let mut parts = with_scratch(|scratch| std::mem::take(&mut scratch.parts));
    let parts_all = sized(&mut parts, n * shares * part_len);
    for_each_chunk(parts_all, part_len, |unit, part| {
        let (t, share) = (unit / shares, unit % shares);
        let position = positions[2 * t] as usize;
        let seen = match sparse {
            Some((selected, topk)) => Seen { count: topk.min(position + 1), selected: Some(&selected[t * topk..]) },
            None => Seen { count: position + 1, selected: None },
        };
        let (lo, hi) = (seen.count * share / shares, seen.count * (share + 1) / shares);
        let query = Query { q_lat: &q_lat[t * s.heads * s.lora..][..s.heads * s.lora], q: &q[t * s.heads * (s.nope + s.rope)..][..s.heads * (s.nope + s.rope)] };
        with_scratch(|scratch| dispatch(simd, Unit { part, query, cache, first_row: positions[2 * t + 1] as usize, seen, range: (lo, hi), s, scratch }));
    });
    let parts_all = &parts_all[..];
    for_each_chunk(&mut o_lat[..n * s.heads * s.lora], s.heads * s.lora, |t, out| {
        merge(out, &parts_all[t * shares * part_len..(t + 1) * shares * part_len], s);
    });
    with_scratch(|scratch| scratch.parts = parts);
}

/// The positions a token sees: its selected ones, or every one up to its own.
#[derive(Clone, Copy)]
struct Seen<'a> {
    count: usize,
    selected: Option<&'a [u32]>,
}

impl Seen<'_> {
    fn at(&self, i: usize) -> usize {
        self.selected.map_or(i, |s| s[i] as usize)
    }
}

/// A token's queries: `[heads, lora]` absorbed, and `[heads, nope + rope]` whose rotary tail
/// scores against the cached rotary keys.
#[derive(Clone, Copy)]
struct Query<'a> {
    q_lat: &'a [f32],
    q: &'a [f32],
}

/// One unit of [`attention`]: positions `range` of what the token sees, into `part`
/// (`[heads, lora]` weighted latents, then `[heads]` maxima, then `[heads]` sums).
struct Unit<'a> {
    part: &'a mut [f32],
    query: Query<'a>,
    cache: &'a Cache<'a>,
    first_row: usize,
    seen: Seen<'a>,
    range: (usize, usize),
    s: &'a MlaShape,
    scratch: &'a mut Scratch,
}

impl AtLevel for Unit<'_> {
    type Output = ();
    #[inline(always)]
    unsafe fn run<V: Vector>(self) {
        let Unit { part, query, cache, first_row, seen, range, s, scratch } = self;
        let (heads, lora, latent) = (s.heads, s.lora, s.lora + s.rope);
        let (acc, stats) = part.split_at_mut(heads * lora);
        let (maxima, sums) = stats.split_at_mut(heads);
        acc.fill(0.0);
        maxima.fill(f32::NEG_INFINITY);
        sums.fill(0.0);
        // Each head's query as one row of `latent` values, to score against cached rows.
        let queries = sized(&mut scratch.row, heads * latent);
        for (h, row) in queries.chunks_exact_mut(latent).enumerate() {
            row[..lora].copy_from_slice(&query.q_lat[h * lora..(h + 1) * lora]);
            row[lora..].copy_from_slice(&query.q[h * (s.nope + s.rope) + s.nope..][..s.rope]);
        }
        let rows = sized(&mut scratch.rows, BLOCK * latent);
        let scores = sized(&mut scratch.scores, heads * BLOCK);
        for start in (range.0..range.1).step_by(BLOCK) {
            let b = BLOCK.min(range.1 - start);
            if seen.selected.is_none() {
                // The block's rows are consecutive in the cache: converted in one pass.
                // SAFETY: the caller's contract.
                unsafe { cache.values_at::<V>((first_row + start) * latent, &mut rows[..b * latent]) };
            } else {
                for (i, row) in rows.chunks_exact_mut(latent).take(b).enumerate() {
                    cache.row(first_row + seen.at(start + i), row);
                }
            }
            // SAFETY: the caller's contract.
            unsafe { score_block::<V>(scores, queries, rows, heads, b, latent, s.scale) };
            for h in 0..heads {
                let scores = &mut scores[h * BLOCK..h * BLOCK + b];
                let top = scores.iter().fold(maxima[h], |m, &x| m.max(x));
                // Past the first blocks the maximum rarely moves: no libm call then.
                let rescale = if top == maxima[h] { 1.0 } else { (maxima[h] - top).exp() };
                let acc = &mut acc[h * lora..(h + 1) * lora];
                if rescale != 1.0 {
                    acc.iter_mut().for_each(|a| *a *= rescale);
                }
                maxima[h] = top;
                let mut shifted = [f32::NEG_INFINITY; BLOCK];
                shifted[..b].iter_mut().zip(scores.iter()).for_each(|(e, &x)| *e = x - top);
                let weights = exp_block(shifted);
                sums[h] = sums[h] * rescale + weights[..b].iter().sum::<f32>();
                // SAFETY: the caller's contract.
                unsafe { weighted_sum::<V>(acc, &weights[..b], rows, latent) };
            }
        }
    }
}

/// `e^x` of a block's shifted scores (all ≤ 0; -inf for the unused lanes, giving 0), a
/// polynomial computed lane by lane so the level's vectors take the whole block (libm's `expf`
/// a score at a time cost ~20% of a decode step at depth 4000). Cephes' `expf`: `x = n ln 2 +
/// r`, `e^r` by a degree-6 polynomial, within 2 ulp of the exact value; below -87.34 the
/// result is 0 (the exact one is under f32's smallest normal). A plain loop with `n` rounded
/// by adding and taking away 1.5 * 2^23: an array `map` closure and `f32::round` (a libm call
/// on baseline x86-64) kept it out of the caller's vectors (7% and 2% of a decode at depth).
#[inline(always)]
fn exp_block(x: [f32; BLOCK]) -> [f32; BLOCK] {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // ln of f32's smallest normal: below it the result is 0.
    const LOWEST: f32 = -87.336_54;
    const ROUND: f32 = 12_582_912.0;
    let mut out = [0f32; BLOCK];
    for (out, &x) in out.iter_mut().zip(&x) {
        let clamped = x.max(LOWEST);
        let n = (clamped * LOG2E + ROUND) - ROUND;
        let r = clamped - n * LN2_HI - n * LN2_LO;
        let mut p = 1.987_569_1e-4f32;
        p = p * r + 1.398_199_9e-3;
        p = p * r + 8.333_452e-3;
        p = p * r + 4.166_579_6e-2;
        p = p * r + 0.166_666_65;
        p = p * r + 0.5;
        let e = p * r * r + r + 1.0;
        let scaled = e * f32::from_bits(((n as i32 + 127) as u32) << 23);
        *out = if x < LOWEST { 0.0 } else { scaled };
    }
    out
}

/// `acc += Σ_i weights_i rows_i[..acc.len()]`, eight vectors of `acc` at a time in registers
/// (then one), each loaded and stored once per block: eight independent chains of
/// multiply-adds, where one vector at a time waited on each FMA's latency, row after row.
///
/// # Safety
/// The CPU runs `V`'s level.
#[inline(always)]
unsafe fn weighted_sum<V: Vector>(acc: &mut [f32], weights: &[f32], rows: &[f32], latent: usize) {
    let width = acc.len();
    assert!(width <= latent && rows.len() >= weights.len() * latent, "rows of the latent's width");
    let full = width / LANES * LANES;
    let mut c = 0;
    // SAFETY (both loops): the level is the caller's contract; vectors at `c + K * LANES <=
    // full <= width`, inside `acc` and inside each row (asserted).
    while c + 8 * LANES <= full {
        unsafe { weighted_vectors::<V, 8>(acc, c, weights, rows, latent) };
        c += 8 * LANES;
    }
    while c < full {
        unsafe { weighted_vectors::<V, 1>(acc, c, weights, rows, latent) };
        c += LANES;
    }
    for c in full..width {
        acc[c] += weights.iter().enumerate().map(|(i, &w)| w * rows[i * latent + c]).sum::<f32>();
    }
}

/// `K` vectors of [`weighted_sum`] from value `c`.
///
/// # Safety
/// The CPU runs `V`'s level; `c + K * LANES` values lie inside `acc` and each row.
#[inline(always)]
unsafe fn weighted_vectors<V: Vector, const K: usize>(acc: &mut [f32], c: usize, weights: &[f32], rows: &[f32], latent: usize) {
    // SAFETY: the caller's contract.
    unsafe {
        let mut sums = [V::zero(); K];
        for (k, sum) in sums.iter_mut().enumerate() {
            *sum = V::load(acc.as_ptr().add(c + k * LANES));
        }
        for (i, &w) in weights.iter().enumerate() {
            let (w, row) = (V::splat(w), rows.as_ptr().add(i * latent + c));
            for (k, sum) in sums.iter_mut().enumerate() {
                *sum = V::mul_add(w, V::load(row.add(k * LANES)), *sum);
            }
        }
        for (k, sum) in sums.iter().enumerate() {
            sum.store(acc.as_mut_ptr().add(c + k * LANES));
        }
    }
}

/// `scores[h, i] = (query_h · row_i) * scale` for `b` rows, by the matmul's micro-kernel.
///
/// # Safety
/// The CPU runs `V`'s level.
#[inline(always)]
unsafe fn score_block<V: Vector>(scores: &mut [f32], queries: &[f32], rows: &[f32], heads: usize, b: usize, latent: usize, scale: f32) {
    // Row i of m, the last one for rows past it (computed, not stored).
    fn row(m: &[f32], i: usize, last: usize, latent: usize) -> &[f32] {
        &m[i.min(last) * latent..(i.min(last) + 1) * latent]
    }
    for h in (0..heads).step_by(4) {
        for i in (0..b).step_by(4) {
            let q: [&[f32]; 4] = std::array::from_fn(|k| row(queries, h + k, heads - 1, latent));
            let r: [&[f32]; 4] = std::array::from_fn(|k| row(rows, i + k, b - 1, latent));
            // SAFETY: the caller's contract.
            let dots = unsafe { micro::<V, 4, 4>(q, r) };
            for (k, dots) in dots.iter().enumerate().take(heads - h) {
                for (j, &d) in dots.iter().enumerate().take(b - i) {
                    scores[(h + k) * BLOCK + i + j] = d * scale;
                }
            }
        }
    }
}

/// A token's output from its units' partial results: each head's weighted latents rescaled to
/// the overall maximum and divided by the overall sum.
fn merge(out: &mut [f32], parts: &[f32], s: &MlaShape) {
    let (heads, lora) = (s.heads, s.lora);
    let part_len = heads * (lora + 2);
    for (h, out) in out.chunks_exact_mut(lora).enumerate() {
        let stat = |p: &[f32], k: usize| p[heads * lora + k * heads + h];
        let top = parts.chunks_exact(part_len).map(|p| stat(p, 0)).fold(f32::NEG_INFINITY, f32::max);
        out.fill(0.0);
        let mut sum = 0.0;
        for p in parts.chunks_exact(part_len) {
            if stat(p, 1) == 0.0 {
                continue; // a unit with no positions
            }
            let weight = (stat(p, 0) - top).exp();
            sum += stat(p, 1) * weight;
            math::axpy(weight, &p[h * lora..(h + 1) * lora], out);
        }
        out.iter_mut().for_each(|o| *o /= sum);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The polynomial `exp` against libm's over the softmax's range (shifted scores, ≤ 0), and
    /// 0 for -inf: within 4e-7 relative (2 ulp at f32's 1.2e-7 per ulp, doubled for libm's own).
    #[test]
    fn exp_block_matches_libm() {
        let mut worst = 0f32;
        for i in 0..200_000 {
            let x = -90.0 * i as f32 / 200_000.0;
            let mut block = [f32::NEG_INFINITY; BLOCK];
            block[i % BLOCK] = x;
            let got = exp_block(block);
            assert_eq!(got[(i + 1) % BLOCK], 0.0, "-inf gives 0");
            let want = x.exp();
            if want > f32::MIN_POSITIVE {
                worst = worst.max((got[i % BLOCK] - want).abs() / want);
            }
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
    }
}
