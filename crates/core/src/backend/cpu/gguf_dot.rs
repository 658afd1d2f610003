//! One-token dots of GGUF's block formats, per group `scale * Σ code x + min * Σ x`: the
//! products of ggml's reference decode (`quant::ggml`, `value = scale * code + min`), summed in
//! another order.
//!
//! Q8_0 and the formats of Q4_K_M / Q5_K_M files (Q4_K, Q5_K, Q6_K and the four legacy ones)
//! widen their codes straight into vectors ([`Vector::load_i8`], [`Vector::nibbles`],
//! [`Vector::crumbs`], the fifth bits as masks; IQ4_NL / IQ4_XS through [`Vector::levels`]). The others (Q2_K, Q3_K, the i-quants below IQ4) unpack
//! a block's codes into signed bytes first, then load them: simpler, and slower (a vector load
//! of bytes just stored one at a time waits for the stores).

use super::input::Int8;
use super::vector::{Vector, LANES};
use crate::quant::ggml::{f16, q3_k_scales, scale_min_k4, IQ4_LEVELS};
use crate::quant::DType;

/// A block's codes, and per group of `group` codes its scale and min (the byte-unpacked
/// formats).
struct Unpacked {
    codes: [i8; 256],
    scales: [f32; 16],
    mins: [f32; 16],
    groups: usize,
    group: usize,
    has_min: bool,
}

impl Default for Unpacked {
    fn default() -> Self {
        Unpacked { codes: [0; 256], scales: [0.0; 16], mins: [0.0; 16], groups: 0, group: 0, has_min: false }
    }
}

/// Unpacks one block of Q2_K, Q3_K or an i-quant below IQ4 (as `quant::ggml` and `quant::iq`
/// decode them).
#[inline(always)]
fn unpack(dtype: DType, b: &[u8], u: &mut Unpacked) {
    let c = &mut u.codes;
    match dtype {
        DType::Q2_K => {
            let (scales, qs, d, min) = (&b[0..16], &b[16..80], f16(b, 80), f16(b, 82));
            for n in 0..2 {
                for (s, shift) in (0..8).step_by(2).enumerate() {
                    for half in 0..2 {
                        let g = 8 * n + 2 * s + half;
                        for (l, out) in c[16 * g..16 * g + 16].iter_mut().enumerate() {
                            *out = ((qs[32 * n + 16 * half + l] >> shift) & 3) as i8;
                        }
                        u.scales[g] = d * (scales[g] & 0xf) as f32;
                        u.mins[g] = -(min * (scales[g] >> 4) as f32);
                    }
                }
            }
            (u.groups, u.group, u.has_min) = (16, 16, true);
        }
        DType::Q3_K => {
            let (hmask, qs, d) = (&b[0..32], &b[32..96], f16(b, 108));
            let scales = q3_k_scales(&b[96..108]);
            for n in 0..2 {
                for (s, shift) in (0..8).step_by(2).enumerate() {
                    let m = 1u8 << (4 * n + s);
                    for half in 0..2 {
                        let g = 8 * n + 2 * s + half;
                        for (l, out) in c[16 * g..16 * g + 16].iter_mut().enumerate() {
                            let i = 16 * half + l;
                            *out = ((qs[32 * n + i] >> shift) & 3) as i8 - if hmask[i] & m != 0 { 0 } else { 4 };
                        }
                        u.scales[g] = d * (scales[g] as i32 - 32) as f32;
                    }
                }
            }
            (u.groups, u.group, u.has_min) = (16, 16, false);
        }
        _ => unreachable!("{dtype:?} widens its codes in place"),
    }
}

