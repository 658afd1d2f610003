//! Weight number formats as stored in checkpoints and their exact conversion to f32.
//!
//! FP8 here is e4m3fn (as published by DeepSeek): 1 sign bit, 4 exponent bits (bias 7), 3 mantissa
//! bits, no infinities, 0x7f/0xff are NaN, largest finite 448, subnormals when the exponent is 0.
//! Block-scaled FP8 matrices carry a `weight_scale_inv` grid: `W[r,c] = f32(Wq[r,c]) * S[r/br, c/bc]`.

use std::sync::OnceLock;

pub(crate) mod ggml;
pub mod ggml_quantize;
pub mod iq;
#[rustfmt::skip]
mod iq_grids;

/// Element types of weight matrices: the checkpoint formats dsrun reads, plus the two formats it
/// quantises to at load (`--quant q8|q4`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)] // ggml's names for its formats, as GGUF files and llama.cpp users write them
/// In the order of the format table's rows (`format::FORMATS`, indexed by the variant).
pub enum DType {
    F32,
    BF16,
    F16,
    F8E4M3,
    /// int8 codes, one byte each, with an f32 scale per group of 32 columns: `w = q * s`.
    Q8,
    /// 4-bit codes packed two per byte (element i in the low nibble when i is even), with an
    /// interleaved f32 (scale, min) pair per group of 32 columns: `w = q * s + m`.
    Q4,
    /// ggml's Q8_0, as GGUF files store it: blocks of 32 values, each an f16 scale `d` then 32
    /// int8 codes (34 bytes): `w = q * d`.
    Q8_0,
    /// llama.cpp's other block formats as GGUF files store them (`quant::ggml` decodes them):
    /// the 32-value legacy ones and IQ4_NL, the 256-value K-quants and IQ4_XS.
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    IQ4_NL,
    IQ4_XS,
    /// ggml's i-quants (`quant::iq`): codebook grids indexed per 8 or 4 values, 256-value blocks.
    IQ2_XXS,
    IQ2_XS,
    IQ2_S,
    IQ3_XXS,
    IQ3_S,
    IQ1_S,
    IQ1_M,
}

/// Columns per quantisation group of the q8/q4 formats.
pub const GROUP: usize = 32;

/// What `--quant` makes of weight matrices when they are loaded onto a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantTarget {
    /// The checkpoint's own format (FP8 stays FP8 with its block scales).
    #[default]
    Keep,
    F16,
    Q8,
    Q4,
}

crate::util::choices!(QuantTarget {
    Keep => "keep": "the checkpoint's own format (FP8 stays FP8 with its block scales)",
    F16 => "f16": "half precision",
    Q8 => "q8": "int8 with a scale per 32 columns",
    Q4 => "q4": "4-bit with a scale and min per 32 columns",
});

impl QuantTarget {
    /// The element type matrices are converted to (None: kept as stored).
    pub fn dtype(self) -> Option<DType> {
        match self {
            QuantTarget::Keep => None,
            QuantTarget::F16 => Some(DType::F16),
            QuantTarget::Q8 => Some(DType::Q8),
            QuantTarget::Q4 => Some(DType::Q4),
        }
    }
}

impl DType {
    /// Bytes per element, rounded up (q4 packs two elements per byte), from the format table;
    /// for block formats, a block's bytes (use [`crate::format::Format::bytes`] for counts).
    pub fn size_bytes(self) -> usize {
        let f = self.format();
        (f.bytes as usize).div_ceil(if f.is_block() { 1 } else { f.values as usize })
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8E4M3 => "F8_E4M3",
            DType::Q8 => "Q8",
            DType::Q4 => "Q4",
            DType::Q8_0 => "Q8_0",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
            DType::Q5_0 => "Q5_0",
            DType::Q5_1 => "Q5_1",
            DType::Q2_K => "Q2_K",
            DType::Q3_K => "Q3_K",
            DType::Q4_K => "Q4_K",
            DType::Q5_K => "Q5_K",
            DType::Q6_K => "Q6_K",
            DType::IQ4_NL => "IQ4_NL",
            DType::IQ4_XS => "IQ4_XS",
            DType::IQ2_XXS => "IQ2_XXS",
            DType::IQ2_XS => "IQ2_XS",
            DType::IQ2_S => "IQ2_S",
            DType::IQ3_XXS => "IQ3_XXS",
            DType::IQ3_S => "IQ3_S",
            DType::IQ1_S => "IQ1_S",
            DType::IQ1_M => "IQ1_M",
        }
    }
}

