//! llama.cpp's block formats as GGUF files store them, decoded exactly as ggml's reference
//! `dequantize_row_*` (ggml-quants.c) computes each value: the same products in the same
//! order, in f32, no fused multiply-adds, so the values equal gguf-py's dequantisation
//! (tests/gguf.rs checks every format against it on llama-quantize's own output).
//!
//! A block holds its scales beside its codes; rows are whole blocks. The CPU backend's
//! one-token dots read blocks in place (`backend::cpu::gguf_dot`); the reference and the
//! several-token panels decode rows through here (`quant::decode_into`; the i-quants through
//! `quant::iq`).

use super::DType;

/// Values in a K-quant super-block.
const QK_K: usize = 256;

/// `kvalues_iq4nl`: IQ4_NL's and IQ4_XS's 16 levels.
pub(crate) const IQ4_LEVELS: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

#[inline(always)] // inside the CPU kernels' SIMD-level code, where it vectorises
pub(crate) fn f16(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// The 6-bit scale and min `j` of a Q4_K / Q5_K block's 12 packed bytes (`get_scale_min_k4`).
#[inline(always)] // inside the CPU kernels' SIMD-level code, where it vectorises
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    let (d, m) = if j < 4 { (q[j] & 63, q[j + 4] & 63) } else { ((q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)) };
    (d as f32, m as f32)
}

/// Decodes whole blocks of `dtype` from `bytes` into `out` (one value per element).
///
/// # Panics
/// If `dtype` is not a GGUF block format, or `bytes` and `out` are not whole blocks of it.
#[inline(always)] // inside the CPU kernels' SIMD-level code, where it vectorises
pub fn decode(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    let f = dtype.format();
    let (values, size) = (f.values as usize, f.bytes as usize);
    assert!(f.is_block() && out.len().is_multiple_of(values) && bytes.len() == out.len() / values * size, "{dtype:?}: whole blocks");
    for (b, y) in bytes.chunks_exact(size).zip(out.chunks_exact_mut(values)) {
        match dtype {
            DType::Q8_0 => {
                let d = f16(b, 0);
                y.iter_mut().zip(&b[2..34]).for_each(|(y, &q)| *y = q as i8 as f32 * d);
            }
            DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::IQ4_NL => legacy(dtype, b, y),
            DType::Q2_K => q2_k(b, y),
            DType::Q3_K => q3_k(b, y),
            DType::Q4_K | DType::Q5_K => q45_k(dtype == DType::Q5_K, b, y),
            DType::Q6_K => q6_k(b, y),
            DType::IQ4_XS => iq4_xs(b, y),
            _ if super::iq::is_iq(dtype) => super::iq::decode(dtype, b, y),
            _ => unreachable!("{dtype:?} is not a block format"),
        }
    }
}

/// The 32-value formats: `d` (and `m`), a fifth bit per value where the format has one,
/// nibbles low half first (`dequantize_row_q4_0` .. `q5_1`, `iq4_nl`).
#[inline(always)] // inside the CPU kernels' SIMD-level code, where it vectorises
fn legacy(dtype: DType, b: &[u8], y: &mut [f32]) {
    let d = f16(b, 0);
    let with_min = matches!(dtype, DType::Q4_1 | DType::Q5_1);
    let m = if with_min { f16(b, 2) } else { 0.0 };
    let mut at = if with_min { 4 } else { 2 };
    let high = matches!(dtype, DType::Q5_0 | DType::Q5_1).then(|| {
        at += 4;
        u32::from_le_bytes([b[at - 4], b[at - 3], b[at - 2], b[at - 1]])
    });
    let qs = &b[at..at + 16];
    for j in 0..16 {
        let (lo, hi) = (qs[j] & 0xf, qs[j] >> 4);
        let (v0, v1) = match (dtype, high) {
            (DType::IQ4_NL, _) => {
                y[j] = d * IQ4_LEVELS[lo as usize] as f32;
                y[j + 16] = d * IQ4_LEVELS[hi as usize] as f32;
                continue;
            }
            (_, Some(qh)) => ((lo | (((qh >> j) << 4) & 0x10) as u8) as i32, (hi | ((qh >> (j + 12)) & 0x10) as u8) as i32),
            (_, None) => (lo as i32, hi as i32),
        };
        // Without a min the codes are centred: 8 for 4 bits, 16 for 5.
        let offset = match dtype {
            DType::Q4_0 => 8,
            DType::Q5_0 => 16,
            _ => 0,
        };
        if with_min {
            y[j] = v0 as f32 * d + m;
            y[j + 16] = v1 as f32 * d + m;
        } else {
            y[j] = (v0 - offset) as f32 * d;
            y[j + 16] = (v1 - offset) as f32 * d;
        }
    }
}

/// Q2_K: scales[16] (4-bit scale, 4-bit min), qs[64], d, dmin.
#[inline(always)] // inside the CPU kernels' SIMD-level code, where it vectorises
fn q2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs, d, min) = (&b[0..16], &b[16..80], f16(b, 80), f16(b, 82));
    let (mut is, mut out) = (0, 0);
    for n in 0..QK_K / 128 {
        let q = &qs[32 * n..];
        for shift in (0..8).step_by(2) {
            for half in 0..2 {
                let sc = scales[is];
                is += 1;
                let (dl, ml) = (d * (sc & 0xf) as f32, min * (sc >> 4) as f32);
                for l in 0..16 {
                    y[out] = dl * ((q[l + 16 * half] >> shift) & 3) as f32 - ml;
                    out += 1;
                }
            }
        }
    }
}