/// An unpacked block's groups dotted with its 256 or 32 inputs, into `acc`.
///
/// # Safety
/// The CPU runs `V`'s level; `x` is the block's inputs.
#[inline(always)]
unsafe fn unpacked<V: Vector>(u: &Unpacked, x: &[f32], acc: &mut V) {
    assert!(x.len() >= u.groups * u.group);
    // SAFETY (every load): the level is the caller's contract; a group's loads read `LANES`
    // codes and inputs inside it (asserted length).
    unsafe {
        let one = V::splat(1.0);
        for g in 0..u.groups {
            let k0 = g * u.group;
            let (mut part, mut sum) = (V::zero(), V::zero());
            for v in (0..u.group).step_by(LANES) {
                let xv = V::load(x.as_ptr().add(k0 + v));
                part = V::mul_add(V::load_i8(u.codes.as_ptr().add(k0 + v) as *const u8), xv, part);
                if u.has_min {
                    sum = V::mul_add(xv, one, sum);
                }
            }
            *acc = V::mul_add(V::splat(u.scales[g]), part, *acc);
            if u.has_min {
                *acc = V::mul_add(V::splat(u.mins[g]), sum, *acc);
            }
        }
    }
}

/// Q8_0 block: `d Σ q x`, the codes already bytes.
///
/// # Safety
/// The CPU runs `V`'s level; `b` is a whole block and `x` its 32 inputs.
#[inline(always)]
unsafe fn q8_0<V: Vector>(b: &[u8], x: &[f32], acc: &mut V) {
    assert!(b.len() >= 34 && x.len() == 32);
    // SAFETY (every load): inside `b` and `x` (asserted lengths).
    unsafe {
        let codes = b.as_ptr().add(2);
        let part = V::mul_add(V::load_i8(codes), V::load(x.as_ptr()), V::zero());
        let part = V::mul_add(V::load_i8(codes.add(LANES)), V::load(x.as_ptr().add(LANES)), part);
        *acc = V::mul_add(V::splat(f16(b, 0)), part, *acc);
    }
}

/// Q4_K (Q5_K: `five`) block: four pairs of 32-value groups, codes from one 32-byte run's low
/// then high nibbles (plus bits 2j and 2j+1 of `qh` for Q5_K).
///
/// # Safety
/// The CPU runs `V`'s level; `b` is a whole block and `x` its 256 inputs.
#[inline(always)]
unsafe fn k45<V: Vector>(five: bool, b: &[u8], x: &[f32], acc: &mut V) {
    assert!(b.len() >= if five { 176 } else { 144 } && x.len() == 256);
    let (d, dmin, scales) = (f16(b, 0), f16(b, 2), &b[4..16]);
    let ql = if five { 48 } else { 16 };
    // SAFETY (every load): inside `b` and `x` (asserted lengths).
    unsafe {
        let (one, sixteen) = (V::splat(1.0), V::splat(16.0));
        for j in 0..4 {
            let (q, xs) = (b.as_ptr().add(ql + 32 * j), x.as_ptr().add(64 * j));
            let (mut lo0, mut lo1, mut hi0, mut hi1) = (V::nibbles(q, false), V::nibbles(q.add(16), false), V::nibbles(q, true), V::nibbles(q.add(16), true));
            if five {
                let qh = b.as_ptr().add(16);
                let (b0, b1) = (2 * j as u32, 2 * j as u32 + 1);
                lo0 = V::mul_add(V::byte_bits(qh, b0), sixteen, lo0);
                lo1 = V::mul_add(V::byte_bits(qh.add(16), b0), sixteen, lo1);
                hi0 = V::mul_add(V::byte_bits(qh, b1), sixteen, hi0);
                hi1 = V::mul_add(V::byte_bits(qh.add(16), b1), sixteen, hi1);
            }
            let (x0, x1, x2, x3) = (V::load(xs), V::load(xs.add(16)), V::load(xs.add(32)), V::load(xs.add(48)));
            let (lo, hi) = (V::mul_add(lo1, x1, V::mul(lo0, x0)), V::mul_add(hi1, x3, V::mul(hi0, x2)));
            let (sum_lo, sum_hi) = (V::mul_add(x1, one, x0), V::mul_add(x3, one, x2));
            let ((sc1, m1), (sc2, m2)) = (scale_min_k4(2 * j, scales), scale_min_k4(2 * j + 1, scales));
            *acc = V::mul_add(V::splat(d * sc1), lo, *acc);
            *acc = V::mul_add(V::splat(-(dmin * m1)), sum_lo, *acc);
            *acc = V::mul_add(V::splat(d * sc2), hi, *acc);
            *acc = V::mul_add(V::splat(-(dmin * m2)), sum_hi, *acc);
        }
    }
}

