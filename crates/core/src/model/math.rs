//! Plain f32 reference ops, multi-threaded with rayon where the work is large (matmuls).
//! Clarity first: these are the oracle for the GPU kernels.

use crate::model::weights::Matrix;
use rayon::prelude::*;

/// Output rows of a matmul handled by one task: decoded together so each token's activations
/// are read once per block rather than once per row.
const ROWS_PER_TASK: usize = 16;

/// `y[t, r] = Σ_c W[r, c] · x[t, c]` for `n` tokens: `x` is `[n, W.cols]`, the result `[n, W.rows]`.
pub fn matmul(w: &Matrix, x: &[f32], n: usize) -> Vec<f32> {
    let (rows, cols) = (w.rows, w.cols);
    assert_eq!(x.len(), n * cols, "matmul `{}`: activation length", w.name);
    // Computed row-major by weight row ([rows, n]) so tasks write disjoint slices; transposed after.
    let mut by_row = vec![0.0f32; rows * n];
    by_row.par_chunks_mut(ROWS_PER_TASK * n).enumerate().for_each(|(task, dst)| {
        let first = task * ROWS_PER_TASK;
        let count = dst.len() / n;
        let mut decoded = vec![0.0f32; count * cols];
        for (i, row) in decoded.chunks_mut(cols).enumerate() {
            w.decode_row(first + i, row);
        }
        for t in 0..n {
            let xt = &x[t * cols..(t + 1) * cols];
            for (i, row) in decoded.chunks(cols).enumerate() {
                dst[i * n + t] = dot(row, xt);
            }
        }
    });
    if n == 1 {
        return by_row;
    }
    let mut out = vec![0.0f32; n * rows];
    for r in 0..rows {
        for t in 0..n {
            out[t * rows + r] = by_row[r * n + t];
        }
    }
    out
}

/// Dot product with eight independent accumulators (vectorises; sums in a fixed order).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a8.zip(b8) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `y += a · x`
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// RMSNorm of every `weight.len()`-wide row of `x`, in place: `w ⊙ x / sqrt(mean(x²) + eps)`.
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f64) {
    for row in x.chunks_mut(weight.len()) {
        let mean_square = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / row.len() as f64;
        let inv = (1.0 / (mean_square + eps).sqrt()) as f32;
        for (v, w) in row.iter_mut().zip(weight) {
            *v = w * (*v * inv);
        }
    }
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    x.iter_mut().for_each(|v| *v /= sum);
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `gate[i] = silu(gate[i]) · up[i]`
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

pub fn add_in_place(acc: &mut [f32], x: &[f32]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}

/// Rows of an embedding table for each token (ids already checked against the vocabulary).
pub fn embed(table: &Matrix, tokens: &[u32]) -> Vec<f32> {
    let mut out = vec![0.0f32; tokens.len() * table.cols];
    for (row, &t) in out.chunks_mut(table.cols).zip(tokens) {
        table.decode_row(t as usize, row);
    }
    out
}

/// Index of the largest value (the first one on ties).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// LayerNorm with weight and bias (biased variance), as `nn.LayerNorm`.
pub fn layer_norm(x: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, w), b) in x.iter_mut().zip(weight).zip(bias) {
        *v = (*v - mean) * inv * w + b;
    }
}

/// RoPE in transformers' half-split layout (`rotate_half`): value j pairs with j + d/2, both
/// at pair j's angle.
pub fn rotate_half_split(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    for j in 0..half {
        let (a, b) = (x[j], x[j + half]);
        x[j] = a * cos[j] - b * sin[j];
        x[j + half] = b * cos[j] + a * sin[j];
    }
}
