//! ggml's i-quants (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) as GGUF files store
//! them: each group of 8 (IQ1/IQ2) or 4 (IQ3) values is an index into a codebook grid
//! (`iq_grids`, ggml's tables), with sign bits, a scale per 16 or 32 values and one f16 per
//! block of 256.
//!
//! A block unpacks to 256 signed byte codes and a scale per 16 values, `value = scale * code`:
//! the same numbers ggml's `dequantize_row_iq*` computes, exactly (its products are exact in
//! f32: an f16 times small integers and halves). IQ1's `dl * (grid + delta)` with delta = ±1/8
//! becomes `(dl / 8) * (8 grid ± 1)`, integer codes for the same products.

use super::iq_grids::*;
use super::DType;

/// Values in an i-quant block.
pub(crate) const BLOCK: usize = 256;

pub(crate) fn is_iq(dtype: DType) -> bool {
    matches!(dtype, DType::IQ1_S | DType::IQ1_M | DType::IQ2_XXS | DType::IQ2_XS | DType::IQ2_S | DType::IQ3_XXS | DType::IQ3_S)
}

/// The codebook `dtype` indexes, as little-endian u32 words (an IQ1/IQ2 entry is two words, an
/// IQ3 entry one): what the GPU kernels read beside the blocks.
pub fn grid_words(dtype: DType) -> Option<&'static [u32]> {
    match dtype {
        DType::IQ2_XXS => Some(bytemuck::cast_slice(&IQ2XXS_GRID)),
        DType::IQ2_XS => Some(bytemuck::cast_slice(&IQ2XS_GRID)),
        DType::IQ2_S => Some(bytemuck::cast_slice(&IQ2S_GRID)),
        DType::IQ3_XXS => Some(&IQ3XXS_GRID),
        DType::IQ3_S => Some(&IQ3S_GRID),
        DType::IQ1_S | DType::IQ1_M => Some(bytemuck::cast_slice(&IQ1S_GRID)),
        _ => None,
    }
}