/// Exact value of one e4m3fn code.
pub fn fp8_e4m3_to_f32(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exponent = (code >> 3) & 0x0f;
    let mantissa = (code & 0x07) as f32;
    if exponent == 0x0f && code & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exponent == 0 {
        // Subnormal: 2^(1-7) * m/8.
        sign * mantissa * (2.0f32).powi(-9)
    } else {
        sign * (1.0 + mantissa / 8.0) * (2.0f32).powi(exponent as i32 - 7)
    }
}

/// All 256 e4m3fn codes decoded once: decoding a weight is then one table load.
pub fn fp8_table() -> &'static [f32; 256] {
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|i| fp8_e4m3_to_f32(i as u8)))
}

/// Decodes little-endian elements of `dtype` into `out` (one f32 per element).
/// FP8 codes come out unscaled; block scales are the caller's business.
#[inline(always)] // the CPU backend's kernels decode inside their SIMD-level code
pub fn decode_into(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(bytes.len(), dtype.format().bytes(out.len()));
    match dtype {
        DType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        DType::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        DType::F8E4M3 => {
            let table = fp8_table();
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = table[b as usize];
            }
        }
        DType::Q8 => {
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = b as i8 as f32;
            }
        }
        DType::Q4 => unreachable!("q4 rows are decoded with their group scales (Matrix::decode_row)"),
        _ => ggml::decode(dtype, bytes, out),
    }
}

pub fn decode_vec(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0.0; dtype.format().elements(bytes.len())];
    decode_into(dtype, bytes, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Independent decoding of every code from the format's definition, compared bit for bit.
    #[test]
    fn fp8_all_256_codes() {
        for code in 0..=255u8 {
            let got = fp8_e4m3_to_f32(code);
            let s = (code >> 7) as i32;
            let e = ((code >> 3) & 15) as i32;
            let m = (code & 7) as i32;
            if e == 15 && m == 7 {
                assert!(got.is_nan(), "code {code:#04x} must be NaN");
                continue;
            }
            let magnitude = if e == 0 { m as f64 / 8.0 * 2f64.powi(-6) } else { (8 + m) as f64 / 8.0 * 2f64.powi(e - 7) };
            let expected = if s == 1 { -magnitude } else { magnitude } as f32;
            assert_eq!(got.to_bits(), expected.to_bits(), "code {code:#04x}");
            assert_eq!(fp8_table()[code as usize].to_bits(), got.to_bits());
        }
    }

    #[test]
    fn fp8_landmarks() {
        assert_eq!(fp8_e4m3_to_f32(0x00), 0.0);
        assert!(fp8_e4m3_to_f32(0x80).is_sign_negative() && fp8_e4m3_to_f32(0x80) == 0.0);
        assert_eq!(fp8_e4m3_to_f32(0x38), 1.0);
        assert_eq!(fp8_e4m3_to_f32(0x7e), 448.0);
        assert_eq!(fp8_e4m3_to_f32(0xfe), -448.0);
        assert_eq!(fp8_e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(fp8_e4m3_to_f32(0x08), 2f32.powi(-6));
        assert!(fp8_e4m3_to_f32(0x7f).is_nan() && fp8_e4m3_to_f32(0xff).is_nan());
        // 0x78 (exponent 15, mantissa 0) is a finite number in e4m3fn, not infinity.
        assert_eq!(fp8_e4m3_to_f32(0x78), 256.0);
    }

    #[test]
    fn half_formats() {
        let bf = half::bf16::from_f32(-1.5).to_bits().to_le_bytes();
        let f = half::f16::from_f32(0.333).to_bits().to_le_bytes();
        assert_eq!(decode_vec(DType::BF16, &bf), vec![-1.5]);
        assert_eq!(decode_vec(DType::F16, &f), vec![half::f16::from_f32(0.333).to_f32()]);
        assert_eq!(decode_vec(DType::F32, &2.5f32.to_le_bytes()), vec![2.5]);
    }
}

/// The e4m3fn code nearest to `x` (ties to the even code), saturating at ±448. NaN maps to 0x7f.
pub fn f32_to_fp8_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let table = fp8_table();
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    // Positive codes 0x00..=0x7e increase monotonically: binary search for the neighbours.
    let (mut lo, mut hi) = (0u8, 0x7eu8);
    if a >= table[0x7e] {
        return sign | 0x7e;
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if table[mid as usize] <= a {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (dl, dh) = (a - table[lo as usize], table[hi as usize] - a);
    let code = if dl < dh || (dl == dh && lo % 2 == 0) { lo } else { hi };
    sign | code
}

/// Encodes f32 values as `dtype` (FP8: raw codes, no scaling).
pub fn encode(dtype: DType, values: &[f32]) -> Vec<u8> {
    match dtype {
        DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes()).collect(),
        DType::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes()).collect(),
        DType::F8E4M3 => values.iter().map(|&v| f32_to_fp8_e4m3(v)).collect(),
        DType::Q8 | DType::Q4 => unreachable!("q8/q4 need group scales: quantize_q8 / quantize_q4"),
        DType::Q8_0 | DType::Q4_K | DType::Q6_K => ggml_quantize::quantize(dtype, values),
        _ => unreachable!("{dtype:?}: dsrun reads it, it does not write it"),
    }
}

