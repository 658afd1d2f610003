// GGUF's block formats (ggml's layouts; docs/gguf.md) decoded inside the kernels, as stored,
// the twin of shaders/ggml_blocks.wgsl: each block holds its values' codes and scales in
// FORMAT_*_BYTES bytes, blocks back to back, every row whole blocks. Appended after common.cuh,
// whose weights4/weight1 call `block_step` when FORMAT is a block format.
//
// Each format decodes in ggml's own order of operations (dequantize_row_* in ggml-quants.c), so
// a value equals gguf-py's and the CPU reference's: scales times codes are exact in f32 (an f16
// times a small integer); only `dl * q - ml` rounds, once, as ggml's does.

#if FORMAT >= FIRST_BLOCK_FORMAT

// Bytes per block of this FORMAT.
#if FORMAT == FORMAT_Q8_0
#define BLOCK_BYTES FORMAT_Q8_0_BYTES
#elif FORMAT == FORMAT_Q4_0
#define BLOCK_BYTES FORMAT_Q4_0_BYTES
#elif FORMAT == FORMAT_Q4_1
#define BLOCK_BYTES FORMAT_Q4_1_BYTES
#elif FORMAT == FORMAT_Q5_0
#define BLOCK_BYTES FORMAT_Q5_0_BYTES
#elif FORMAT == FORMAT_Q5_1
#define BLOCK_BYTES FORMAT_Q5_1_BYTES
#elif FORMAT == FORMAT_Q2_K
#define BLOCK_BYTES FORMAT_Q2_K_BYTES
#elif FORMAT == FORMAT_Q3_K
#define BLOCK_BYTES FORMAT_Q3_K_BYTES
#elif FORMAT == FORMAT_Q4_K
#define BLOCK_BYTES FORMAT_Q4_K_BYTES
#elif FORMAT == FORMAT_Q5_K
#define BLOCK_BYTES FORMAT_Q5_K_BYTES
#elif FORMAT == FORMAT_Q6_K
#define BLOCK_BYTES FORMAT_Q6_K_BYTES
#elif FORMAT == FORMAT_IQ4_NL
#define BLOCK_BYTES FORMAT_IQ4_NL_BYTES
#elif FORMAT == FORMAT_IQ4_XS
#define BLOCK_BYTES FORMAT_IQ4_XS_BYTES
#elif FORMAT == FORMAT_IQ2_XXS
#define BLOCK_BYTES FORMAT_IQ2_XXS_BYTES
#elif FORMAT == FORMAT_IQ2_XS
#define BLOCK_BYTES FORMAT_IQ2_XS_BYTES
#elif FORMAT == FORMAT_IQ2_S
#define BLOCK_BYTES FORMAT_IQ2_S_BYTES
#elif FORMAT == FORMAT_IQ3_XXS
#define BLOCK_BYTES FORMAT_IQ3_XXS_BYTES
#elif FORMAT == FORMAT_IQ3_S
#define BLOCK_BYTES FORMAT_IQ3_S_BYTES
#elif FORMAT == FORMAT_IQ1_S
#define BLOCK_BYTES FORMAT_IQ1_S_BYTES
#elif FORMAT == FORMAT_IQ1_M
#define BLOCK_BYTES FORMAT_IQ1_M_BYTES
#else
#error "a block format without a decoder here"
#endif

__device__ __forceinline__ u32 byte_at(const u32* __restrict__ w, u64 o) { return (w[o >> 2] >> ((u32)(o & 3u) * 8u)) & 0xffu; }

// The f16 at byte o (o even).
__device__ __forceinline__ float half_at(const u32* __restrict__ w, u64 o) { return f16_to_f32((w[o >> 2] >> ((u32)(o & 2u) * 8u)) & 0xffffu); }