/// Q6_K block: per 128 values, codes `nibble | crumb << 4` less 32, a scale per 16.
///
/// # Safety
/// The CPU runs `V`'s level; `b` is a whole block and `x` its 256 inputs.
#[inline(always)]
unsafe fn k6<V: Vector>(b: &[u8], x: &[f32], acc: &mut V) {
    assert!(b.len() >= 210 && x.len() == 256);
    let (sc, d) = (&b[192..208], f16(b, 208));
    // SAFETY (every load): inside `b` and `x` (asserted lengths).
    unsafe {
        let (one, sixteen, less) = (V::splat(1.0), V::splat(16.0), V::splat(-32.0));
        for n in 0..2 {
            let (ql, qh, xs) = (b.as_ptr().add(64 * n), b.as_ptr().add(128 + 32 * n), x.as_ptr().add(128 * n));
            for h in 0..2 {
                // (low-bit bytes, high nibble?, crumb shift) of the four quarters' 16 values.
                for (k, (at, high, shift)) in [(0, false, 0), (32, false, 2), (0, true, 4), (32, true, 6)].into_iter().enumerate() {
                    let n4 = V::nibbles(ql.add(at + 16 * h), high);
                    let code = V::mul_add(V::crumbs(qh.add(16 * h), shift), sixteen, V::mul_add(n4, one, less));
                    let part = V::mul(code, V::load(xs.add(32 * k + 16 * h)));
                    *acc = V::mul_add(V::splat(d * sc[8 * n + h + 2 * k] as i8 as f32), part, *acc);
                }
            }
        }
    }
}

/// Q4_0 / Q5_0 / Q4_1 / Q5_1 block of 32: codes less 8 / 16 (without a min) or plus `m`
/// (with one, `m Σ x`), the fifth bits from `qh`.
///
/// # Safety
/// The CPU runs `V`'s level; `b` is a whole block and `x` its 32 inputs.
#[inline(always)]
unsafe fn legacy<V: Vector>(dtype: DType, b: &[u8], x: &[f32], acc: &mut V) {
    let five = matches!(dtype, DType::Q5_0 | DType::Q5_1);
    let with_min = matches!(dtype, DType::Q4_1 | DType::Q5_1);
    let qh_at = if with_min { 4 } else { 2 };
    let qs_at = qh_at + if five { 4 } else { 0 };
    assert!(b.len() >= qs_at + 16 && x.len() == 32);
    let d = f16(b, 0);
    // SAFETY (every load): inside `b` and `x` (asserted lengths).
    unsafe {
        let (one, sixteen) = (V::splat(1.0), V::splat(16.0));
        let qs = b.as_ptr().add(qs_at);
        if dtype == DType::IQ4_NL {
            // The nibbles index the 16 levels: d level.
            let (lo, hi) = (V::levels(qs, false, &IQ4_LEVELS), V::levels(qs, true, &IQ4_LEVELS));
            let part = V::mul_add(hi, V::load(x.as_ptr().add(16)), V::mul(lo, V::load(x.as_ptr())));
            *acc = V::mul_add(V::splat(d), part, *acc);
            return;
        }
        let (mut lo, mut hi) = (V::nibbles(qs, false), V::nibbles(qs, true));
        if five {
            let qh = u32::from_le_bytes([b[qh_at], b[qh_at + 1], b[qh_at + 2], b[qh_at + 3]]);
            lo = V::mul_add(V::bits(qh as u16), sixteen, lo);
            hi = V::mul_add(V::bits((qh >> 16) as u16), sixteen, hi);
        }
        let (x0, x1) = (V::load(x.as_ptr()), V::load(x.as_ptr().add(16)));
        if with_min {
            let part = V::mul_add(hi, x1, V::mul(lo, x0));
            *acc = V::mul_add(V::splat(d), part, *acc);
            *acc = V::mul_add(V::splat(f16(b, 2)), V::mul_add(x1, one, x0), *acc);
        } else {
            let offset = V::splat(if five { -16.0 } else { -8.0 });
            let (lo, hi) = (V::mul_add(lo, one, offset), V::mul_add(hi, one, offset));
            let part = V::mul_add(hi, x1, V::mul(lo, x0));
            *acc = V::mul_add(V::splat(d), part, *acc);
        }
    }
}