/// q8 of a `[rows, cols]` matrix: (codes, one scale per group of 32 columns of each row).
pub fn quantize_q8(values: &[f32], rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
    let groups = cols.div_ceil(GROUP);
    let mut codes = vec![0u8; rows * cols];
    let mut scales = vec![0f32; rows * groups];
    for r in 0..rows {
        for g in 0..groups {
            let span = r * cols + g * GROUP..r * cols + ((g + 1) * GROUP).min(cols);
            let amax = values[span.clone()].iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = if amax > 0.0 { amax / 127.0 } else { 1.0 };
            scales[r * groups + g] = scale;
            for i in span {
                codes[i] = (values[i] / scale).round().clamp(-127.0, 127.0) as i8 as u8;
            }
        }
    }
    (codes, scales)
}

/// q4 of a `[rows, cols]` matrix: (packed codes, interleaved (scale, min) per group of 32 columns).
pub fn quantize_q4(values: &[f32], rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
    let groups = cols.div_ceil(GROUP);
    let mut codes = vec![0u8; (rows * cols).div_ceil(2)];
    let mut params = vec![0f32; rows * groups * 2];
    for r in 0..rows {
        for g in 0..groups {
            let span = r * cols + g * GROUP..r * cols + ((g + 1) * GROUP).min(cols);
            let (lo, hi) = values[span.clone()].iter().fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            let scale = if hi > lo { (hi - lo) / 15.0 } else { 1.0 };
            params[(r * groups + g) * 2] = scale;
            params[(r * groups + g) * 2 + 1] = lo;
            for i in span {
                let q = ((values[i] - lo) / scale).round().clamp(0.0, 15.0) as u8;
                codes[i / 2] |= q << ((i % 2) * 4);
            }
        }
    }
    (codes, params)
}

