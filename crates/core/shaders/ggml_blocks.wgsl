// GGUF's block formats (ggml's layouts; docs/gguf.md) decoded inside the kernels, as stored:
// each block holds its values' codes and scales in a fixed number of bytes (the format table's
// FORMAT_*_BYTES), blocks back to back, every row whole blocks. Prepended after weights.wgsl,
// whose weight_word/weight call `block_step` when FORMAT is a block format.
//
// Each format decodes in ggml's own order of operations (dequantize_row_* in ggml-quants.c), so
// a value equals gguf-py's and the CPU reference's: scales times codes are exact in f32 (an f16
// times a small integer); only `dl * q - ml` rounds, once, as ggml's does.

// IQ4_NL / IQ4_XS's 16 levels (ggml's kvalues_iq4nl) as signed bytes, four a word (a vector:
// WGSL indexes vector components at run time without spilling a constant array).
const IQ4_LEVEL_WORDS = vec4<u32>(0xbfad9881u, 0xf6eaddcfu, 0x26190d01u, 0x71594535u);

fn iq4_level(n: u32) -> f32 {
    return f32(bitcast<i32>(IQ4_LEVEL_WORDS[n >> 2u] << (24u - 8u * (n & 3u))) >> 24u);
}

fn iq4_levels(codes: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(iq4_level(codes.x), iq4_level(codes.y), iq4_level(codes.z), iq4_level(codes.w));
}

fn byte_at(o: u32) -> u32 {
    return (weights[o >> 2u] >> ((o & 3u) * 8u)) & 0xffu;
}

// The f16 at byte o (o even).
fn half_at(o: u32) -> f32 {
    return unpack2x16float(weights[o >> 2u] >> ((o & 2u) * 8u)).x;
}

// The four bytes from byte o on (any alignment), byte o lowest.
fn bytes4_at(o: u32) -> u32 {
    let shift = (o & 3u) * 8u;
    let low = weights[o >> 2u];
    if (shift == 0u) {
        return low;
    }
    return (low >> shift) | (weights[(o >> 2u) + 1u] << (32u - shift));
}

// A bit field of each of a word's four bytes: (byte k >> shift) & mask.
fn fields(word: u32, shift: u32, mask: u32) -> vec4<u32> {
    return (vec4<u32>(word) >> (vec4<u32>(0u, 8u, 16u, 24u) + shift)) & vec4<u32>(mask);
}

fn signed_bytes(word: u32) -> vec4<f32> {
    return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(word) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u));
}