/// IQ4_XS: per 32 values a 6-bit scale (low nibble and high pair) against the block's `d`,
/// nibbles indexing the 16 levels as IQ4_NL's.
///
/// # Safety
/// The CPU runs `V`'s level.
#[inline(always)]
unsafe fn iq4_xs<V: Vector>(b: &[u8], x: &[f32], acc: &mut V) {
    assert!(b.len() >= 136 && x.len() == 256);
    let (d, scales_h) = (f16(b, 0), u16::from_le_bytes([b[2], b[3]]));
    // SAFETY (every load): inside `b` and `x` (asserted lengths).
    unsafe {
        for ib in 0..8 {
            let ls = ((b[4 + ib / 2] >> (4 * (ib % 2))) & 0xf) as i32 | ((((scales_h >> (2 * ib)) & 3) as i32) << 4);
            let qs = b.as_ptr().add(8 + 16 * ib);
            let (lo, hi) = (V::levels(qs, false, &IQ4_LEVELS), V::levels(qs, true, &IQ4_LEVELS));
            let part = V::mul_add(hi, V::load(x.as_ptr().add(32 * ib + 16)), V::mul(lo, V::load(x.as_ptr().add(32 * ib))));
            *acc = V::mul_add(V::splat(d * (ls - 32) as f32), part, *acc);
        }
    }
}

