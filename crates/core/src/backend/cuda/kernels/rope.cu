// Rotary embedding at each token's position (interleaved pairs, YaRN's scale folded into
// rope_scale and inv_freq by the host). `positions` holds (position, first cache row of its
// sequence) per token of the step.

__device__ __forceinline__ void rotate(float* pair, float angle, float rope_scale) {
    const float cs = cosf(angle) * rope_scale, sn = sinf(angle) * rope_scale;
    const float a = pair[0], b = pair[1];
    pair[0] = a * cs - b * sn;
    pair[1] = a * sn + b * cs;
}

// The rope part of every query head, in place. Grid: ceil(n_tokens * heads * rope / 2 / 256).
extern "C" __global__ void rope_q(const Step* __restrict__ step, const float* __restrict__ inv_freq, const u32* __restrict__ positions, float* __restrict__ q, u32 heads,
                                  u32 qk, u32 nope, float rope_scale) {
    const u32 pairs = (qk - nope) / 2u;
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= step->n_tokens * heads * pairs) return;
    const u32 j = i % pairs, head = i / pairs, t = head / heads;
    rotate(q + (u64)head * qk + nope + 2u * j, (float)positions[2u * t] * inv_freq[j], rope_scale);
}

// Stores the step's latents in the MLA cache, one block per token t at its position pos, in
// its sequence's rows (from row0):
//   cache[row0 + pos, :lora] = RMSNorm(kv[t, :lora]) (c_kv),  cache[row0 + pos, lora:] = rope(kv[t, lora:]) (k_pe).
extern "C" __global__ void latent_store(const float* __restrict__ kv, const float* __restrict__ norm, const float* __restrict__ inv_freq,
                                        const u32* __restrict__ positions, u32* __restrict__ cache, u32 lora, u32 rope, float eps,
                                        float rope_scale) {
    const u32 t = blockIdx.x, latent = lora + rope, pos = positions[2u * t];
    const float* src = kv + (u64)t * latent;
    const u64 dst = ((u64)positions[2u * t + 1u] + pos) * latent;
    float acc = 0.0f;
    for (u32 c = threadIdx.x; c < lora; c += blockDim.x) acc += src[c] * src[c];
    const float inv = rsqrtf(block_sum(acc) / (float)lora + eps);
#if CACHE == 0
    for (u32 c = threadIdx.x; c < lora; c += blockDim.x) cache[dst + c] = __float_as_uint(norm[c] * (src[c] * inv));
#else
    // 16-bit: a pair of values per word (the latent width is even).
    for (u32 c = 2u * threadIdx.x; c < lora; c += 2u * blockDim.x) cache_store2(cache, dst + c, norm[c] * (src[c] * inv), norm[c + 1u] * (src[c + 1u] * inv));
#endif
    for (u32 j = threadIdx.x; j < rope / 2u; j += blockDim.x) {
        float pair[2] = {src[lora + 2u * j], src[lora + 2u * j + 1u]};
        rotate(pair, (float)pos * inv_freq[j], rope_scale);
        cache_store2(cache, dst + lora + 2u * j, pair[0], pair[1]);
    }
}
