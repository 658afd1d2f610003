// DeepSeek-V3.2's lightning indexer (DeepSeek Sparse Attention), the contracts of
// shaders/indexer.wgsl: which `topk` earlier positions each token's MLA attends to.
//   indexer_prepare: per token (one block), LayerNorm (weight, bias, eps 1e-6) of its key, RoPE
//                    of the key's first `rope` values in the half-split layout (j with j + rope/2),
//                    stored in the f32 index key cache at its row; the same RoPE on each head's query.
//   indexer_score:   scores[t, j] = sum_h (w[t, h] / sqrt_heads) * relu(q[t, h] . k_j * scale) for
//                    every visible j. Grid: (ceil(ctx / 256), n).
//   indexer_top_k:   selected[t, :] = the `topk` best visible positions (ties to the earlier),
//                    ascending; all of them while there are at most `topk`. One block per token:
//                    the k-th largest score is found bit by bit on an order-keeping integer form,
//                    then the chosen positions are compacted in order.
// `positions` holds (position, first cache row of its sequence) per token. The key cache holds
// `dim` (even) values per row in the latent cache's format (CACHE, common.cuh).

#define MAX_INDEX_DIM 1024u

__device__ __forceinline__ u32 block_count(u32 v) {
    __shared__ u32 partial[32];
    const u32 lane = threadIdx.x % 32u, warp = threadIdx.x / 32u, warps = blockDim.x / 32u;
    for (u32 offset = 16u; offset > 0u; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    __syncthreads(); // earlier users of `partial` are done
    if (lane == 0u) partial[warp] = v;
    __syncthreads();
    u32 total = 0u;
    for (u32 i = 0; i < warps; i++) total += partial[i];
    return total;
}

extern "C" __global__ void indexer_prepare(const float* __restrict__ keys, float* __restrict__ queries, const float* __restrict__ norm,
                                           const float* __restrict__ bias, const float* __restrict__ inv_freq, const u32* __restrict__ positions,
                                           u32* __restrict__ cache, u32 heads, u32 dim, u32 rope, float rope_scale) {
    __shared__ float normed[MAX_INDEX_DIM], rotated[MAX_INDEX_DIM];
    const u32 t = blockIdx.x, pos = positions[2u * t];
    const float* src = keys + (u64)t * dim;
    const u64 dst = ((u64)positions[2u * t + 1u] + pos) * dim;
    float acc = 0.0f;
    for (u32 c = threadIdx.x; c < dim; c += blockDim.x) acc += src[c];
    const float mean = block_sum(acc) / (float)dim;
    float dev = 0.0f;
    for (u32 c = threadIdx.x; c < dim; c += blockDim.x) dev += (src[c] - mean) * (src[c] - mean);
    const float inv = 1.0f / sqrtf(block_sum(dev) / (float)dim + 1e-6f);
    for (u32 c = threadIdx.x; c < dim; c += blockDim.x) normed[c] = (src[c] - mean) * inv * norm[c] + bias[c];
    __syncthreads();
    const u32 half = rope / 2u;
    for (u32 c = threadIdx.x; c < dim; c += blockDim.x) {
        float v = normed[c];
        if (c < rope) {
            const float angle = (float)pos * inv_freq[c % half];
            const float cs = cosf(angle) * rope_scale, sn = sinf(angle) * rope_scale;
            v = c < half ? normed[c] * cs - normed[c + half] * sn : normed[c] * cs + normed[c - half] * sn;
        }
        rotated[c] = v;
    }
    __syncthreads();
    for (u32 c = 2u * threadIdx.x; c < dim; c += 2u * blockDim.x) cache_store2(cache, dst + c, rotated[c], rotated[c + 1u]);
    for (u32 i = threadIdx.x; i < heads * half; i += blockDim.x) {
        const u32 h = i / half, j = i % half;
        const float angle = (float)pos * inv_freq[j];
        const float cs = cosf(angle) * rope_scale, sn = sinf(angle) * rope_scale;
        float* q = queries + ((u64)t * heads + h) * dim + j;
        const float a = q[0], b = q[half];
        q[0] = a * cs - b * sn;
        q[half] = b * cs + a * sn;
    }
}

extern "C" __global__ void indexer_score(const float* __restrict__ queries, const float* __restrict__ weights, const u32* __restrict__ positions,
                                         const u32* __restrict__ cache, float* __restrict__ scores, u32 heads, u32 dim, u32 ctx, float scale,
                                         float sqrt_heads) {
    const u32 t = blockIdx.y, j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j > positions[2u * t]) return;
    const u64 key = ((u64)positions[2u * t + 1u] + j) * dim;
    float total = 0.0f;
    for (u32 h = 0; h < heads; h++) {
        const float* q = queries + ((u64)t * heads + h) * dim;
        float dot = 0.0f;
        for (u32 c = 0; c < dim; c++) dot += q[c] * cache_load(cache, key + c);
        total += (weights[t * heads + h] / sqrt_heads) * fmaxf(dot * scale, 0.0f);
    }
    scores[(u64)t * ctx + j] = total;
}

