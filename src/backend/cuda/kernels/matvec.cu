// y[t, r] = sum_c W[r, c] * x[t, c] for the step's tokens t < n_tokens (at most TOKENS):
// one warp per output row, each lane four consecutive columns per step, so every weight is
// decoded once and used for every token. FORMAT (a compile-time define) is the weight format:
//   1 = bf16, 3 = FP8 e4m3 with block scales (W = code * scales[r / BLOCK_ROWS][c / BLOCK_COLS]).
// Needs cols % 4 == 0 (and BLOCK_COLS % 4 == 0): the host checks.
// Compiled by NVRTC at run time; no toolkit headers, so the number formats are decoded here.

#ifndef FORMAT
#define FORMAT 1
#endif
#ifndef TOKENS
#define TOKENS 1
#endif
#ifndef BLOCK_ROWS
#define BLOCK_ROWS 128
#endif
#ifndef BLOCK_COLS
#define BLOCK_COLS 128
#endif

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

__device__ __forceinline__ float bf16_bits_to_f32(u32 bits) {
    return __uint_as_float(bits << 16);
}

// Exact e4m3fn: (8 + m) * 2^(e - 10) for normals, m * 2^-9 for subnormals, 0x7f/0xff NaN.
__device__ __forceinline__ float fp8_e4m3_to_f32(u32 code) {
    u32 e = (code >> 3) & 0xfu;
    u32 m = code & 7u;
    float magnitude = ldexpf((float)(m + (e != 0u ? 8u : 0u)), (int)(e > 1u ? e : 1u) - 10);
    float v = (code & 0x80u) ? -magnitude : magnitude;
    return ((code & 0x7fu) == 0x7fu) ? __int_as_float(0x7fc00000) : v;
}

// Four FP8 codes (one little-endian word) to floats: the hardware converter on sm_89 and
// later (Ada, Hopper), arithmetic decoding elsewhere.
__device__ __forceinline__ float4 fp8x4_to_f32(u32 word) {
#if __CUDA_ARCH__ >= 890
    u32 lo, hi;
    u16 w0 = (u16)(word & 0xffffu), w1 = (u16)(word >> 16);
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(lo) : "h"(w0));
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(hi) : "h"(w1));
    float a, b, c, d;
    asm("cvt.f32.f16 %0, %1;" : "=f"(a) : "h"((u16)(lo & 0xffffu)));
    asm("cvt.f32.f16 %0, %1;" : "=f"(b) : "h"((u16)(lo >> 16)));
    asm("cvt.f32.f16 %0, %1;" : "=f"(c) : "h"((u16)(hi & 0xffffu)));
    asm("cvt.f32.f16 %0, %1;" : "=f"(d) : "h"((u16)(hi >> 16)));
    return make_float4(a, b, c, d);
#else
    return make_float4(fp8_e4m3_to_f32(word & 0xffu), fp8_e4m3_to_f32((word >> 8) & 0xffu),
                       fp8_e4m3_to_f32((word >> 16) & 0xffu), fp8_e4m3_to_f32(word >> 24));
#endif
}

// The four weights of row r at columns c .. c + 3 (c % 4 == 0).
__device__ __forceinline__ float4 weights4(const u32* __restrict__ w, const float* __restrict__ scales, u32 r, u32 c, u32 cols, u32 grid_cols) {
#if FORMAT == 3
    float4 v = fp8x4_to_f32(w[(r * cols + c) / 4u]);
    float s = scales[(r / BLOCK_ROWS) * grid_cols + c / BLOCK_COLS];
    return make_float4(v.x * s, v.y * s, v.z * s, v.w * s);
#else
    u32 a = w[(r * cols + c) / 2u];
    u32 b = w[(r * cols + c) / 2u + 1u];
    return make_float4(bf16_bits_to_f32(a & 0xffffu), bf16_bits_to_f32(a >> 16), bf16_bits_to_f32(b & 0xffffu), bf16_bits_to_f32(b >> 16));
#endif
}

extern "C" __global__ void matvec(const u32* __restrict__ w, const float* __restrict__ scales, const float* __restrict__ x,
                                  float* __restrict__ y, u32 rows, u32 cols, u32 grid_cols, u32 n_tokens) {
    const u32 r = (blockIdx.x * blockDim.x + threadIdx.x) / 32u;
    const u32 lane = threadIdx.x % 32u;
    if (r >= rows) {
        return; // whole warps leave together: rows are per warp
    }
    float acc[TOKENS];
#pragma unroll
    for (u32 t = 0; t < TOKENS; t++) {
        acc[t] = 0.0f;
    }
    for (u32 c = lane * 4u; c < cols; c += 128u) {
        float4 wv = weights4(w, scales, r, c, cols, grid_cols);
#pragma unroll
        for (u32 t = 0; t < TOKENS; t++) {
            if (t < n_tokens) {
                const float4 xv = *reinterpret_cast<const float4*>(x + t * cols + c);
                acc[t] += wv.x * xv.x + wv.y * xv.y + wv.z * xv.z + wv.w * xv.w;
            }
        }
    }
#pragma unroll
    for (u32 t = 0; t < TOKENS; t++) {
        float v = acc[t];
        for (int offset = 16; offset > 0; offset >>= 1) {
            v += __shfl_down_sync(0xffffffffu, v, offset);
        }
        if (lane == 0u && t < n_tokens) {
            y[t * rows + r] = v;
        }
    }
}
