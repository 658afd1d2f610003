// Shared by every dsrun CUDA kernel (prepended to each source: NVRTC gets no include paths and
// no toolkit headers, so number formats are decoded here).
//
// Weights: a matrix is rows x cols elements, row-major, packed little-endian into u32 words;
// stacked experts follow each other `expert_stride` elements apart. FORMAT (a define) is the
// element type, one of the FORMAT_* defines the host passes from the format table
// (src/format.rs), as in shaders/weights.wgsl: f32, bf16, f16, FP8 e4m3 with block scales
// (W = code * scale[block]), q8: int8 with a scale per 1x32 block, q4: nibbles with
// (scale, min) per 1x32 block; GGUF's block formats (FORMAT >= FIRST_BLOCK_FORMAT) keep codes
// and scales inside each block's bytes (ggml_blocks.cuh, appended after this file, decodes them).

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#if !defined(FORMAT_F32) || !defined(FORMAT_BF16) || !defined(FORMAT_F16) || !defined(FORMAT_FP8) || !defined(FORMAT_Q8) || !defined(FORMAT_Q4) || !defined(FIRST_BLOCK_FORMAT)
#error "the FORMAT_* defines come from the host's format table (src/format.rs)"
#endif
#ifndef FORMAT
#define FORMAT FORMAT_F32
#endif

// Per-step values, written to device memory before each step, so a captured step (CUDA graph)
// serves every position.
struct Step {
    u32 n_tokens;    // positions and cache rows per token are in a `positions` argument
    u32 logits_row0; // first row whose logits are wanted
    u32 pad0, pad1;
};

// Mirrors `WeightLayout` in src/backend/layout.rs: one matrix or expert stack.
struct WeightLayout {
    u32 rows, cols, expert_stride, scale_expert_stride, grid_cols, block_rows, block_cols, row0, total_rows, pad0, pad1, pad2;
};

#define NEG_INF (-3.4028235e38f)

__device__ __forceinline__ float bf16_to_f32(u32 bits) { return __uint_as_float(bits << 16); }

__device__ __forceinline__ float f16_to_f32(u32 bits) {
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((u16)bits));
    return f;
#else
    return __half2float_bits((u16)bits);
#endif
}

__device__ __forceinline__ u32 f32_to_f16(float f) {
#ifdef __CUDA_ARCH__
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    return __float2half_bits(f);
#endif
}

// bf16 with round-to-nearest-even.
__device__ __forceinline__ u32 f32_to_bf16(float f) {
    const u32 b = __float_as_uint(f);
    return (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
}

// The latent cache's words (`--kv-cache`): CACHE 0 is one f32 per word, 1 two f16, 2 two bf16,
// value i in the low half of word i / 2 when i is even.
#ifndef CACHE
#define CACHE 0
#endif
__device__ __forceinline__ float cache_load(const u32* cache, u64 i) {
#if CACHE == 0
    return __uint_as_float(cache[i]);
#elif CACHE == 1
    return f16_to_f32((cache[i >> 1] >> ((u32)(i & 1u) * 16u)) & 0xffffu);
#else
    return bf16_to_f32((cache[i >> 1] >> ((u32)(i & 1u) * 16u)) & 0xffffu);
#endif
}

// Stores values i and i + 1 (i even).
__device__ __forceinline__ void cache_store2(u32* cache, u64 i, float a, float b) {
#if CACHE == 0
    cache[i] = __float_as_uint(a);
    cache[i + 1] = __float_as_uint(b);
#elif CACHE == 1
    cache[i >> 1] = f32_to_f16(a) | (f32_to_f16(b) << 16);
#else
    cache[i >> 1] = f32_to_bf16(a) | (f32_to_bf16(b) << 16);
#endif
}

// Exact e4m3fn: (8 + m) * 2^(e - 10) for normals, m * 2^-9 for subnormals, 0x7f/0xff NaN.
__device__ __forceinline__ float fp8_to_f32(u32 code) {
    u32 e = (code >> 3) & 0xfu;
    u32 m = code & 7u;
    float magnitude = ldexpf((float)(m + (e != 0u ? 8u : 0u)), (int)(e > 1u ? e : 1u) - 10);
    float v = (code & 0x80u) ? -magnitude : magnitude;
    return ((code & 0x7fu) == 0x7fu) ? __int_as_float(0x7fc00000) : v;
}

// Four FP8 codes (one word) to floats: the hardware converter on sm_89 and later (Ada, Hopper),
// arithmetic decoding elsewhere.
__device__ __forceinline__ float4 fp8x4_to_f32(u32 word) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    u32 lo, hi;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(lo) : "h"((u16)(word & 0xffffu)));
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(hi) : "h"((u16)(word >> 16)));
    return make_float4(f16_to_f32(lo & 0xffffu), f16_to_f32(lo >> 16), f16_to_f32(hi & 0xffffu), f16_to_f32(hi >> 16));
