// Weight decoding shared by every kernel that reads a weight matrix (prepended by the loader).
//
// A matrix is `rows x cols` elements, row-major, packed little-endian into u32 words; stacked
// experts follow each other `expert_stride` elements apart. FORMAT picks the element type, one of
// the FORMAT_* constants the loader prepends from the format table (src/format.rs):
//   f32, bf16, f16, FP8 e4m3 with block scales (W = code * scales[block]),
//   q8: int8 codes with a scale per 1x32 block (W = q * s),
//   q4: 4-bit codes, 8 per word low nibble first, with (scale, min) per 1x32 block (W = q * s + m).
// Scales form a `[ceil(rows/block_rows), grid_cols]` grid per expert (q4: pairs), `scale_expert_stride`
// values apart. GGUF's block formats keep theirs inside the blocks (ggml_blocks.wgsl); their
// layout's block is one row by one block's values.

override FORMAT: u32 = 0u;

// A matrix larger than one binding is split into row chunks: this chunk holds rows
// row0 .. row0 + rows of a matrix of total_rows rows (one chunk: row0 = 0, total_rows = rows).
struct WeightLayout {
    rows: u32,
    cols: u32,
    expert_stride: u32,
    scale_expert_stride: u32,
    grid_cols: u32,
    block_rows: u32,
    block_cols: u32,
    row0: u32,
    total_rows: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> wl: WeightLayout;
@group(0) @binding(1) var<storage, read> weights: array<u32>;
@group(0) @binding(2) var<storage, read> scales: array<f32>;

// Exact value of an e4m3fn code: bias 7, subnormals below exponent 1, 0x7f/0xff are NaN.
fn fp8_e4m3(code: u32) -> f32 {
    let e = (code >> 3u) & 0xfu;
    let m = code & 7u;
    if (e == 15u && m == 7u) {
        return bitcast<f32>(0x7fc00000u);
    }
    if (e == 0u) {
        let magnitude = f32(m) * 0.001953125; // m * 2^-9
        return select(magnitude, -magnitude, (code & 0x80u) != 0u);
    }
    return bitcast<f32>(((code & 0x80u) << 24u) | ((e + 120u) << 23u) | (m << 20u));
}

// Four e4m3fn codes (one word, little-endian) at once through f16: an e4m3 code's bits
// s.eeee.mmm placed as f16 s.0eeee.mmm0000000 give the same number times 2^-8, subnormals
// included (both formats' subnormals scale alike), so two integer shuffles and two
// unpack2x16float calls decode four values exactly; codes 0x7f/0xff are NaN.
fn fp8x4(word: u32) -> vec4<f32> {
    let b02 = word & 0x00ff00ffu;        // bytes 0 and 2, each in the low half of a 16-bit lane
    let b13 = (word >> 8u) & 0x00ff00ffu; // bytes 1 and 3
    let h02 = ((b02 & 0x007f007fu) << 7u) | ((b02 & 0x00800080u) << 8u);
    let h13 = ((b13 & 0x007f007fu) << 7u) | ((b13 & 0x00800080u) << 8u);
    let v02 = unpack2x16float(h02) * 256.0;
    let v13 = unpack2x16float(h13) * 256.0;
    let v = vec4<f32>(v02.x, v13.x, v02.y, v13.y);
    let nan = vec4<bool>((word & 0x7fu) == 0x7fu, ((word >> 8u) & 0x7fu) == 0x7fu, ((word >> 16u) & 0x7fu) == 0x7fu, (word >> 24u) == 0xffu || (word >> 24u) == 0x7fu);
    return select(v, vec4<f32>(bitcast<f32>(0x7fc00000u)), nan);
}

// GGUF's block formats (ggml_blocks.wgsl): codes and scales inside each block's bytes.
override BLOCKS: bool = FORMAT >= FIRST_BLOCK_FORMAT;

// Elements per lane step of the matmul: a word of f32/bf16/f16, four bytes of FP8/q8, four
// nibbles (half a word) of q4, four values of a block format.
override ELEMS: u32 = select(select(2u, 4u, FORMAT == FORMAT_FP8 || FORMAT == FORMAT_Q8 || FORMAT == FORMAT_Q4 || BLOCKS), 1u, FORMAT == FORMAT_F32);

fn signed_byte(word: u32, shift: u32) -> f32 {
    return f32(bitcast<i32>(word << (24u - shift)) >> 24u);
}

fn block_scale_index(e: u32, r: u32, c: u32) -> u32 {
    return e * wl.scale_expert_stride + (r / wl.block_rows) * wl.grid_cols + c / wl.block_cols;
}

// The ELEMS elements from step `wi` of row r of expert e (unused lanes of the vec4 are 0).
// Requires rows that start on a step boundary (cols % ELEMS == 0) and blocks of whole steps.
fn weight_word(e: u32, r: u32, wi: u32) -> vec4<f32> {
    let first = e * wl.expert_stride + r * wl.cols + wi * ELEMS;
    if (BLOCKS) {
        return block_step(first);
    }
    if (FORMAT == FORMAT_Q4) {
        let word = weights[first >> 3u] >> ((first & 7u) * 4u);
        let q = vec4<f32>(f32(word & 0xfu), f32((word >> 4u) & 0xfu), f32((word >> 8u) & 0xfu), f32((word >> 12u) & 0xfu));
        let g = e * wl.scale_expert_stride + 2u * ((r / wl.block_rows) * wl.grid_cols + (wi * 4u) / wl.block_cols);
        return q * scales[g] + scales[g + 1u];
    }
    return decode_word(weights[first / ELEMS], e, r, wi);
}

// The ELEMS elements of `word`, step `wi` of row r of expert e, for every format but q4 (whose
// steps are half words).
fn decode_word(word: u32, e: u32, r: u32, wi: u32) -> vec4<f32> {
    switch FORMAT {
        case FORMAT_Q8: {
            let s = scales[block_scale_index(e, r, wi * 4u)];
            return vec4<f32>(signed_byte(word, 0u), signed_byte(word, 8u), signed_byte(word, 16u), signed_byte(word, 24u)) * s;
        }
        case FORMAT_BF16: {
            return vec4<f32>(bitcast<f32>(word << 16u), bitcast<f32>(word & 0xffff0000u), 0.0, 0.0);
        }
        case FORMAT_F16: {
            return vec4<f32>(unpack2x16float(word), 0.0, 0.0);
        }
        case FORMAT_FP8: {
            let s = scales[block_scale_index(e, r, wi * 4u)];
            return fp8x4(word) * s;
        }
        default: {
            return vec4<f32>(bitcast<f32>(word), 0.0, 0.0, 0.0);
        }
    }
}

fn weight(e: u32, r: u32, c: u32) -> f32 {
    let i = e * wl.expert_stride + r * wl.cols + c;
    if (BLOCKS) {
        return block_step(i & ~3u)[i & 3u];
    }
    switch FORMAT {
        case FORMAT_BF16: {
            let word = weights[i >> 1u];
            return bitcast<f32>(select(word << 16u, word & 0xffff0000u, (i & 1u) == 1u));
        }
        case FORMAT_F16: {
            return unpack2x16float(weights[i >> 1u])[i & 1u];
        }
        case FORMAT_FP8: {
            let code = (weights[i >> 2u] >> ((i & 3u) * 8u)) & 0xffu;
            return fp8_e4m3(code) * scales[block_scale_index(e, r, c)];
        }
        case FORMAT_Q8: {
            return signed_byte(weights[i >> 2u], (i & 3u) * 8u) * scales[block_scale_index(e, r, c)];
        }
        case FORMAT_Q4: {
            let q = f32((weights[i >> 3u] >> ((i & 7u) * 4u)) & 0xfu);
            let g = e * wl.scale_expert_stride + 2u * ((r / wl.block_rows) * wl.grid_cols + c / wl.block_cols);
            return q * scales[g] + scales[g + 1u];
        }
        default: {
            return bitcast<f32>(weights[i]);
        }
    }
}