/// Block-quantises a `[rows, cols]` matrix to e4m3 codes with one scale per block (the block's
/// largest magnitude maps to 448), as DeepSeek publishes its weights. Returns (codes, scale grid).
pub fn quantize_fp8_blocks(values: &[f32], rows: usize, cols: usize, block: (usize, usize)) -> (Vec<u8>, Vec<f32>) {
    let (grid_rows, grid_cols) = (rows.div_ceil(block.0), cols.div_ceil(block.1));
    let mut scales = vec![0.0f32; grid_rows * grid_cols];
    for r in 0..rows {
        for c in 0..cols {
            let s = &mut scales[(r / block.0) * grid_cols + c / block.1];
            *s = s.max(values[r * cols + c].abs());
        }
    }
    scales.iter_mut().for_each(|s| *s = if *s > 0.0 { *s / 448.0 } else { 1.0 });
    let codes = (0..rows * cols)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            f32_to_fp8_e4m3(values[i] / scales[(r / block.0) * grid_cols + c / block.1])
        })
        .collect();
    (codes, scales)
}

#[cfg(test)]
mod encode_tests {
    use super::*;

    #[test]
    fn fp8_encoding_round_trips_every_code_and_rounds_to_nearest() {
        for code in 0..=255u8 {
            if code & 0x7f == 0x7f {
                continue;
            }
            let v = fp8_e4m3_to_f32(code);
            let back = f32_to_fp8_e4m3(v);
            assert_eq!(fp8_e4m3_to_f32(back).to_bits(), v.to_bits(), "code {code:#04x}");
        }
        assert_eq!(fp8_e4m3_to_f32(f32_to_fp8_e4m3(1000.0)), 448.0, "saturates");
        assert_eq!(fp8_e4m3_to_f32(f32_to_fp8_e4m3(1.0625)), 1.0, "tie between 1.0 and 1.125 goes to the even code");
        assert_eq!(fp8_e4m3_to_f32(f32_to_fp8_e4m3(1.07)), 1.125);
    }

    #[test]
    fn block_quantisation_error_is_bounded() {
        let (rows, cols) = (130, 257);
        let values: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        let (codes, scales) = quantize_fp8_blocks(&values, rows, cols, (128, 128));
        assert_eq!(scales.len(), 2 * 3);
        for (i, (&v, &q)) in values.iter().zip(&codes).enumerate() {
            let s = scales[(i / cols / 128) * 3 + (i % cols) / 128];
            // e4m3 has 3 mantissa bits: relative error at most 2^-4 of the value (plus subnormal steps).
            assert!((fp8_e4m3_to_f32(q) * s - v).abs() <= v.abs() / 16.0 + s * 2f32.powi(-9), "element {i}");
        }
    }
}

/// How the latent cache stores its values (`--kv-cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheFormat {
    /// Half precision: half the bytes of f32, 11 significant bits.
    F16,
    /// bfloat16: half the bytes, f32's range, 8 significant bits.
    Bf16,
    /// Exact (what `dsrun logits` and the fixture tests use).
    #[default]
    F32,
}

crate::util::choices!(CacheFormat {
    F16 => "f16": "half precision: half the bytes of f32",
    Bf16 => "bf16": "bfloat16: half the bytes, f32's range",
    F32 => "f32": "exact",
});

impl CacheFormat {
    /// The shaders' `CACHE` constant.
    pub fn code(self) -> u32 {
        match self {
            CacheFormat::F32 => 0,
            CacheFormat::F16 => 1,
            CacheFormat::Bf16 => 2,
        }
    }

    /// 32-bit words that hold `values` values (16-bit formats pack two per word).
    pub fn words(self, values: usize) -> usize {
        match self {
            CacheFormat::F32 => values,
            CacheFormat::F16 | CacheFormat::Bf16 => values.div_ceil(2),
        }
    }

    /// `x` as the cache holds it (round to nearest even, as the kernels store it).
    pub fn round(self, x: f32) -> f32 {
        match self {
            CacheFormat::F32 => x,
            CacheFormat::F16 => half::f16::from_f32(x).to_f32(),
            CacheFormat::Bf16 => half::bf16::from_f32(x).to_f32(),
        }
    }
}