/// A row of Q8_0, Q4_K, Q5_K, Q5_0 or Q6_K blocks dotted with int8 activations (`--math fast`, llama.cpp's
/// arithmetic): per pair of groups of 32 an integer dot, scaled by the weights' and the
/// activations' group scales; Q4_K's and Q5_K's mins meet the activations' exact group sums.
///
/// # Safety
/// The CPU runs `V`'s level; `x` was laid out for the row (`input::takes_int8`).
#[inline(always)]
pub(super) unsafe fn dot_int8<V: Vector>(dtype: DType, row: &[u8], x: Int8) -> f32 {
    let f = dtype.format();
    let (values, size) = (f.values as usize, f.bytes as usize);
    let (len, groups) = (x.codes.len(), x.codes.len() / 32);
    assert!(row.len() / size * values == len && x.lane_scales.len() == groups.div_ceil(2) * LANES && x.sums.len() == 2 * groups, "int8 activations of the row's width");
    // SAFETY (every load): the level is the caller's contract; a pair `p` of groups reads codes
    // `[64p, 64p + 64)` and lane scales `[16p, 16p + 16)`, weight bytes inside its block(s).
    let mut acc = unsafe { V::zero() };
    let mut tail = 0f32;
    match dtype {
        DType::Q8_0 => {
            let pairs = groups / 2;
            for p in 0..pairs {
                let (b0, b1) = (&row[2 * p * 34..], &row[(2 * p + 1) * 34..]);
                super::vector::prefetch_ahead(b0.as_ptr(), 68);
                let prod = unsafe { V::dot_i8_two(b0.as_ptr().add(2), b1.as_ptr().add(2), x.codes.as_ptr().add(64 * p)) };
                acc = unsafe { V::mul_add(prod, pair::<V>(&x, p, [f16(b0, 0), f16(b1, 0)]), acc) };
            }
            if groups % 2 == 1 {
                let b = &row[2 * pairs * 34..];
                let prod = unsafe { V::dot_i8_half(b.as_ptr().add(2), x.codes.as_ptr().add(64 * pairs)) };
                acc = unsafe { V::mul_add(prod, pair::<V>(&x, pairs, [f16(b, 0), 0.0]), acc) };
            }
        }
        DType::Q4_K | DType::Q5_K => {
            let five = dtype == DType::Q5_K;
            for (i, b) in row.chunks_exact(size).enumerate() {
                super::vector::prefetch_ahead(b.as_ptr(), size);
                let (d, dmin, scales) = (f16(b, 0), f16(b, 2), &b[4..16]);
                for j in 0..4 {
                    let (p, g) = (4 * i + j, 8 * i + 2 * j);
                    let ((sc1, m1), (sc2, m2)) = (scale_min_k4(2 * j, scales), scale_min_k4(2 * j + 1, scales));
                    let codes = x.codes.as_ptr().wrapping_add(64 * p);
                    let prod = match five {
                        true => unsafe { V::dot_q5k_pair(b.as_ptr().add(48 + 32 * j), b.as_ptr().add(16), j as u32, codes) },
                        false => unsafe { V::dot_nibble_pair(b.as_ptr().add(16 + 32 * j), codes) },
                    };
                    acc = unsafe { V::mul_add(prod, pair::<V>(&x, p, [d * sc1, d * sc2]), acc) };
                    tail -= dmin * m1 * x.sums[2 * g + 1] + dmin * m2 * x.sums[2 * g + 3];
                }
            }
        }
        DType::Q5_0 => {
            let pairs = groups / 2;
            for p in 0..pairs {
                let (b0, b1) = (&row[2 * p * 22..], &row[(2 * p + 1) * 22..]);
                super::vector::prefetch_ahead(b0.as_ptr(), 44);
                let prod = unsafe { V::dot_q5_0_pair(b0.as_ptr(), b1.as_ptr(), x.codes.as_ptr().add(64 * p)) };
                acc = unsafe { V::mul_add(prod, pair::<V>(&x, p, [f16(b0, 0), f16(b1, 0)]), acc) };
            }
            if groups % 2 == 1 {
                // The last block alone, against its 32 activations and 32 zeros.
                let b = &row[2 * pairs * 22..];
                let mut codes = [0i8; 64];
                codes[..32].copy_from_slice(&x.codes[64 * pairs..64 * pairs + 32]);
                let prod = unsafe { V::dot_q5_0_pair(b.as_ptr(), b.as_ptr(), codes.as_ptr()) };
                acc = unsafe { V::mul_add(prod, pair::<V>(&x, pairs, [f16(b, 0), 0.0]), acc) };
            }
        }
        DType::Q6_K => {
            for (i, b) in row.chunks_exact(210).enumerate() {
                super::vector::prefetch_ahead(b.as_ptr(), 210);
                let (sc, d) = (&b[192..208], f16(b, 208));
                for n in 0..2 {
                    let (ql, qh) = (b.as_ptr().wrapping_add(64 * n), b.as_ptr().wrapping_add(128 + 32 * n));
                    for (half, (high, shift)) in [(false, 0), (true, 4)].into_iter().enumerate() {
                        let p = 4 * i + 2 * n + half;
                        // Four groups of 16, each its own scale, in the lanes' order.
                        let s: [f32; LANES] = std::array::from_fn(|l| d * sc[8 * n + 4 * half + l / 4] as i8 as f32);
                        let prod = unsafe { V::dot_q6_pair(ql, ql.wrapping_add(32), qh, high, shift, x.codes.as_ptr().add(64 * p)) };
                        let scale = unsafe { V::mul(V::load(s.as_ptr()), V::load(x.lane_scales.as_ptr().add(LANES * p))) };
                        acc = unsafe { V::mul_add(prod, scale, acc) };
                    }
                }
            }
        }
        _ => unreachable!("{dtype:?} takes exact activations"),
    }
    unsafe { acc.sum() + tail }
}