fn f16_bits(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// ggml's `ksigns_iq2xs`: 7 stored sign bits and an eighth that makes their count even.
fn signs8(seven: u32) -> u32 {
    seven | ((seven.count_ones() & 1) << 7)
}

/// For each 8 sign bits, a byte of ones where a bit is set (`SIGN_MASKS[s]` byte j = -(bit j)).
const SIGN_MASKS: [u64; 256] = {
    let mut masks = [0u64; 256];
    let mut s = 0;
    while s < 256 {
        let mut j = 0;
        while j < 8 {
            if s & (1 << j) != 0 {
                masks[s] |= 0xff << (8 * j);
            }
            j += 1;
        }
        s += 1;
    }
    masks
};

/// Eight codes from a grid entry (its bytes, little-endian), negated where `signs` has a bit,
/// eight at once in a u64: per byte -g = (g ^ 0xff) + 1. No IQ2/IQ3 grid value is 0
/// (`grids_have_no_zero_magnitude`), so g ^ 0xff <= 0xfe and the + 1 never carries into the
/// next byte.
fn signed(grid: u64, signs: u32) -> u64 {
    let m = SIGN_MASKS[(signs & 0xff) as usize];
    (grid ^ m) + (m & 0x0101_0101_0101_0101)
}

/// IQ1's eight codes `8 grid + delta` (grid bytes -1, 0, 1; delta ±1) as a u64 of bytes.
fn iq1_codes(grid: u64, delta: i8) -> u64 {
    u64::from_le_bytes(grid.to_le_bytes().map(|g| (8 * (g as i8) + delta) as u8))
}

/// Unpacks one block of an i-quant (`dequantize_row_iq*` in ggml-quants.c) into its codes,
/// eight signed bytes a u64 (`c[k]`: values 8k .. 8k + 8, little-endian), and its scale per 16
/// values.
#[inline(always)] // inside the CPU kernels' SIMD-level code
pub(crate) fn unpack(dtype: DType, b: &[u8], c: &mut [u64; BLOCK / 8], scales: &mut [f32; 16]) {
    match dtype {
        DType::IQ2_XXS => {
            // d, then per 32 values two words: four grid indices (bytes); four 7-bit signs and a
            // 4-bit scale on top.
            let d = f16_bits(u16_at(b, 0));
            for ib in 0..8 {
                let (idx, high) = (u32_at(b, 2 + 8 * ib), u32_at(b, 6 + 8 * ib));
                let db = d * (0.5 + (high >> 28) as f32) * 0.25;
                for l in 0..4 {
                    let grid = IQ2XXS_GRID[((idx >> (8 * l)) & 0xff) as usize];
                    c[4 * ib + l] = signed(grid, signs8((high >> (7 * l)) & 127));
                }
                scales[2 * ib] = db;
                scales[2 * ib + 1] = db;
            }
        }
        DType::IQ2_XS => {
            // d, 32 u16 (9-bit grid index, 7-bit signs), 8 bytes of two 4-bit scales per 32.
            let d = f16_bits(u16_at(b, 0));
            for ib in 0..8 {
                let sc = b[66 + ib] as u32;
                for l in 0..4 {
                    let q = u16_at(b, 2 + 2 * (4 * ib + l)) as u32;
                    c[4 * ib + l] = signed(IQ2XS_GRID[(q & 511) as usize], signs8(q >> 9));
                }
                scales[2 * ib] = d * (0.5 + (sc & 0xf) as f32) * 0.25;
                scales[2 * ib + 1] = d * (0.5 + (sc >> 4) as f32) * 0.25;
            }
        }
        DType::IQ2_S => {
            // d, 32 bytes of grid index low bits, 32 of signs, 8 of two-bit index tops, 8 of
            // two 4-bit scales per 32.
            let d = f16_bits(u16_at(b, 0));
            for ib in 0..8 {
                let (qh, sc) = (b[66 + ib] as u32, b[74 + ib] as u32);
                for l in 0..4 {
                    let index = b[2 + 4 * ib + l] as u32 | ((qh << (8 - 2 * l)) & 0x300);
                    c[4 * ib + l] = signed(IQ2S_GRID[index as usize], b[34 + 4 * ib + l] as u32);
                }
                scales[2 * ib] = d * (0.5 + (sc & 0xf) as f32) * 0.25;
                scales[2 * ib + 1] = d * (0.5 + (sc >> 4) as f32) * 0.25;
            }
        }
        DType::IQ3_XXS => {
            // d, 64 grid indices (4 values each), per 32 values a word of four 7-bit signs and
            // a 4-bit scale on top.
            let d = f16_bits(u16_at(b, 0));
            for ib in 0..8 {
                let aux = u32_at(b, 66 + 4 * ib);
                let db = d * (0.5 + (aux >> 28) as f32) * 0.5;
                for l in 0..4 {
                    let grid = IQ3XXS_GRID[b[2 + 8 * ib + 2 * l] as usize] as u64 | (IQ3XXS_GRID[b[3 + 8 * ib + 2 * l] as usize] as u64) << 32;
                    c[4 * ib + l] = signed(grid, signs8((aux >> (7 * l)) & 127));
                }
                scales[2 * ib] = db;
                scales[2 * ib + 1] = db;
            }
        }
        DType::IQ3_S => {
            // d, 64 grid index low bytes, 8 bytes of index ninth bits, 32 of signs, 4 of two
            // 4-bit scales per 64.
            let d = f16_bits(u16_at(b, 0));
            for ib in 0..8 {
                let qh = b[66 + ib] as u32;
                for l in 0..4 {
                    let i1 = b[2 + 8 * ib + 2 * l] as u32 | ((qh << (8 - 2 * l)) & 256);
                    let i2 = b[3 + 8 * ib + 2 * l] as u32 | ((qh << (7 - 2 * l)) & 256);
                    let grid = IQ3S_GRID[i1 as usize] as u64 | (IQ3S_GRID[i2 as usize] as u64) << 32;
                    c[4 * ib + l] = signed(grid, b[74 + 4 * ib + l] as u32);
                }
                let sc = (b[106 + ib / 2] >> (4 * (ib % 2))) & 0xf;
                scales[2 * ib] = d * (1 + 2 * sc as i32) as f32;
                scales[2 * ib + 1] = scales[2 * ib];
            }
        }
        DType::IQ1_S => {
            // d, 32 grid index low bytes, per 32 values a u16: four 3-bit index tops, a 3-bit
            // scale, the delta's sign on top.
            let d = f16_bits(u16_at(b, 0));
            for ib in 0..8 {
                let qh = u16_at(b, 34 + 2 * ib) as u32;
                let delta: i8 = if qh & 0x8000 != 0 { -1 } else { 1 };
                for l in 0..4 {
                    let index = b[2 + 4 * ib + l] as u32 | (((qh >> (3 * l)) & 7) << 8);
                    c[4 * ib + l] = iq1_codes(IQ1S_GRID[index as usize], delta);
                }
                let dl = d * (2 * ((qh >> 12) & 7) + 1) as f32;
                scales[2 * ib] = dl / 8.0;
                scales[2 * ib + 1] = dl / 8.0;
            }
        }
        DType::IQ1_M => {
            // 32 grid index low bytes, per 8 values half a byte (3-bit index top, delta sign),
            // 8 bytes of 3-bit scales per 16 values whose top nibbles form the block's f16.
            let sc = [u16_at(b, 48), u16_at(b, 50), u16_at(b, 52), u16_at(b, 54)];
            let d = f16_bits((sc[0] >> 12) | ((sc[1] >> 8) & 0x00f0) | ((sc[2] >> 4) & 0x0f00) | (sc[3] & 0xf000));
            for ib in 0..8 {
                for l in 0..4 {
                    let half = (b[32 + 2 * ib + l / 2] >> (4 * (l % 2))) as u32;
                    let index = b[4 * ib + l] as u32 | ((half & 7) << 8);
                    let delta: i8 = if half & 8 != 0 { -1 } else { 1 };
                    c[4 * ib + l] = iq1_codes(IQ1S_GRID[index as usize], delta);
                }
                for h in 0..2 {
                    let s = (sc[ib / 2] >> (6 * (ib % 2) + 3 * h)) & 7;
                    scales[2 * ib + h] = d * (2 * s + 1) as f32 / 8.0;
                }
            }
        }
        _ => unreachable!("{dtype:?} is not an i-quant"),
    }
}

/// Decodes one block into its 256 values.
#[inline(always)] // inside the CPU kernels' SIMD-level code (the several-token panels)
pub(crate) fn decode(dtype: DType, b: &[u8], y: &mut [f32]) {
    let (mut codes, mut scales) = ([0u64; BLOCK / 8], [0f32; 16]);
    unpack(dtype, b, &mut codes, &mut scales);
    // Bytes first, then one pass that vectorises (measured faster in prefill panels than
    // converting each u64's bytes in place).
    let mut bytes = [0i8; BLOCK];
    for (b, c) in bytes.chunks_exact_mut(8).zip(codes) {
        b.copy_from_slice(&c.to_le_bytes().map(|v| v as i8));
    }
    for (i, (y, &c)) in y.iter_mut().zip(&bytes).enumerate() {
        *y = scales[i / 16] * c as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `signed`'s carry-free negation needs every magnitude nonzero and below 128.
    #[test]
    fn grids_have_no_zero_magnitude() {
        let bytes = IQ2XXS_GRID.iter().chain(&IQ2XS_GRID).chain(&IQ2S_GRID).flat_map(|g| g.to_le_bytes());
        let bytes = bytes.chain(IQ3XXS_GRID.iter().chain(&IQ3S_GRID).flat_map(|g| g.to_le_bytes()));
        for b in bytes {
            assert!((1..128).contains(&b), "{b:#04x}");
        }
        for signs in 0..256u32 {
            let codes = signed(IQ2S_GRID[signs as usize * 3], signs).to_le_bytes().map(|b| b as i8);
            let grid = IQ2S_GRID[signs as usize * 3].to_le_bytes();
            let want: Vec<i8> = (0..8).map(|j| if signs & (1 << j) != 0 { -(grid[j] as i8) } else { grid[j] as i8 }).collect();
            assert_eq!(codes.to_vec(), want, "signs {signs:#010b}");
        }
    }
}
