//! MLA on the CPU backend, as the plan's attention ops state it: the query's RoPE, the latent
//! store (norm and RoPE of the step's latents into the cache, in the cache's format), the
//! absorbed query, causal attention over each sequence's cached latents (or V3.2's selected
//! positions), and the value projection. Each token's position and its sequence's first cache
//! row come from the `positions` buffer, (position, first row) per token.

use super::scratch::{sized, with_scratch};
use crate::model::math;
use crate::model::weights::Matrix;
use crate::plan::layout::{CacheFormat, MlaShape, LATENT_NORM_EPS};
use rayon::prelude::*;

/// The latent cache's values as words in `format` (16-bit formats hold value i in the low
/// half of word i / 2 when i is even, the high half when odd).
pub struct Cache<'a> {
    pub words: &'a [u32],
    pub format: CacheFormat,
}

impl Cache<'_> {
    pub fn get(&self, i: usize) -> f32 {
        let half = |i: usize| (self.words[i >> 1] >> (16 * (i & 1))) as u16;
        match self.format {
            CacheFormat::F32 => f32::from_bits(self.words[i]),
            CacheFormat::F16 => half::f16::from_bits(half(i)).to_f32(),
            CacheFormat::Bf16 => half::bf16::from_bits(half(i)).to_f32(),
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
    q[..n * s.heads * qk].par_chunks_mut(s.heads * qk).zip(positions.par_chunks(2)).for_each(|(token, pos)| {
        for head in token.chunks_mut(qk) {
            rotate(&mut head[s.nope..], inv_freq, pos[0], s.rope_scale);
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

/// kv_b's row `d` of head `h`'s keys (`d < nope`) or values (`nope + d`), decoded into `row`.
fn head_row<'r>(kv_b: &Matrix, s: &MlaShape, h: usize, d: usize, row: &'r mut Vec<f32>) -> &'r [f32] {
    let row = sized(row, s.lora);
    kv_b.decode_row(h * (s.nope + s.v) + d, row);
    row
}

/// `q_lat[t, h] = W_UK[h]ᵀ q_nope[t, h]` (kv_b's key rows decoded as they are used).
pub fn q_absorb(q_lat: &mut [f32], kv_b: &Matrix, q: &[f32], s: &MlaShape, n: usize) {
    let qk = s.nope + s.rope;
    q_lat[..n * s.heads * s.lora].par_chunks_mut(s.lora).enumerate().for_each(|(th, out)| {
        let h = th % s.heads;
        out.fill(0.0);
        let q_nope = &q[th * qk..][..s.nope];
        with_scratch(|scratch| {
            for (d, &qd) in q_nope.iter().enumerate() {
                math::axpy(qd, head_row(kv_b, s, h, d, &mut scratch.row), out);
            }
        })
    });
}

/// `o[t, h] = W_UV[h] o_lat[t, h]` (kv_b's value rows decoded as they are used).
pub fn v_up(o: &mut [f32], kv_b: &Matrix, o_lat: &[f32], s: &MlaShape, n: usize) {
    o[..n * s.heads * s.v].par_chunks_mut(s.v).enumerate().for_each(|(th, out)| {
        let h = th % s.heads;
        let latent = &o_lat[th * s.lora..(th + 1) * s.lora];
        with_scratch(|scratch| {
            for (d, y) in out.iter_mut().enumerate() {
                *y = math::dot(head_row(kv_b, s, h, s.nope + d, &mut scratch.row), latent);
            }
        })
    });
}

/// Causal attention of each head's absorbed query (`q_lat`, and `q`'s rotary part) over its
/// sequence's cached latents up to its position, or only over `sparse`'s selected positions
/// (`[n, topk]`, ascending; the first min(topk, position + 1) are the token's).
#[allow(clippy::too_many_arguments)]
pub fn attention(o_lat: &mut [f32], q: &[f32], q_lat: &[f32], positions: &[u32], cache: &Cache, s: &MlaShape, sparse: Option<(&[u32], usize)>, n: usize) {
    let (qk, latent) = (s.nope + s.rope, s.lora + s.rope);
    o_lat[..n * s.heads * s.lora].par_chunks_mut(s.lora).enumerate().for_each(|(th, out)| {
        let t = th / s.heads;
        let (position, first_row) = (positions[2 * t] as usize, positions[2 * t + 1] as usize);
        // The positions the token sees: its selected ones, or every one up to its own.
        let (count, seen) = match sparse {
            Some((selected, topk)) => (topk.min(position + 1), Some(&selected[t * topk..])),
            None => (position + 1, None),
        };
        let at = |i: usize| seen.map_or(i, |s| s[i] as usize);
        let (q_lat, q_pe) = (&q_lat[th * s.lora..(th + 1) * s.lora], &q[th * qk + s.nope..][..s.rope]);
        with_scratch(|scratch| {
            let rows = sized(&mut scratch.rows, count * latent);
            let scores = sized(&mut scratch.scores, count);
            for (i, (row, score)) in rows.chunks_mut(latent).zip(scores.iter_mut()).enumerate() {
                let base = (first_row + at(i)) * latent;
                row.iter_mut().enumerate().for_each(|(c, v)| *v = cache.get(base + c));
                *score = (math::dot(q_lat, &row[..s.lora]) + math::dot(q_pe, &row[s.lora..])) * s.scale;
            }
            math::softmax(scores);
            out.fill(0.0);
            for (p, cached) in scores.iter().zip(rows.chunks(latent)) {
                math::axpy(*p, &cached[..s.lora], out);
            }
        })
    });
}