// The four bytes from byte o on (any alignment), byte o lowest.
__device__ __forceinline__ u32 bytes4_at(const u32* __restrict__ w, u64 o) {
    const u32 shift = (u32)(o & 3u) * 8u;
    const u32 low = w[o >> 2];
    return shift == 0u ? low : (low >> shift) | (w[(o >> 2) + 1] << (32u - shift));
}

// Field k of the result: (byte k of word >> shift) & mask, as a float.
__device__ __forceinline__ float4 fields(u32 word, u32 shift, u32 mask) {
    return make_float4((float)((word >> shift) & mask), (float)((word >> (8u + shift)) & mask), (float)((word >> (16u + shift)) & mask),
                       (float)((word >> (24u + shift)) & mask));
}

__device__ __forceinline__ float4 scale4(float4 v, float k) { return make_float4(v.x * k, v.y * k, v.z * k, v.w * k); }

// k q - m for each q (ggml's `d1 * q - m1`: one product, one rounding of the difference).
__device__ __forceinline__ float4 scale_min4(float4 q, float k, float m) { return make_float4(k * q.x - m, k * q.y - m, k * q.z - m, k * q.w - m); }

// IQ4_NL / IQ4_XS's 16 levels (ggml's kvalues_iq4nl) as signed bytes, four a word, selected
// by shifts (a local array indexed at run time would live in a thread's local memory), as
// shaders/ggml_blocks.wgsl does.
__device__ __forceinline__ float iq4_level(u32 n) {
    const u32 word = n < 8u ? (n < 4u ? 0xbfad9881u : 0xf6eaddcfu) : (n < 12u ? 0x26190d01u : 0x71594535u);
    return (float)((int)(word << (24u - 8u * (n & 3u))) >> 24);
}

__device__ __forceinline__ float4 iq4_levels(u32 word, u32 shift) {
    return make_float4(iq4_level((word >> shift) & 0xfu), iq4_level((word >> (8u + shift)) & 0xfu), iq4_level((word >> (16u + shift)) & 0xfu),
                       iq4_level((word >> (24u + shift)) & 0xfu));
}

// Q4_K / Q5_K's 6-bit scale (k = 0) or min (k = 1) of sub-block j from the 12 bytes at s
// (ggml's get_scale_min_k4).
__device__ __forceinline__ float scale_min_k4(const u32* __restrict__ w, u64 s, u32 j, u32 k) {
    if (j < 4u) return (float)(byte_at(w, s + j + 4u * k) & 63u);
    return k == 0u ? (float)((byte_at(w, s + j + 4u) & 0xfu) | ((byte_at(w, s + j - 4u) >> 6) << 4))
                   : (float)((byte_at(w, s + j + 4u) >> 4) | ((byte_at(w, s + j) >> 6) << 4));
}

// The i-quants' codebook grid (quant/iq_grids.rs), which the host puts where other formats'
// scales go: word k of it (IQ1/IQ2 entry e is words 2e and 2e + 1, four grid bytes each; an
// IQ3 entry is one word).
__device__ __forceinline__ u32 grid_word(const float* __restrict__ s, u32 k) { return __float_as_uint(s[k]); }

// Sign bits k .. k + 3 of a group's eight as +-1 (IQ2_XXS, IQ2_XS, IQ3_XXS store seven; ggml's
// ksigns_iq2xs adds the eighth that makes their count even: `signs8`).
__device__ __forceinline__ u32 signs8(u32 seven) {
    u32 parity = seven ^ (seven >> 4);
    parity ^= parity >> 2;
    parity ^= parity >> 1;
    return seven | ((parity & 1u) << 7);
}

__device__ __forceinline__ float4 with_signs(float4 v, u32 signs, u32 k) {
    return make_float4((signs >> k) & 1u ? -v.x : v.x, (signs >> (k + 1u)) & 1u ? -v.y : v.y, (signs >> (k + 2u)) & 1u ? -v.z : v.z,
                       (signs >> (k + 3u)) & 1u ? -v.w : v.w);
}

