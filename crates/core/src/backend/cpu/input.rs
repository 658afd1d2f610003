//! One token's activations laid out for the mat-vec kernels (`matmul`): prepared once per
//! matmul by the thread that starts it (or once per expert slot), then read by every row.
//!
//! - bf16 weights: `x` with each 32 values stored evens then odds, so a 32-bit word of two
//!   bf16 weights widens with a mask and a shift and meets its inputs lane by lane. Exact.
//! - `--math fast` with q8 or q4 weights: `x` quantised to int8 per group of 32 (scale
//!   max |x| / 127, rounded to nearest, as llama.cpp's Q8_0 activations), so a row's dot is
//!   integer multiply-adds of bytes with one f32 scale per group. Not exact: held to quality
//!   floors (tests/cpu_backend.rs).
//! - `--math fast` with bf16 weights on a CPU with AVX512-BF16: `x` rounded to bf16 for
//!   [`super::bf16::rows`] (the pairs layout too, for a level without the dots).

use super::vector::LANES;
use crate::model::weights::Matrix;
use crate::plan::budget::Math;
use crate::quant::DType;
pub use crate::quant::GROUP;

/// One token's input to a matmul, as given and in the layouts its weights' kernel reads.
#[derive(Clone, Copy)]
pub struct Input<'a> {
    pub x: &'a [f32],
    /// bf16 weights: `x`, each full 32 values evens then odds (the rest as given).
    pub pairs: Option<&'a [f32]>,
    /// `--math fast`, q8 and q4 weights of whole groups.
    pub int8: Option<Int8<'a>>,
    /// `--math fast`, bf16 weights, where the CPU has bf16 dots: `x` rounded to bf16.
    pub bf16: Option<&'a [u16]>,
}

impl<'a> Input<'a> {
    /// `x` alone: every kernel takes it.
    pub fn plain(x: &'a [f32]) -> Input<'a> {
        Input { x, pairs: None, int8: None, bf16: None }
    }
}

/// Int8 activations.
#[derive(Clone, Copy)]
pub struct Int8<'a> {
    /// Per group of 32, `round(x / scale)`; for q4 weights each group stored evens then odds
    /// (the order its nibbles unpack in).
    pub codes: &'a [i8],
    /// Per 64 values, 16 lanes: the first group's scale in lanes 0..8, the second's in 8..16,
    /// as the int8 dot's lanes sum them ([`super::vector::Vector::dot_i8`]).
    pub lane_scales: &'a [f32],
    /// q4: per group `(0, Σ x)`, meeting the weights' `(scale, min)` pairs.
    pub sums: &'a [f32],
}

/// The buffers an [`Input`]'s layouts live in (a thread's scratch keeps them).
#[derive(Default)]
pub struct Layouts {
    pairs: Vec<f32>,
    codes: Vec<i8>,
    lane_scales: Vec<f32>,
    sums: Vec<f32>,
    bf16: Vec<u16>,
}

/// Whether `m`'s one-token kernel reads int8 activations under `math`: q8 and q4 with groups
/// of 32 and rows of whole groups, and GGUF's Q8_0, Q4_K, Q5_K, Q5_0 and Q6_K.
pub fn takes_int8(m: &Matrix, math: Math) -> bool {
    let grouped = m.scales.as_ref().is_some_and(|s| s.block_cols == GROUP && s.block_rows == 1);
    // GGUF's Q8_0, Q4_K, Q5_K, Q5_0 and Q6_K: their blocks' groups of 32 (Q6_K's pairs of 16) meet
    // the activations' (gguf_dot).
    let gguf = matches!(m.dtype, DType::Q8_0 | DType::Q4_K | DType::Q5_K | DType::Q5_0 | DType::Q6_K);
    math == Math::Fast && ((matches!(m.dtype, DType::Q8 | DType::Q4) && grouped) || gguf) && m.cols.is_multiple_of(GROUP)
}

impl Layouts {
    /// `x` laid out for `m`'s kernel under `math`.
    pub fn prepare<'a>(&'a mut self, x: &'a [f32], m: &Matrix, math: Math) -> Input<'a> {
        let mut input = Input::plain(x);
        if m.dtype == DType::BF16 {
            self.pairs.clear();
            self.pairs.extend_from_slice(x);
            deinterleave_from(&mut self.pairs, x);
            input.pairs = Some(&self.pairs);
            if math == Math::Fast && super::bf16::detected() {
                super::bf16::round_into(x, &mut self.bf16);
                input.bf16 = Some(&self.bf16);
            }
        } else if takes_int8(m, math) {
            self.quantise(x, m.dtype == DType::Q4);
            input.int8 = Some(Int8 { codes: &self.codes, lane_scales: &self.lane_scales, sums: &self.sums });
        }
        input
    }

    /// `x` (whole groups) to int8 codes, a scale and a sum per group.
    fn quantise(&mut self, x: &[f32], nibble_order: bool) {
        let groups = x.len() / GROUP;
        self.codes.resize(x.len(), 0);
        // A last group alone leaves its pair's lanes 8..16 unused (zero).
        self.lane_scales.clear();
        self.lane_scales.resize(groups.div_ceil(2) * LANES, 0.0);
        self.sums.resize(2 * groups, 0.0);
        for (g, (values, codes)) in x.chunks_exact(GROUP).zip(self.codes.chunks_exact_mut(GROUP)).enumerate() {
            let amax = values.iter().fold(0f32, |a, v| a.max(v.abs()));
            let scale = amax / 127.0;
            // A non-finite input stays visible in the result (NaN), as in the exact kernels.
            let (scale, inverse) = match amax {
                a if !a.is_finite() => (f32::NAN, 0.0),
                0.0 => (0.0, 0.0),
                _ => (scale, 1.0 / scale),
            };
            for (c, v) in codes.iter_mut().zip(values) {
                *c = round_to_nearest(v * inverse) as i8;
            }
            if nibble_order {
                let natural: [i8; GROUP] = std::array::from_fn(|i| codes[i]);
                deinterleave_from(codes, &natural);
            }
            self.lane_scales[g * LANES / 2..][..LANES / 2].fill(scale);
            self.sums[2 * g] = 0.0;
            self.sums[2 * g + 1] = values.iter().sum();
        }
    }
}

/// `v` (|v| <= 127) rounded to the nearest integer, ties to even: adding and taking away 1.5 *
/// 2^23 leaves no fraction bits. Branch-free and without a libm call (baseline x86-64 has no
/// rounding instruction), so the loop around it vectorises.
#[inline(always)]
fn round_to_nearest(v: f32) -> i32 {
    const SHIFT: f32 = 12_582_912.0;
    ((v + SHIFT) - SHIFT) as i32
}

/// Each full block of 32 in `v` (a copy of `x`) rewritten evens then odds from `x`.
fn deinterleave_from<T: Copy>(v: &mut [T], x: &[T]) {
    for (block, from) in v.chunks_exact_mut(GROUP).zip(x.chunks_exact(GROUP)) {
        for i in 0..GROUP / 2 {
            block[i] = from[2 * i];
            block[GROUP / 2 + i] = from[2 * i + 1];
        }
    }
}
