// Expert choice per token (one block per token), the CPU reference's rules: sigmoid or softmax
// scores; an optional correction bias that chooses but never weighs; group-limited top-k
// (groups ranked by their top-2 sum for noaux_tc, by their max for group_limited_greedy); ties
// to the lower index; weights = unbiased scores, optionally normalised, times `scaling`.
// Top-k is a parallel ranking: an expert's rank is the number of experts that beat it.
// The routing shape is fixed per model, so it is compiled in: EXPERTS, TOP_K, N_GROUP,
// TOPK_GROUP, SOFTMAX, METHOD (0 greedy, 1 group_limited_greedy, 2 noaux_tc), NORMALIZE, HAS_BIAS.

#define MAX_EXPERTS 1024u
#define MAX_GROUPS 64u
#define MAX_TOP_K 16u

__device__ __forceinline__ bool beats(float va, u32 ia, float vb, u32 ib) { return va > vb || (va == vb && ia < ib); }

extern "C" __global__ void router(const Step* __restrict__ step, const float* __restrict__ logits, const float* __restrict__ bias,
                                  u32* __restrict__ ids, float* __restrict__ weights_out, float scaling) {
    __shared__ float scores[MAX_EXPERTS];
    __shared__ float choice[MAX_EXPERTS];
    __shared__ float group_score[MAX_GROUPS];
    __shared__ u32 group_kept[MAX_GROUPS];
    __shared__ u32 chosen[MAX_TOP_K];
    const u32 t = blockIdx.x, lane = threadIdx.x, wg = blockDim.x;
    const float* l = logits + (u64)t * EXPERTS;

    float max_logit = NEG_INF, denom = 0.0f;
    if (SOFTMAX) {
        for (u32 e = 0; e < EXPERTS; e++) max_logit = fmaxf(max_logit, l[e]);
        for (u32 e = 0; e < EXPERTS; e++) denom += expf(l[e] - max_logit);
    }
    for (u32 e = lane; e < EXPERTS; e += wg) {
        const float s = SOFTMAX ? expf(l[e] - max_logit) / denom : 1.0f / (1.0f + expf(-l[e]));
        scores[e] = s;
        choice[e] = s + (HAS_BIAS ? bias[e] : 0.0f);
    }
    __syncthreads();

    if (METHOD != 0 && N_GROUP > 1) {
        const u32 size = EXPERTS / N_GROUP;
        for (u32 g = lane; g < N_GROUP; g += wg) {
            float first = NEG_INF, second = NEG_INF;
            for (u32 e = g * size; e < (g + 1u) * size; e++) {
                const float c = choice[e];
                second = c > first ? first : fmaxf(second, c);
                first = fmaxf(first, c);
            }
            group_score[g] = METHOD == 2 ? first + second : first;
        }
        __syncthreads();
        for (u32 g = lane; g < N_GROUP; g += wg) {
            u32 rank = 0;
            for (u32 h = 0; h < N_GROUP; h++) rank += beats(group_score[h], h, group_score[g], g) ? 1u : 0u;
            group_kept[g] = rank < TOPK_GROUP ? 1u : 0u;
        }
        __syncthreads();
        for (u32 e = lane; e < EXPERTS; e += wg) choice[e] = group_kept[e / size] ? choice[e] : NEG_INF;
        __syncthreads();
    }

    for (u32 e = lane; e < EXPERTS; e += wg) {
        u32 rank = 0;
        const float c = choice[e];
        for (u32 f = 0; f < EXPERTS; f++) rank += beats(choice[f], f, c, e) ? 1u : 0u;
        if (rank < TOP_K) chosen[rank] = e;
    }
    __syncthreads();

    if (lane == 0u && t < step->n_tokens) {
        float total = 0.0f;
        for (u32 i = 0; i < TOP_K; i++) total += scores[chosen[i]];
        const float norm = NORMALIZE ? total + 1e-20f : 1.0f;
        for (u32 i = 0; i < TOP_K; i++) {
            ids[t * TOP_K + i] = chosen[i];
            weights_out[t * TOP_K + i] = scores[chosen[i]] / norm * scaling;
        }
    }
}