// Q4_K / Q5_K's 6-bit (scale, min) of sub-block j from the 12 bytes at s (ggml's get_scale_min_k4).
fn scale_min_k4(s: u32, j: u32) -> vec2<f32> {
    if (j < 4u) {
        return vec2<f32>(f32(byte_at(s + j) & 63u), f32(byte_at(s + j + 4u) & 63u));
    }
    let sc = (byte_at(s + j + 4u) & 0xfu) | ((byte_at(s + j - 4u) >> 6u) << 4u);
    let m = (byte_at(s + j + 4u) >> 4u) | ((byte_at(s + j) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(m));
}

// Q3_K's signed 6-bit scale of sub-block j from the 12 bytes at s: the low four bits from
// byte j % 8 (its high nibble for j >= 8), the high two from byte 8 + j % 4 (bits 2 (j / 4)).
fn q3_k_scale(s: u32, j: u32) -> f32 {
    let low = (byte_at(s + j % 8u) >> (4u * (j / 8u))) & 0xfu;
    let high = (byte_at(s + 8u + j % 4u) >> (2u * (j / 4u))) & 3u;
    return f32(i32(low | (high << 4u)) - 32);
}

// The i-quants' codebook grid (quant/iq_grids.rs), which the host puts where other formats'
// scales go: word w of it (IQ1/IQ2 entry e is words 2e and 2e + 1, four grid bytes each; an
// IQ3 entry is one word).
fn grid_word(w: u32) -> u32 {
    return bitcast<u32>(scales[w]);
}

// The signs (+-1) of values k .. k + 3 of a group of 8 from its eight sign bits.
fn signs_of(eight: u32, k: u32) -> vec4<f32> {
    let bits = (vec4<u32>(eight) >> (vec4<u32>(0u, 1u, 2u, 3u) + k)) & vec4<u32>(1u);
    return select(vec4<f32>(1.0), vec4<f32>(-1.0), bits == vec4<u32>(1u));
}

// `signs_of` where 7 sign bits are stored: ggml's ksigns_iq2xs adds the eighth that makes
// their count even.
fn signs4(seven: u32, k: u32) -> vec4<f32> {
    return signs_of(seven | ((countOneBits(seven) & 1u) << 7u), k);
}

// An unsigned grid word's four bytes.
fn grid_bytes(word: u32) -> vec4<f32> {
    return vec4<f32>(fields(word, 0u, 0xffu));
}

// Values i .. i + 3 (i a multiple of 4) of the block stream: element i of the matrix stack.
// Four consecutive values always share a sub-block (its scales) and a code byte position (the
// i-quants: a group of 8, or IQ3's grid entry of 4).
fn block_step(i: u32) -> vec4<f32> {
    switch FORMAT {
        case FORMAT_Q8_0: {
            // f16 d, 32 signed codes.
            let o = (i / 32u) * FORMAT_Q8_0_BYTES;
            return signed_bytes(bytes4_at(o + 2u + i % 32u)) * half_at(o);
        }
        case FORMAT_Q4_0: {
            // f16 d, 16 bytes: value j in the low nibbles for j < 16, the high ones after.
            let o = (i / 32u) * FORMAT_Q4_0_BYTES;
            let j = i % 32u;
            return (vec4<f32>(fields(bytes4_at(o + 2u + j % 16u), 4u * (j / 16u), 0xfu)) - 8.0) * half_at(o);
        }
        case FORMAT_Q4_1: {
            // f16 d, f16 m, 16 bytes of nibbles as Q4_0: q d + m.
            let o = (i / 32u) * FORMAT_Q4_1_BYTES;
            let j = i % 32u;
            return vec4<f32>(fields(bytes4_at(o + 4u + j % 16u), 4u * (j / 16u), 0xfu)) * half_at(o) + half_at(o + 2u);
        }
        case FORMAT_Q5_0: {
            // f16 d, 32 high bits (value j's is bit j), nibbles as Q4_0: (q - 16) d.
            let o = (i / 32u) * FORMAT_Q5_0_BYTES;
            let j = i % 32u;
            let high = (vec4<u32>(bytes4_at(o + 2u)) >> (vec4<u32>(0u, 1u, 2u, 3u) + j)) & vec4<u32>(1u);
            let q = fields(bytes4_at(o + 6u + j % 16u), 4u * (j / 16u), 0xfu) | (high << vec4<u32>(4u));
            return (vec4<f32>(q) - 16.0) * half_at(o);
        }
        case FORMAT_Q5_1: {
            // f16 d, f16 m, high bits and nibbles as Q5_0: q d + m.
            let o = (i / 32u) * FORMAT_Q5_1_BYTES;
            let j = i % 32u;
            let high = (vec4<u32>(bytes4_at(o + 4u)) >> (vec4<u32>(0u, 1u, 2u, 3u) + j)) & vec4<u32>(1u);
            let q = fields(bytes4_at(o + 8u + j % 16u), 4u * (j / 16u), 0xfu) | (high << vec4<u32>(4u));
            return vec4<f32>(q) * half_at(o) + half_at(o + 2u);
        }
        case FORMAT_Q2_K: {
            // 16 scale bytes (low nibble scale, high nibble min, per 16 values), 64 bytes of
            // 2-bit codes (each half of the block: code byte l's bit pair 2 (w / 32) holds value
            // w of the half, l = w % 32), f16 d, f16 dmin: d sc q - dmin m.
            let o = (i / 256u) * FORMAT_Q2_K_BYTES;
            let half = (i % 256u) / 128u;
            let w = i % 128u;
            let l = w % 32u;
            let sc = byte_at(o + 8u * half + 2u * (w / 32u) + l / 16u);
            let q = vec4<f32>(fields(bytes4_at(o + 16u + 32u * half + l), 2u * (w / 32u), 3u));
            return (half_at(o + 80u) * f32(sc & 0xfu)) * q - half_at(o + 82u) * f32(sc >> 4u);
        }
        case FORMAT_Q3_K: {
            // 32 bytes of high-bit masks, 64 bytes of 2-bit codes (laid out as Q2_K's), 12 bytes
            // of 6-bit scales, f16 d: d (scale - 32) (q - 4 where the mask bit is clear).
            let o = (i / 256u) * FORMAT_Q3_K_BYTES;
            let half = (i % 256u) / 128u;
            let w = i % 128u;
            let l = w % 32u;
            let low = vec4<f32>(fields(bytes4_at(o + 32u + 32u * half + l), 2u * (w / 32u), 3u));
            let high = fields(bytes4_at(o + l), 4u * half + w / 32u, 1u);
            let q = low - select(vec4<f32>(4.0), vec4<f32>(0.0), high == vec4<u32>(1u));
            return (half_at(o + 108u) * q3_k_scale(o + 96u, 8u * half + 2u * (w / 32u) + l / 16u)) * q;
        }
        case FORMAT_Q4_K: {
            // f16 d, f16 dmin, 12 bytes of 6-bit (scale, min) per 32 values, 128 bytes of
            // nibbles (each 64 values: the low nibbles of 32 bytes, then their high ones).
            let o = (i / 256u) * FORMAT_Q4_K_BYTES;
            let j = i % 256u;
            let sub = j / 32u;
            let sm = scale_min_k4(o + 4u, sub);
            let q = vec4<f32>(fields(bytes4_at(o + 16u + 32u * (j / 64u) + j % 32u), 4u * (sub % 2u), 0xfu));
            return (half_at(o) * sm.x) * q - half_at(o + 2u) * sm.y;
        }
        case FORMAT_Q5_K: {
            // Q4_K's fields with 32 bytes of fifth bits before the nibbles (value j's in bit
            // j / 32 of byte j % 32).
            let o = (i / 256u) * FORMAT_Q5_K_BYTES;
            let j = i % 256u;
            let sub = j / 32u;
            let sm = scale_min_k4(o + 4u, sub);
            let low = fields(bytes4_at(o + 48u + 32u * (j / 64u) + j % 32u), 4u * (sub % 2u), 0xfu);
            let high = fields(bytes4_at(o + 16u + j % 32u), sub, 1u);
            let q = vec4<f32>(low | (high << vec4<u32>(4u)));
            return (half_at(o) * sm.x) * q - half_at(o + 2u) * sm.y;
        }
        case FORMAT_Q6_K: {
            // 128 bytes of low nibbles, 64 bytes of high bit pairs, 16 signed scales (per 16
            // values), f16 d: d sc (q - 32). Each half of the block: value w's low nibble in
            // byte w % 64 (its high nibble for w >= 64), its high pair in byte w % 32 at bits
            // 2 (w / 32).
            let o = (i / 256u) * FORMAT_Q6_K_BYTES;
            let half = (i % 256u) / 128u;
            let w = i % 128u;
            let quarter = w / 32u;
            let l = w % 32u;
            let low = fields(bytes4_at(o + 64u * half + 32u * (quarter % 2u) + l), 4u * (quarter / 2u), 0xfu);
            let high = fields(bytes4_at(o + 128u + 32u * half + l), 2u * quarter, 3u);
            let q = vec4<f32>(low | (high << vec4<u32>(4u))) - 32.0;
            let sc = f32(bitcast<i32>(byte_at(o + 192u + 8u * half + 2u * quarter + l / 16u) << 24u) >> 24u);
            return (half_at(o + 208u) * sc) * q;
        }
        case FORMAT_IQ4_NL: {
            // Q4_0's layout, the nibbles indexing the 16 levels: d level.
            let o = (i / 32u) * FORMAT_IQ4_NL_BYTES;
            let j = i % 32u;
            return half_at(o) * iq4_levels(fields(bytes4_at(o + 2u + j % 16u), 4u * (j / 16u), 0xfu));
        }
        case FORMAT_IQ4_XS: {
            // f16 d, 16 bits of scales' high pairs, 4 bytes of their low nibbles, 128 bytes of
            // level indices (each 32 values: Q4_0's nibble order): d (scale - 32) level.
            let o = (i / 256u) * FORMAT_IQ4_XS_BYTES;
            let j = i % 256u;
            let sub = j / 32u;
            let scales_high = byte_at(o + 2u) | (byte_at(o + 3u) << 8u);
            let ls = ((byte_at(o + 4u + sub / 2u) >> (4u * (sub % 2u))) & 0xfu) | (((scales_high >> (2u * sub)) & 3u) << 4u);
            let codes = fields(bytes4_at(o + 8u + 16u * sub + j % 16u), 4u * ((j % 32u) / 16u), 0xfu);
            return (half_at(o) * f32(i32(ls) - 32)) * iq4_levels(codes);
        }
        case FORMAT_IQ2_XXS: {
            // f16 d, per 32 values two words: four grid indices; four 7-bit signs and a 4-bit
            // scale on top: d (0.5 + s) / 4 grid sign.
            let o = (i / 256u) * FORMAT_IQ2_XXS_BYTES;
            let j = i % 256u;
            let ib = j / 32u;
            let l = (j % 32u) / 8u;
            let high = bytes4_at(o + 6u + 8u * ib);
            let index = (bytes4_at(o + 2u + 8u * ib) >> (8u * l)) & 0xffu;
            let db = half_at(o) * (0.5 + f32(high >> 28u)) * 0.25;
            return db * grid_bytes(grid_word(2u * index + (j % 8u) / 4u)) * signs4((high >> (7u * l)) & 127u, j % 8u);
        }
        case FORMAT_IQ2_XS: {
            // f16 d, 32 u16 (9-bit grid index, 7-bit signs), 8 bytes of two 4-bit scales per 32.
            let o = (i / 256u) * FORMAT_IQ2_XS_BYTES;
            let j = i % 256u;
            let ib = j / 32u;
            let l = (j % 32u) / 8u;
            let q = bytes4_at(o + 2u + 2u * (4u * ib + l)) & 0xffffu;
            let db = half_at(o) * (0.5 + f32((byte_at(o + 66u + ib) >> (4u * (l / 2u))) & 0xfu)) * 0.25;
            return db * grid_bytes(grid_word(2u * (q & 511u) + (j % 8u) / 4u)) * signs4(q >> 9u, j % 8u);
        }
        case FORMAT_IQ2_S: {
            // f16 d, 32 bytes of grid index low bits, 32 of signs, 8 of two-bit index tops, 8 of
            // two 4-bit scales per 32.
            let o = (i / 256u) * FORMAT_IQ2_S_BYTES;
            let j = i % 256u;
            let ib = j / 32u;
            let l = (j % 32u) / 8u;
            let index = byte_at(o + 2u + 4u * ib + l) | ((byte_at(o + 66u + ib) << (8u - 2u * l)) & 0x300u);
            let db = half_at(o) * (0.5 + f32((byte_at(o + 74u + ib) >> (4u * (l / 2u))) & 0xfu)) * 0.25;
            return db * grid_bytes(grid_word(2u * index + (j % 8u) / 4u)) * signs_of(byte_at(o + 34u + 4u * ib + l), j % 8u);
        }
        case FORMAT_IQ3_XXS: {
            // f16 d, 64 grid indices (4 values each), per 32 values a word of four 7-bit signs
            // and a 4-bit scale on top: d (0.5 + s) / 2 grid sign.
            let o = (i / 256u) * FORMAT_IQ3_XXS_BYTES;
            let j = i % 256u;
            let ib = j / 32u;
            let aux = bytes4_at(o + 66u + 4u * ib);
            let db = half_at(o) * (0.5 + f32(aux >> 28u)) * 0.5;
            let index = byte_at(o + 2u + 8u * ib + (j % 32u) / 4u);
            return db * grid_bytes(grid_word(index)) * signs4((aux >> (7u * ((j % 32u) / 8u))) & 127u, j % 8u);
        }
        case FORMAT_IQ3_S: {
            // f16 d, 64 grid index low bytes, 8 bytes of index ninth bits, 32 of signs, 4 of two
            // 4-bit scales per 64: d (1 + 2 s) grid sign.
            let o = (i / 256u) * FORMAT_IQ3_S_BYTES;
            let j = i % 256u;
            let ib = j / 32u;
            let l = (j % 32u) / 8u;
            let second = (j % 8u) / 4u;
            let index = byte_at(o + 2u + 8u * ib + 2u * l + second) | ((byte_at(o + 66u + ib) << (8u - 2u * l - second)) & 256u);
            let db = half_at(o) * f32(1u + 2u * ((byte_at(o + 106u + ib / 2u) >> (4u * (ib % 2u))) & 0xfu));
            return db * grid_bytes(grid_word(index)) * signs_of(byte_at(o + 74u + 4u * ib + l), j % 8u);
        }
        case FORMAT_IQ1_S: {
            // f16 d, 32 grid index low bytes, per 32 values a u16: four 3-bit index tops, a 3-bit
            // scale, the delta's sign on top: d (2 s + 1) (grid ± 1/8), grid values -1, 0, 1.
            let o = (i / 256u) * FORMAT_IQ1_S_BYTES;
            let j = i % 256u;
            let ib = j / 32u;
            let l = (j % 32u) / 8u;
            let qh = bytes4_at(o + 34u + 2u * ib) & 0xffffu;
            let index = byte_at(o + 2u + 4u * ib + l) | (((qh >> (3u * l)) & 7u) << 8u);
            let dl = half_at(o) * f32(2u * ((qh >> 12u) & 7u) + 1u);
            let delta = select(0.125, -0.125, (qh & 0x8000u) != 0u);
            return dl * (signed_bytes(grid_word(2u * index + (j % 8u) / 4u)) + delta);
        }
        case FORMAT_IQ1_M: {
            // 32 grid index low bytes, per 8 values half a byte (3-bit index top, delta sign),
            // 8 bytes of 3-bit scales per 16 values whose top nibbles form the block's f16.
            let o = (i / 256u) * FORMAT_IQ1_M_BYTES;
            let j = i % 256u;
            let ib = j / 32u;
            let l = (j % 32u) / 8u;
            let s01 = bytes4_at(o + 48u);
            let s23 = bytes4_at(o + 52u);
            let bits = ((s01 >> 12u) & 0xfu) | ((s01 >> 24u) & 0xf0u) | ((s23 >> 4u) & 0xf00u) | ((s23 >> 16u) & 0xf000u);
            let d = unpack2x16float(bits).x;
            let half = (byte_at(o + 32u + 2u * ib + l / 2u) >> (4u * (l % 2u))) & 0xfu;
            let index = byte_at(o + 4u * ib + l) | ((half & 7u) << 8u);
            let sc = (select(s01, s23, ib >= 4u) >> (16u * ((ib / 2u) % 2u))) & 0xffffu;
            let dl = d * f32(2u * ((sc >> (6u * (ib % 2u) + 3u * (l / 2u))) & 7u) + 1u);
            let delta = select(0.125, -0.125, (half & 8u) != 0u);
            return dl * (signed_bytes(grid_word(2u * index + (j % 8u) / 4u)) + delta);
        }
        default: {
            return vec4<f32>(0.0);
        }
    }
}