/// Q3_K's sixteen 6-bit scales (before their -32) from its 12 packed bytes, as ggml's kmask
/// dance unpacks them.
#[inline(always)]
pub(crate) fn q3_k_scales(packed: &[u8]) -> [i8; 16] {
    let word = |i: usize| u32::from_le_bytes([packed[4 * i], packed[4 * i + 1], packed[4 * i + 2], packed[4 * i + 3]]);
    let (a0, a1, tmp) = (word(0), word(1), word(2));
    let (k1, k2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
    let aux = [(a0 & k2) | ((tmp & k1) << 4), (a1 & k2) | (((tmp >> 2) & k1) << 4), ((a0 >> 4) & k2) | (((tmp >> 4) & k1) << 4), ((a1 >> 4) & k2) | (((tmp >> 6) & k1) << 4)];
    std::array::from_fn(|i| aux[i / 4].to_le_bytes()[i % 4] as i8)
}

/// Q3_K: hmask[32], qs[64], scales[12] (6-bit, [`q3_k_scales`]), d.
#[inline(always)] // inside the CPU kernels' SIMD-level code, where it vectorises
fn q3_k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs, packed, d) = (&b[0..32], &b[32..96], &b[96..108], f16(b, 108));
    let scales = q3_k_scales(packed);
    let (mut is, mut out, mut m) = (0, 0, 1u8);
    for n in 0..QK_K / 128 {
        let q = &qs[32 * n..];
        for shift in (0..8).step_by(2) {
            for half in 0..2 {
                let dl = d * (scales[is] as i32 - 32) as f32;
                is += 1;
                for l in 0..16 {
                    let i = l + 16 * half;
                    let code = ((q[i] >> shift) & 3) as i32 - if hmask[i] & m != 0 { 0 } else { 4 };
                    y[out] = dl * code as f32;
                    out += 1;
                }
            }
            m <<= 1;
        }
    }
}

/// Q4_K (d, dmin, scales[12], qs[128]) and Q5_K (the same with qh[32] before qs).
#[inline(always)] // inside the CPU kernels' SIMD-level code, where it vectorises
fn q45_k(five: bool, b: &[u8], y: &mut [f32]) {
    let (d, min, scales) = (f16(b, 0), f16(b, 2), &b[4..16]);
    let (qh, ql) = if five { (&b[16..48], &b[48..176]) } else { (&b[0..0], &b[16..144]) };
    let (mut u1, mut u2) = (1u8, 2u8);
    for (j, chunk) in y.chunks_exact_mut(64).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * j, scales);
        let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
        let (d1, m1, d2, m2) = (d * sc1, min * m1, d * sc2, min * m2);
        let q = &ql[32 * j..32 * j + 32];
        for l in 0..32 {
            let (hi1, hi2) = if five { (if qh[l] & u1 != 0 { 16 } else { 0 }, if qh[l] & u2 != 0 { 16 } else { 0 }) } else { (0, 0) };
            chunk[l] = d1 * ((q[l] & 0xf) + hi1) as f32 - m1;
            chunk[l + 32] = d2 * ((q[l] >> 4) + hi2) as f32 - m2;
        }
        (u1, u2) = (u1 << 2, u2 << 2);
    }
}

/// Q6_K: ql[128], qh[64], scales[16] (i8), d.
#[inline(always)] // inside the CPU kernels' SIMD-level code, where it vectorises
fn q6_k(b: &[u8], y: &mut [f32]) {
    let (ql, qh, sc, d) = (&b[0..128], &b[128..192], &b[192..208], f16(b, 208));
    for n in 0..QK_K / 128 {
        let (ql, qh, sc, y) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..], &mut y[128 * n..]);
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * sc[is] as i8 as f32 * q1 as f32;
            y[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
            y[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
            y[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
        }
    }
}

/// IQ4_XS: d, scales_h (u16), scales_l[4], qs[128]: 8 sub-blocks of 32 with 6-bit scales.
#[inline(always)] // inside the CPU kernels' SIMD-level code, where it vectorises
fn iq4_xs(b: &[u8], y: &mut [f32]) {
    let (d, scales_h, scales_l, qs) = (f16(b, 0), u16::from_le_bytes([b[2], b[3]]), &b[4..8], &b[8..136]);
    for (ib, chunk) in y.chunks_exact_mut(32).enumerate() {
        let ls = ((scales_l[ib / 2] >> (4 * (ib % 2))) & 0xf) as i32 | ((((scales_h >> (2 * ib)) & 3) as i32) << 4);
        let dl = d * (ls - 32) as f32;
        let q = &qs[16 * ib..16 * ib + 16];
        for j in 0..16 {
            chunk[j] = dl * IQ4_LEVELS[(q[j] & 0xf) as usize] as f32;
            chunk[j + 16] = dl * IQ4_LEVELS[(q[j] >> 4) as usize] as f32;
        }
    }
}
