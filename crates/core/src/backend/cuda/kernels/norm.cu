// dst[row] = w * src[row] / sqrt(mean(src[row]^2) + eps), one block per row. With
// from_logits_row, source rows start at step.logits_row0 (the final norm before lm_head).

extern "C" __global__ void rmsnorm(const Step* __restrict__ step, const float* __restrict__ src, const float* __restrict__ w,
                                   float* __restrict__ dst, u32 dim, float eps, u32 from_logits_row) {
    const u32 row = blockIdx.x;
    const float* in = src + (u64)(row + (from_logits_row ? step->logits_row0 : 0u)) * dim;
    float acc = 0.0f;
    for (u32 c = threadIdx.x; c < dim; c += blockDim.x) acc += in[c] * in[c];
    const float inv = rsqrtf(block_sum(acc) / (float)dim + eps);
    for (u32 c = threadIdx.x; c < dim; c += blockDim.x) dst[(u64)row * dim + c] = w[c] * (in[c] * inv);
}