// IQ1's grid bytes (-1, 0, 1) plus the group's delta.
__device__ __forceinline__ float4 iq1_values(u32 word, float delta) {
    return make_float4(signed_byte(word, 0) + delta, signed_byte(word, 8) + delta, signed_byte(word, 16) + delta, signed_byte(word, 24) + delta);
}

// Values i .. i + 3 (i a multiple of 4) of the block stream: element i of the matrix stack.
// Four consecutive values always share a sub-block (its scales) and a code byte position (the
// i-quants: a group of 8, or IQ3's grid entry of 4).
__device__ __forceinline__ float4 block_step(const u32* __restrict__ w, const float* __restrict__ s, u64 i) {
#if FORMAT == FORMAT_Q8_0
    // f16 d, 32 signed codes.
    const u64 o = (i / 32u) * BLOCK_BYTES;
    const u32 q = bytes4_at(w, o + 2u + i % 32u);
    return scale4(make_float4(signed_byte(q, 0), signed_byte(q, 8), signed_byte(q, 16), signed_byte(q, 24)), half_at(w, o));
#elif FORMAT == FORMAT_Q4_0 || FORMAT == FORMAT_IQ4_NL
    // f16 d, 16 bytes: value j in the low nibbles for j < 16, the high ones after; Q4_0 (q - 8) d,
    // IQ4_NL d level(q).
    const u64 o = (i / 32u) * BLOCK_BYTES;
    const u32 j = (u32)(i % 32u);
    const u32 word = bytes4_at(w, o + 2u + j % 16u);
#if FORMAT == FORMAT_Q4_0
    const float4 q = fields(word, 4u * (j / 16u), 0xfu);
    return scale4(make_float4(q.x - 8.0f, q.y - 8.0f, q.z - 8.0f, q.w - 8.0f), half_at(w, o));
#else
    return scale4(iq4_levels(word, 4u * (j / 16u)), half_at(w, o));
#endif
#elif FORMAT == FORMAT_Q4_1
    // f16 d, f16 m, nibbles as Q4_0: q d + m.
    const u64 o = (i / 32u) * BLOCK_BYTES;
    const u32 j = (u32)(i % 32u);
    return scale_min4(fields(bytes4_at(w, o + 4u + j % 16u), 4u * (j / 16u), 0xfu), half_at(w, o), -half_at(w, o + 2u));
#elif FORMAT == FORMAT_Q5_0 || FORMAT == FORMAT_Q5_1
    // f16 d (and f16 m), 32 high bits (value j's is bit j), nibbles as Q4_0: Q5_0 (q - 16) d,
    // Q5_1 q d + m.
    const u64 o = (i / 32u) * BLOCK_BYTES, codes = o + (FORMAT == FORMAT_Q5_0 ? 2u : 4u);
    const u32 j = (u32)(i % 32u);
    const u32 high = bytes4_at(w, codes) >> j;
    const u32 low = bytes4_at(w, codes + 4u + j % 16u) >> (4u * (j / 16u));
    float q[4];
    for (u32 k = 0; k < 4u; k++) q[k] = (float)(((low >> (8u * k)) & 0xfu) | (((high >> k) & 1u) << 4));
#if FORMAT == FORMAT_Q5_0
    return scale4(make_float4(q[0] - 16.0f, q[1] - 16.0f, q[2] - 16.0f, q[3] - 16.0f), half_at(w, o));
#else
    return scale_min4(make_float4(q[0], q[1], q[2], q[3]), half_at(w, o), -half_at(w, o + 2u));
#endif
#elif FORMAT == FORMAT_Q2_K
    // 16 scale bytes (low nibble scale, high nibble min, per 16 values), 64 bytes of 2-bit codes
    // (each half of the block: code byte l's bit pair 2 (v / 32) holds value v of the half,
    // l = v % 32), f16 d, f16 dmin: d sc q - dmin m.
    const u64 o = (i / 256u) * BLOCK_BYTES;
    const u32 half = (u32)(i % 256u) / 128u, v = (u32)(i % 128u), l = v % 32u;
    const u32 sc = byte_at(w, o + 8u * half + 2u * (v / 32u) + l / 16u);
    const float4 q = fields(bytes4_at(w, o + 16u + 32u * half + l), 2u * (v / 32u), 3u);
    return scale_min4(q, half_at(w, o + 80u) * (float)(sc & 0xfu), half_at(w, o + 82u) * (float)(sc >> 4));
#elif FORMAT == FORMAT_Q3_K
    // 32 bytes of high-bit masks, 64 bytes of 2-bit codes (laid out as Q2_K's), 12 bytes of
    // 6-bit scales, f16 d: d (scale - 32) (q - 4 where the mask bit is clear).
    const u64 o = (i / 256u) * BLOCK_BYTES;
    const u32 half = (u32)(i % 256u) / 128u, v = (u32)(i % 128u), l = v % 32u;
    const u32 low = bytes4_at(w, o + 32u + 32u * half + l) >> (2u * (v / 32u));
    const u32 high = bytes4_at(w, o + l) >> (4u * half + v / 32u);
    float q[4];
    for (u32 k = 0; k < 4u; k++) q[k] = (float)((low >> (8u * k)) & 3u) - (((high >> (8u * k)) & 1u) ? 0.0f : 4.0f);
    // Scale j: low four bits from byte j % 8 (its high nibble for j >= 8), high two from
    // byte 8 + j % 4 (bits 2 (j / 4)).
    const u32 j = 8u * half + 2u * (v / 32u) + l / 16u;
    const u32 bits = ((byte_at(w, o + 96u + j % 8u) >> (4u * (j / 8u))) & 0xfu) | (((byte_at(w, o + 104u + j % 4u) >> (2u * (j / 4u))) & 3u) << 4);
    return scale4(make_float4(q[0], q[1], q[2], q[3]), half_at(w, o + 108u) * (float)((int)bits - 32));
#elif FORMAT == FORMAT_Q4_K || FORMAT == FORMAT_Q5_K
    // f16 d, f16 dmin, 12 bytes of 6-bit (scale, min) per 32 values, (Q5_K: 32 bytes of fifth
    // bits, value j's in bit j / 32 of byte j % 32,) 128 bytes of nibbles (each 64 values: the
    // low nibbles of 32 bytes, then their high ones): d sc q - dmin m.
    const u32 j = (u32)(i % 256u), sub = j / 32u;
    const u64 o = (i / 256u) * BLOCK_BYTES, codes = o + (FORMAT == FORMAT_Q4_K ? 16u : 48u);
    float4 q = fields(bytes4_at(w, codes + 32u * (j / 64u) + j % 32u), 4u * (sub % 2u), 0xfu);
#if FORMAT == FORMAT_Q5_K
    const float4 high = fields(bytes4_at(w, o + 16u + j % 32u), sub, 1u);
    q = make_float4(q.x + 16.0f * high.x, q.y + 16.0f * high.y, q.z + 16.0f * high.z, q.w + 16.0f * high.w);
#endif
    return scale_min4(q, half_at(w, o) * scale_min_k4(w, o + 4u, sub, 0u), half_at(w, o + 2u) * scale_min_k4(w, o + 4u, sub, 1u));
#elif FORMAT == FORMAT_Q6_K
    // 128 bytes of low nibbles, 64 bytes of high bit pairs, 16 signed scales (per 16 values),
    // f16 d: d sc (q - 32). Each half of the block: value v's low nibble in byte v % 64 (its high
    // nibble for v >= 64), its high pair in byte v % 32 at bits 2 (v / 32).
    const u64 o = (i / 256u) * BLOCK_BYTES;
    const u32 half = (u32)(i % 256u) / 128u, v = (u32)(i % 128u), quarter = v / 32u, l = v % 32u;
    const u32 low = bytes4_at(w, o + 64u * half + 32u * (quarter % 2u) + l) >> (4u * (quarter / 2u));
    const u32 high = bytes4_at(w, o + 128u + 32u * half + l) >> (2u * quarter);
    float q[4];
    for (u32 k = 0; k < 4u; k++) q[k] = (float)(((low >> (8u * k)) & 0xfu) | (((high >> (8u * k)) & 3u) << 4)) - 32.0f;
    const float sc = signed_byte(byte_at(w, o + 192u + 8u * half + 2u * quarter + l / 16u), 0);
    return scale4(make_float4(q[0], q[1], q[2], q[3]), half_at(w, o + 208u) * sc);
#elif FORMAT == FORMAT_IQ4_XS
    // f16 d, 16 bits of scales' high pairs, 4 bytes of their low nibbles, 128 bytes of level
    // indices (each 32 values: Q4_0's nibble order): d (scale - 32) level.
    const u64 o = (i / 256u) * BLOCK_BYTES;
    const u32 j = (u32)(i % 256u), sub = j / 32u;
    const u32 scales_high = byte_at(w, o + 2u) | (byte_at(w, o + 3u) << 8);
    const u32 ls = ((byte_at(w, o + 4u + sub / 2u) >> (4u * (sub % 2u))) & 0xfu) | (((scales_high >> (2u * sub)) & 3u) << 4);
    return scale4(iq4_levels(bytes4_at(w, o + 8u + 16u * sub + j % 16u), 4u * ((j % 32u) / 16u)), half_at(w, o) * (float)((int)ls - 32));
#elif FORMAT == FORMAT_IQ2_XXS || FORMAT == FORMAT_IQ2_XS || FORMAT == FORMAT_IQ2_S
    // f16 d; per 32 values: IQ2_XXS two words (four grid index bytes; four 7-bit signs and a
    // 4-bit scale on top), IQ2_XS four u16 (9-bit index, 7-bit signs) and a byte of two 4-bit
    // scales, IQ2_S four index bytes, two-bit index tops, four sign bytes, two 4-bit scales:
    // d (0.5 + s) / 4 grid sign.
    const u64 o = (i / 256u) * BLOCK_BYTES;
    const u32 j = (u32)(i % 256u), ib = j / 32u, l = (j % 32u) / 8u;
#if FORMAT == FORMAT_IQ2_XXS
    const u32 high = bytes4_at(w, o + 6u + 8u * ib);
    const u32 index = (bytes4_at(w, o + 2u + 8u * ib) >> (8u * l)) & 0xffu;
    const u32 signs = signs8((high >> (7u * l)) & 127u);
    const float db = half_at(w, o) * (0.5f + (float)(high >> 28)) * 0.25f;
#elif FORMAT == FORMAT_IQ2_XS
    const u32 q = bytes4_at(w, o + 2u + 2u * (4u * ib + l)) & 0xffffu;
    const u32 index = q & 511u, signs = signs8(q >> 9);
    const float db = half_at(w, o) * (0.5f + (float)((byte_at(w, o + 66u + ib) >> (4u * (l / 2u))) & 0xfu)) * 0.25f;
#else
    const u32 index = byte_at(w, o + 2u + 4u * ib + l) | ((byte_at(w, o + 66u + ib) << (8u - 2u * l)) & 0x300u);
    const u32 signs = byte_at(w, o + 34u + 4u * ib + l);
    const float db = half_at(w, o) * (0.5f + (float)((byte_at(w, o + 74u + ib) >> (4u * (l / 2u))) & 0xfu)) * 0.25f;
#endif
    return with_signs(scale4(fields(grid_word(s, 2u * index + (j % 8u) / 4u), 0u, 0xffu), db), signs, j % 8u);
#elif FORMAT == FORMAT_IQ3_XXS || FORMAT == FORMAT_IQ3_S
    // f16 d; IQ3_XXS: 64 grid indices (4 values each), per 32 values a word of four 7-bit signs
    // and a 4-bit scale on top, d (0.5 + s) / 2 grid sign; IQ3_S: 64 index low bytes, 8 bytes
    // of ninth bits, 32 of signs, 4 of two 4-bit scales per 64, d (1 + 2 s) grid sign.
    const u64 o = (i / 256u) * BLOCK_BYTES;
    const u32 j = (u32)(i % 256u), ib = j / 32u, l = (j % 32u) / 8u, second = (j % 8u) / 4u;
#if FORMAT == FORMAT_IQ3_XXS
    const u32 aux = bytes4_at(w, o + 66u + 4u * ib);
    const u32 index = byte_at(w, o + 2u + 8u * ib + 2u * l + second);
    const u32 signs = signs8((aux >> (7u * l)) & 127u);
    const float db = half_at(w, o) * (0.5f + (float)(aux >> 28)) * 0.5f;
#else
    const u32 index = byte_at(w, o + 2u + 8u * ib + 2u * l + second) | ((byte_at(w, o + 66u + ib) << (8u - 2u * l - second)) & 256u);
    const u32 signs = byte_at(w, o + 74u + 4u * ib + l);
    const float db = half_at(w, o) * (float)(1u + 2u * ((byte_at(w, o + 106u + ib / 2u) >> (4u * (ib % 2u))) & 0xfu));
#endif
    return with_signs(scale4(fields(grid_word(s, index), 0u, 0xffu), db), signs, j % 8u);
#elif FORMAT == FORMAT_IQ1_S || FORMAT == FORMAT_IQ1_M
    // Grid values -1, 0, 1 plus a delta of +-1/8 per group, times d (2 s + 1). IQ1_S: f16 d,
    // 32 index low bytes, per 32 values a u16 of four 3-bit index tops, a 3-bit scale and the
    // delta's sign; IQ1_M: 32 index low bytes, per 8 values half a byte (3-bit index top, delta
    // sign), 8 bytes of 3-bit scales per 16 values whose top nibbles form the block's f16.
    const u64 o = (i / 256u) * BLOCK_BYTES;
    const u32 j = (u32)(i % 256u), ib = j / 32u, l = (j % 32u) / 8u;
#if FORMAT == FORMAT_IQ1_S
    const u32 qh = bytes4_at(w, o + 34u + 2u * ib) & 0xffffu;
    const u32 index = byte_at(w, o + 2u + 4u * ib + l) | (((qh >> (3u * l)) & 7u) << 8);
    const float dl = half_at(w, o) * (float)(2u * ((qh >> 12) & 7u) + 1u);
    const float delta = (qh & 0x8000u) ? -0.125f : 0.125f;
#else
    const u32 s01 = bytes4_at(w, o + 48u), s23 = bytes4_at(w, o + 52u);
    const u32 bits = ((s01 >> 12) & 0xfu) | ((s01 >> 24) & 0xf0u) | ((s23 >> 4) & 0xf00u) | ((s23 >> 16) & 0xf000u);
    const u32 half = (byte_at(w, o + 32u + 2u * ib + l / 2u) >> (4u * (l % 2u))) & 0xfu;
    const u32 index = byte_at(w, o + 4u * ib + l) | ((half & 7u) << 8);
    const u32 sc = ((ib >= 4u ? s23 : s01) >> (16u * ((ib / 2u) % 2u))) & 0xffffu;
    const float dl = f16_to_f32(bits) * (float)(2u * ((sc >> (6u * (ib % 2u) + 3u * (l / 2u))) & 7u) + 1u);
    const float delta = (half & 8u) ? -0.125f : 0.125f;
#endif
    return scale4(iq1_values(grid_word(s, 2u * index + (j % 8u) / 4u), delta), dl);
#endif
}

#endif
