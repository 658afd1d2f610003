//! Weight number formats as stored in checkpoints and their exact conversion to f32.
//!
//! FP8 here is e4m3fn (as published by DeepSeek): 1 sign bit, 4 exponent bits (bias 7), 3 mantissa
//! bits, no infinities, 0x7f/0xff are NaN, largest finite 448, subnormals when the exponent is 0.
//! Block-scaled FP8 matrices carry a `weight_scale_inv` grid: `W[r,c] = f32(Wq[r,c]) * S[r/br, c/bc]`.

use std::sync::OnceLock;

/// Element types a checkpoint tensor may have (the subset dsrun reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    F8E4M3,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F8E4M3 => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8E4M3 => "F8_E4M3",
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
pub fn decode_into(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(bytes.len(), out.len() * dtype.size_bytes());
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
    }
}

pub fn decode_vec(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0.0; bytes.len() / dtype.size_bytes()];
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