#else
    return make_float4(fp8_to_f32(word & 0xffu), fp8_to_f32((word >> 8) & 0xffu), fp8_to_f32((word >> 16) & 0xffu), fp8_to_f32(word >> 24));
#endif
}

__device__ __forceinline__ float signed_byte(u32 word, u32 shift) { return (float)((int)(word << (24u - shift)) >> 24); }

__device__ __forceinline__ u32 scale_index(const WeightLayout& l, u32 e, u32 r, u32 c) {
    return e * l.scale_expert_stride + (r / l.block_rows) * l.grid_cols + c / l.block_cols;
}

#if FORMAT >= FIRST_BLOCK_FORMAT
__device__ __forceinline__ float4 block_step(const u32* __restrict__ w, const float* __restrict__ s, u64 i);
#endif

// Weights of row r of expert e at columns c .. c + 3; needs c % 4 == 0, cols % 4 == 0 and
// blocks of whole fours (the host checks and otherwise uses `weight1`).
__device__ __forceinline__ float4 weights4(const WeightLayout& l, const u32* __restrict__ w, const float* __restrict__ s, u32 e, u32 r, u32 c) {
    const u64 first = (u64)e * l.expert_stride + (u64)r * l.cols + c;
#if FORMAT == FORMAT_F32
    return *reinterpret_cast<const float4*>(w + first);
#elif FORMAT == FORMAT_BF16 || FORMAT == FORMAT_F16
    const u32 a = w[first / 2], b = w[first / 2 + 1];
#if FORMAT == FORMAT_BF16
    return make_float4(bf16_to_f32(a & 0xffffu), bf16_to_f32(a >> 16), bf16_to_f32(b & 0xffffu), bf16_to_f32(b >> 16));
#else
    return make_float4(f16_to_f32(a & 0xffffu), f16_to_f32(a >> 16), f16_to_f32(b & 0xffffu), f16_to_f32(b >> 16));
#endif
#elif FORMAT == FORMAT_FP8
    const float4 v = fp8x4_to_f32(w[first / 4]);
    const float k = s[scale_index(l, e, r, c)];
    return make_float4(v.x * k, v.y * k, v.z * k, v.w * k);
#elif FORMAT == FORMAT_Q8
    const u32 word = w[first / 4];
    const float k = s[scale_index(l, e, r, c)];
    return make_float4(signed_byte(word, 0) * k, signed_byte(word, 8) * k, signed_byte(word, 16) * k, signed_byte(word, 24) * k);
#elif FORMAT >= FIRST_BLOCK_FORMAT
    return block_step(w, s, first);
#else
    const u32 word = w[first / 8] >> ((u32)(first & 7u) * 4u);
    const u32 g = e * l.scale_expert_stride + 2u * ((r / l.block_rows) * l.grid_cols + c / l.block_cols);
    const float k = s[g], m = s[g + 1];
    return make_float4((float)(word & 0xfu) * k + m, (float)((word >> 4) & 0xfu) * k + m, (float)((word >> 8) & 0xfu) * k + m,
                       (float)((word >> 12) & 0xfu) * k + m);
#endif
}

// Elements in 16 bytes of weights: each lane's load in the matmul's wide path.
#if FORMAT == FORMAT_F32
#define WIDE 4u
#elif FORMAT == FORMAT_BF16 || FORMAT == FORMAT_F16
#define WIDE 8u
#elif FORMAT == FORMAT_FP8 || FORMAT == FORMAT_Q8
#define WIDE 16u
#elif FORMAT >= FIRST_BLOCK_FORMAT
#define WIDE 4u // not taken: `wide_ok` is false (blocks decode four values at a time)
#else
#define WIDE 32u
#endif

// Whether rows, experts and scale blocks start on whole 16-byte loads (the wide path).
__device__ __forceinline__ bool wide_ok(const WeightLayout& l) {
    if (FORMAT >= FIRST_BLOCK_FORMAT) return false;
    return l.cols % WIDE == 0u && l.expert_stride % WIDE == 0u && (FORMAT == FORMAT_F32 || FORMAT == FORMAT_BF16 || FORMAT == FORMAT_F16 || l.block_cols % WIDE == 0u);
}

