// Elementwise MoE pieces and the greedy pick.

// The step's slots (ids: n_tokens * top_k expert ids) grouped by expert for the GROUPED
// matmul: out = [tiles, order offset, (expert, start, count) per tile, order], where order lists
// the slots expert by expert (stably) and each tile covers at most `tile` slots of one expert.
// One thread does it (a few hundred slots): a counting sort. Grid: 1 block.
extern "C" __global__ void group_by_expert(const Step* __restrict__ step, const u32* __restrict__ ids, u32* __restrict__ out, u32 top_k,
                                           u32 experts, u32 tile, u32 max_tiles) {
    __shared__ u32 start[1025];
    if (threadIdx.x != 0u) return;
    const u32 slots = step->n_tokens * top_k;
    for (u32 e = 0; e <= experts; e++) start[e] = 0u;
    for (u32 s = 0; s < slots; s++) start[ids[s] + 1u]++;
    for (u32 e = 0; e < experts; e++) start[e + 1u] += start[e];
    const u32 order_at = 2u + 3u * max_tiles;
    u32 tiles = 0;
    for (u32 e = 0; e < experts; e++) {
        for (u32 first = start[e]; first < start[e + 1u]; first += tile) {
            u32* t = out + 2u + 3u * tiles++;
            t[0] = e;
            t[1] = first;
            t[2] = start[e + 1u] - first < tile ? start[e + 1u] - first : tile;
        }
    }
    for (u32 s = 0; s < slots; s++) out[order_at + start[ids[s]]++] = s;
    out[0] = tiles;
    out[1] = order_at;
}

// gate[i] = silu(gate[i]) * up[i] over the step's n_tokens * per_token elements.
extern "C" __global__ void silu_mul(const Step* __restrict__ step, float* __restrict__ gate, const float* __restrict__ up, u32 per_token) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (u64)step->n_tokens * per_token) {
        const float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// h[t, d] += sum_i w[t, i] * expert_out[t * k + i, d] + shared[t, d]. Grid: (ceil(dim / 256), n).
extern "C" __global__ void moe_combine(const Step* __restrict__ step, const float* __restrict__ expert_out, const float* __restrict__ route_weights,
                                       const float* __restrict__ shared_out, float* __restrict__ h, u32 dim, u32 top_k, u32 has_shared) {
    const u32 d = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
    if (d >= dim || t >= step->n_tokens) return;
    float acc = 0.0f;
    // A zero weight adds nothing, whatever its row holds (a slot the host computes, hybrid placement).
    for (u32 i = 0; i < top_k; i++) {
        const float w = route_weights[t * top_k + i];
        if (w != 0.0f) acc += w * expert_out[(u64)(t * top_k + i) * dim + d];
    }
    if (has_shared) acc += shared_out[(u64)t * dim + d];
    h[(u64)t * dim + d] += acc;
}

// ids[row] = index of the row's largest logit (the first on ties), or 0xffffffff when any
// logit of the row is NaN or infinite (the host reports it); one block per row.
extern "C" __global__ void argmax(const float* __restrict__ logits, u32* __restrict__ ids, u32 cols) {
    __shared__ float best_value[1024];
    __shared__ u32 best_index[1024];
    __shared__ u32 non_finite[1024];
    const float* row = logits + (u64)blockIdx.x * cols;
    float value = NEG_INF;
    u32 index = cols;
    u32 bad = 0;
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) {
        bad |= !(fabsf(row[c]) <= 3.4028235e38f);
        if (index == cols || row[c] > value) {
            value = row[c];
            index = c;
        }
    }
    best_value[threadIdx.x] = value;
    best_index[threadIdx.x] = index;
    non_finite[threadIdx.x] = bad;
    __syncthreads();
    for (u32 stride = blockDim.x / 2u; stride > 0u; stride >>= 1) {
        if (threadIdx.x < stride) {
            const float v = best_value[threadIdx.x + stride];
            const u32 i = best_index[threadIdx.x + stride];
            if (v > best_value[threadIdx.x] || (v == best_value[threadIdx.x] && i < best_index[threadIdx.x])) {
                best_value[threadIdx.x] = v;
                best_index[threadIdx.x] = i;
            }
            non_finite[threadIdx.x] |= non_finite[threadIdx.x + stride];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0u) ids[blockIdx.x] = non_finite[0] ? 0xffffffffu : best_index[0];
}