/// The scales of activation pair `p`'s lanes times the weights' two group scales `d` (lanes
/// 0..8 the first group, 8..16 the second). A function, not a closure: closures do not take
/// the level's target features, and the vector ops in one would become calls.
///
/// # Safety
/// The CPU runs `V`'s level; `x` holds pair `p`.
#[inline(always)]
unsafe fn pair<V: Vector>(x: &Int8, p: usize, d: [f32; 2]) -> V {
    assert!(x.lane_scales.len() >= LANES * (p + 1));
    // SAFETY: the caller's contract; the lane scales' range is asserted.
    unsafe { V::mul(V::expand_pair(d.as_ptr(), 1), V::load(x.lane_scales.as_ptr().add(LANES * p))) }
}

/// Whether [`dot`] takes `dtype` (every GGUF block format).
pub(super) fn takes(dtype: DType) -> bool {
    dtype.format().is_block()
}

/// A row of `dtype` blocks dotted with `x`.
///
/// # Safety
/// The CPU runs `V`'s level.
#[inline(always)]
pub(super) unsafe fn dot<V: Vector>(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
    // The format a constant of each loop: its block size and kernel fold away (a run-time one
    // stayed in the loop: Q8_0 decoded at 161-166 tok/s on the 0.58B synth against 253-284).
    // SAFETY (every arm): the caller's contract.
    unsafe {
        match dtype {
            DType::Q8_0 => blocks::<V, { DType::Q8_0 as usize }>(row, x),
            DType::Q4_K => blocks::<V, { DType::Q4_K as usize }>(row, x),
            DType::Q5_K => blocks::<V, { DType::Q5_K as usize }>(row, x),
            DType::Q6_K => blocks::<V, { DType::Q6_K as usize }>(row, x),
            DType::Q4_0 => blocks::<V, { DType::Q4_0 as usize }>(row, x),
            DType::Q4_1 => blocks::<V, { DType::Q4_1 as usize }>(row, x),
            DType::Q5_0 => blocks::<V, { DType::Q5_0 as usize }>(row, x),
            DType::Q5_1 => blocks::<V, { DType::Q5_1 as usize }>(row, x),
            DType::IQ4_NL => blocks::<V, { DType::IQ4_NL as usize }>(row, x),
            DType::IQ4_XS => blocks::<V, { DType::IQ4_XS as usize }>(row, x),
            _ if crate::quant::iq::is_iq(dtype) => iq_row::<V>(dtype, row, x),
            _ => unpacked_row::<V>(dtype, row, x),
        }
    }
}

/// [`dot`] for the format of row `D` of the format table (one that widens its codes in
/// place): blocks alternate between two accumulators (one chain of multiply-adds would wait on
/// the FMA's latency).
///
/// # Safety
/// The CPU runs `V`'s level.
#[inline(always)]
unsafe fn blocks<V: Vector, const D: usize>(row: &[u8], x: &[f32]) -> f32 {
    let f = &crate::format::FORMATS[D];
    let (dtype, values, size) = (f.dtype, f.values as usize, f.bytes as usize);
    assert_eq!(row.len() / size * values, x.len(), "a row of whole blocks of the input's width");
    // SAFETY (every block's dot): the level is the caller's contract; `block` and `x` are one
    // block's.
    let (mut even, mut odd) = (unsafe { V::zero() }, unsafe { V::zero() });
    // Two blocks an iteration, each into its own accumulator: a reference chosen per block
    // (`if i % 2 == 0 { &mut even } ...`) kept them in memory, not registers (Q8_0 decoded at
    // 212-216 tok/s against 294).
    let (pairs, rest) = (row.chunks_exact(2 * size), x.chunks_exact(2 * values));
    let (last_block, last_x) = (pairs.remainder(), rest.remainder());
    for (two, x) in pairs.zip(rest) {
        super::vector::prefetch_ahead(two.as_ptr(), 2 * size);
        unsafe {
            block::<V>(dtype, &two[..size], &x[..values], &mut even);
            block::<V>(dtype, &two[size..], &x[values..], &mut odd);
        }
    }
    if !last_block.is_empty() {
        unsafe { block::<V>(dtype, last_block, last_x, &mut even) };
    }
    let zero = unsafe { V::zero() };
    let sums = unsafe { V::sum4([even, odd, zero, zero]) };
    sums[0] + sums[1]
}