// The WIDE weights of row r of expert e from column c (c % WIDE == 0, `wide_ok`): one 16-byte load.
__device__ __forceinline__ void weights_wide(const WeightLayout& l, const u32* __restrict__ w, const float* __restrict__ s, u32 e, u32 r, u32 c,
                                             float* out) {
    const u64 first = (u64)e * l.expert_stride + (u64)r * l.cols + c;
    const uint4 q = *reinterpret_cast<const uint4*>(w + first / (WIDE / 4u));
    const u32 words[4] = {q.x, q.y, q.z, q.w};
#if FORMAT == FORMAT_F32
    for (u32 i = 0; i < 4u; i++) out[i] = __uint_as_float(words[i]);
#elif FORMAT == FORMAT_BF16
    for (u32 i = 0; i < 4u; i++) {
        out[2u * i] = bf16_to_f32(words[i] & 0xffffu);
        out[2u * i + 1u] = bf16_to_f32(words[i] >> 16);
    }
#elif FORMAT == FORMAT_F16
    for (u32 i = 0; i < 4u; i++) {
        out[2u * i] = f16_to_f32(words[i] & 0xffffu);
        out[2u * i + 1u] = f16_to_f32(words[i] >> 16);
    }
#elif FORMAT == FORMAT_FP8
    const float k = s[scale_index(l, e, r, c)];
    for (u32 i = 0; i < 4u; i++) {
        const float4 v = fp8x4_to_f32(words[i]);
        out[4u * i] = v.x * k;
        out[4u * i + 1u] = v.y * k;
        out[4u * i + 2u] = v.z * k;
        out[4u * i + 3u] = v.w * k;
    }
#elif FORMAT == FORMAT_Q8
    const float k = s[scale_index(l, e, r, c)];
    for (u32 i = 0; i < 16u; i++) out[i] = signed_byte(words[i / 4u], (i % 4u) * 8u) * k;
#elif FORMAT >= FIRST_BLOCK_FORMAT
    (void)words; // not taken (`wide_ok`)
#else
    const u32 g = e * l.scale_expert_stride + 2u * ((r / l.block_rows) * l.grid_cols + c / l.block_cols);
    const float k = s[g], m = s[g + 1];
    for (u32 i = 0; i < 32u; i++) out[i] = (float)((words[i / 8u] >> ((i % 8u) * 4u)) & 0xfu) * k + m;
#endif
}

// One weight of row r of expert e at column c (any shape).
__device__ __forceinline__ float weight1(const WeightLayout& l, const u32* __restrict__ w, const float* __restrict__ s, u32 e, u32 r, u32 c) {
    const u64 i = (u64)e * l.expert_stride + (u64)r * l.cols + c;
#if FORMAT == FORMAT_F32
    return __uint_as_float(w[i]);
#elif FORMAT == FORMAT_BF16
    return bf16_to_f32((w[i / 2] >> ((u32)(i & 1u) * 16u)) & 0xffffu);
#elif FORMAT == FORMAT_F16
    return f16_to_f32((w[i / 2] >> ((u32)(i & 1u) * 16u)) & 0xffffu);
#elif FORMAT == FORMAT_FP8
    return fp8_to_f32((w[i / 4] >> ((u32)(i & 3u) * 8u)) & 0xffu) * s[scale_index(l, e, r, c)];
#elif FORMAT == FORMAT_Q8
    return signed_byte(w[i / 4], (u32)(i & 3u) * 8u) * s[scale_index(l, e, r, c)];
#elif FORMAT >= FIRST_BLOCK_FORMAT
    const float4 v = block_step(w, s, i & ~(u64)3u);
    const u32 k = (u32)(i & 3u);
    return k == 0u ? v.x : k == 1u ? v.y : k == 2u ? v.z : v.w;
#else
    const u32 g = e * l.scale_expert_stride + 2u * ((r / l.block_rows) * l.grid_cols + c / l.block_cols);
    return (float)((w[i / 8] >> ((u32)(i & 7u) * 4u)) & 0xfu) * s[g] + s[g + 1];
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// The sum of every thread's v, returned to all (blockDim.x a multiple of 32, at most 1024).
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    const u32 lane = threadIdx.x % 32u, warp = threadIdx.x / 32u, warps = blockDim.x / 32u;
    v = warp_sum(v);
    __syncthreads(); // earlier users of `partial` are done
    if (lane == 0u) partial[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (u32 i = 0; i < warps; i++) total += partial[i];
    return total;
}