// A float's bits as an integer with the floats' order (total order, -0 below +0).
__device__ __forceinline__ u32 ordered(float x) {
    const u32 b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ u32 count_at_least(const float* scores, u32 visible, u32 at_least) {
    u32 n = 0;
    for (u32 j = threadIdx.x; j < visible; j += blockDim.x) n += ordered(scores[j]) >= at_least;
    return block_count(n);
}

// Inclusive prefix sum over the block's threads (blockDim.x <= 1024); `total` gets the sum.
__device__ u32 prefix_sum(u32 v, u32* total) {
    __shared__ u32 scan[1024];
    scan[threadIdx.x] = v;
    __syncthreads();
    for (u32 offset = 1u; offset < blockDim.x; offset <<= 1) {
        const u32 x = threadIdx.x >= offset ? scan[threadIdx.x - offset] : 0u;
        __syncthreads();
        scan[threadIdx.x] += x;
        __syncthreads();
    }
    const u32 sum = scan[threadIdx.x];
    *total = scan[blockDim.x - 1u];
    __syncthreads(); // scan is reused
    return sum;
}

extern "C" __global__ void indexer_top_k(const float* __restrict__ all_scores, const u32* __restrict__ positions, u32* __restrict__ all_selected,
                                         u32 ctx, u32 topk) {
    const u32 t = blockIdx.x, visible = positions[2u * t] + 1u;
    const float* scores = all_scores + (u64)t * ctx;
    u32* selected = all_selected + (u64)t * topk;
    if (visible <= topk) {
        for (u32 j = threadIdx.x; j < visible; j += blockDim.x) selected[j] = j;
        return;
    }
    // The largest threshold with at least topk scores at or above it: the k-th largest score.
    u32 threshold = 0u;
    for (u32 bit = 32u; bit > 0u; bit--) {
        const u32 candidate = threshold | (1u << (bit - 1u));
        if (count_at_least(scores, visible, candidate) >= topk) threshold = candidate;
    }
    // Scores above the threshold are all taken; of those equal to it, the earliest.
    const u32 above = threshold == 0xffffffffu ? 0u : count_at_least(scores, visible, threshold + 1u);
    const u32 ties_wanted = topk - above;
    u32 taken = 0u, ties = 0u;
    for (u32 j0 = 0; j0 < visible; j0 += blockDim.x) {
        const u32 j = j0 + threadIdx.x;
        const u32 key = j < visible ? ordered(scores[j]) : 0u;
        const bool tie = j < visible && key == threshold;
        u32 tie_total, chosen_total;
        const u32 tie_rank = prefix_sum(tie, &tie_total);
        const bool chosen = (j < visible && key > threshold) || (tie && ties + tie_rank <= ties_wanted);
        const u32 offset = prefix_sum(chosen, &chosen_total);
        if (chosen) selected[taken + offset - 1u] = j;
        taken += chosen_total;
        ties += tie_total;
    }
}