/// One block of a format that widens its codes in place, into `acc`.
///
/// # Safety
/// The CPU runs `V`'s level; `b` is a whole block and `x` its inputs.
#[inline(always)]
unsafe fn block<V: Vector>(dtype: DType, b: &[u8], x: &[f32], acc: &mut V) {
    // SAFETY (every arm): the caller's contract.
    unsafe {
        match dtype {
            DType::Q8_0 => q8_0::<V>(b, x, acc),
            DType::Q4_K | DType::Q5_K => k45::<V>(dtype == DType::Q5_K, b, x, acc),
            DType::Q6_K => k6::<V>(b, x, acc),
            DType::IQ4_XS => iq4_xs::<V>(b, x, acc),
            _ => legacy::<V>(dtype, b, x, acc),
        }
    }
}

/// A row of low-bit i-quant blocks (IQ1_S .. IQ3_S) dotted with `x`: each block's codes built
/// eight at a time in a u64 from its grid entries (`quant::iq::unpack`), sixteen widened
/// straight to lanes ([`Vector::i8_pair`]), scaled per 16.
///
/// # Safety
/// The CPU runs `V`'s level.
#[inline(always)]
unsafe fn iq_row<V: Vector>(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
    let size = dtype.format().bytes as usize;
    assert_eq!(row.len() / size * 256, x.len(), "a row of whole blocks of the input's width");
    let (mut codes, mut scales) = ([0u64; 32], [0f32; 16]);
    // SAFETY (every load): the caller's contract; a group's loads read 16 of the block's inputs.
    let (mut even, mut odd) = unsafe { (V::zero(), V::zero()) };
    for (block, x) in row.chunks_exact(size).zip(x.chunks_exact(256)) {
        super::vector::prefetch_ahead(block.as_ptr(), size);
        crate::quant::iq::unpack(dtype, block, &mut codes, &mut scales);
        unsafe {
            for g in (0..16).step_by(2) {
                let w0 = V::mul(V::i8_pair(codes[2 * g], codes[2 * g + 1]), V::load(x.as_ptr().add(16 * g)));
                let w1 = V::mul(V::i8_pair(codes[2 * g + 2], codes[2 * g + 3]), V::load(x.as_ptr().add(16 * g + 16)));
                even = V::mul_add(V::splat(scales[g]), w0, even);
                odd = V::mul_add(V::splat(scales[g + 1]), w1, odd);
            }
        }
    }
    let zero = unsafe { V::zero() };
    let sums = unsafe { V::sum4([even, odd, zero, zero]) };
    sums[0] + sums[1]
}

/// A row of Q2_K or Q3_K blocks dotted with `x`, each block's codes unpacked
/// to bytes first.
///
/// # Safety
/// The CPU runs `V`'s level.
#[inline(always)]
unsafe fn unpacked_row<V: Vector>(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
    let f = dtype.format();
    let (values, size) = (f.values as usize, f.bytes as usize);
    assert_eq!(row.len() / size * values, x.len(), "a row of whole blocks of the input's width");
    let mut u = Unpacked::default();
    // SAFETY (every block's dot): the caller's contract; `x` is the block's.
    let mut acc = unsafe { V::zero() };
    for (block, x) in row.chunks_exact(size).zip(x.chunks_exact(values)) {
        super::vector::prefetch_ahead(block.as_ptr(), size);
        unpack(dtype, block, &mut u);
        unsafe { unpacked::<V>(&u, x, &mut acc) };
    }
    unsafe { acc.sum() }
}
