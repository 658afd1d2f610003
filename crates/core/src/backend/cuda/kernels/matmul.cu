// y[s, r] = sum_c W_e(s)[r, c] * x[s / x_div, c] over a step's slots s.
//
// One warp per output row, each lane loading 16 bytes of weights per step (WIDE elements:
// 4 f32, 8 bf16/f16, 16 FP8/q8, 32 q4; four columns, or one, on shapes that do not allow it),
// so each weight is decoded once and used for the TILE slots of the block (TILE > 1 for prefill; 1 for decode and
// routed experts at decode, whose slots each read another expert). Grid: (ceil(rows / WARPS),
// slot tiles), (.., listed pairs) or (.., group tiles). Slots are n_tokens * slots_per_token, or fixed_slots when set (only the
// last position's logits). Flags: ACCUMULATE (y += W x), USE_IDS (slot s multiplies by expert
// ids[s], read on the device), SLOT_LIST (ids lists (slot, expert) pairs, one per block row y),
// GROUPED (ids is moe.cu's group_by_expert output: a block takes up to TILE slots of one expert,
// so a prefill chunk reads each chosen expert's weights once per TILE slots, not once per slot).

#ifndef TILE
#define TILE 1
#endif
#define WARPS 8
#define ACCUMULATE 1u
#define USE_IDS 2u
#define SLOT_LIST 4u
#define GROUPED 8u

extern "C" __global__ void matmul(const WeightLayout* __restrict__ layout, const u32* __restrict__ w, const float* __restrict__ scales,
                                  const Step* __restrict__ step, const float* __restrict__ x, float* __restrict__ y,
                                  const u32* __restrict__ ids, u32 slots_per_token, u32 x_div, u32 fixed_slots, u32 flags) {
    const WeightLayout l = *layout;
    const u32 lane = threadIdx.x % 32u;
    const u32 r = blockIdx.x * WARPS + threadIdx.x / 32u;
    const u32 slots = fixed_slots != 0u ? fixed_slots : step->n_tokens * slots_per_token;
    // The block's slots: TILE consecutive ones, or one listed pair, or one expert's group.
    u32 slot[TILE];
    u32 count = TILE, expert = 0;
    if (flags & GROUPED) {
        // ids = group_by_expert's output: [tiles, order offset, (expert, start, count)..., order...]
        if (blockIdx.y >= ids[0]) return;
        const u32* tile = ids + 2u + 3u * blockIdx.y;
        expert = tile[0];
        count = tile[2];
        const u32* order = ids + ids[1] + tile[1];
#pragma unroll
        for (u32 t = 0; t < TILE; t++) slot[t] = order[t < count ? t : count - 1u];
    } else {
        u32 s0 = blockIdx.y * TILE;
        if (flags & SLOT_LIST) {
            s0 = ids[2u * blockIdx.y];
            expert = ids[2u * blockIdx.y + 1u];
        } else if (flags & USE_IDS) {
            expert = ids[s0 < slots ? s0 : slots - 1u];
        }
        if (s0 >= slots) return;
        count = slots - s0 < TILE ? slots - s0 : TILE;
#pragma unroll
        for (u32 t = 0; t < TILE; t++) slot[t] = t < count ? s0 + t : s0;
    }
    if (r >= l.rows) return; // whole warps leave together
    const float* xs[TILE];
#pragma unroll
    for (u32 t = 0; t < TILE; t++) xs[t] = x + (u64)(slot[t] / x_div) * l.cols;
    float acc[TILE];
#pragma unroll
    for (u32 t = 0; t < TILE; t++) acc[t] = 0.0f;
    if (wide_ok(l)) {
        for (u32 c = lane * WIDE; c < l.cols; c += 32u * WIDE) {
            float wv[WIDE];
            weights_wide(l, w, scales, expert, r, c, wv);
#pragma unroll
            for (u32 t = 0; t < TILE; t++) {
                float a = 0.0f;
#pragma unroll
                for (u32 i = 0; i < WIDE; i += 4u) {
                    const float4 xv = *reinterpret_cast<const float4*>(xs[t] + c + i);
                    a += wv[i] * xv.x + wv[i + 1u] * xv.y + wv[i + 2u] * xv.z + wv[i + 3u] * xv.w;
                }
                acc[t] += a;
            }
        }
    } else if (l.cols % 4u == 0u && (FORMAT == FORMAT_F32 || FORMAT == FORMAT_BF16 || FORMAT == FORMAT_F16 || l.block_cols % 4u == 0u)) {
        for (u32 c = lane * 4u; c < l.cols; c += 128u) {
            const float4 wv = weights4(l, w, scales, expert, r, c);
#pragma unroll
            for (u32 t = 0; t < TILE; t++) {
                const float4 xv = *reinterpret_cast<const float4*>(xs[t] + c);
                acc[t] += wv.x * xv.x + wv.y * xv.y + wv.z * xv.z + wv.w * xv.w;
            }
        }
    } else {
        for (u32 c = lane; c < l.cols; c += 32u) {
            const float wv = weight1(l, w, scales, expert, r, c);
#pragma unroll
            for (u32 t = 0; t < TILE; t++) acc[t] += wv * xs[t][c];
        }
    }
#pragma unroll
    for (u32 t = 0; t < TILE; t++) {
        const float total = warp_sum(acc[t]);
        if (lane == 0u && t < count) {
            float* out = y + (u64)slot[t] * l.total_rows + l.row0 + r;
            *out = (flags & ACCUMULATE) ? *out + total : total;
        }
    }
}

// out[t, c] = embedding[tokens[t], c] (ids were checked against the vocabulary on the host).
// Grid: (ceil(cols / 256), n_tokens).
extern "C" __global__ void embed(const WeightLayout* __restrict__ layout, const u32* __restrict__ w, const float* __restrict__ scales,
                                 const Step* __restrict__ step, const u32* __restrict__ tokens, float* __restrict__ out) {
    const WeightLayout l = *layout;
    const u32 c = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
    if (c < l.cols && t < step->n_tokens) out[(u64)t * l.cols + c] = weight1(l, w, scales, 0, tokens[t], c);
}
