// Multi-head latent attention in the absorbed form (docs/forward-pass.md), for a step's tokens t, each at
// its position over its sequence's rows of the latent cache ([rows, LORA + ROPE]: c_kv then
// k_pe); `positions` holds (position, first cache row of the sequence) per token.
// LORA and ROPE are compile-time (shared-memory tiles are sized by them).

#define LATENT (LORA + ROPE)
// Heads that share each cache tile read, and positions per tile.
#define HEAD_GROUP 8u
#define TILE_POSITIONS 8u
#define THREADS 256u
#define COLS_PER_THREAD ((LORA + THREADS - 1u) / THREADS)

// q_lat[t, h, c] = sum_d W_UK[h][d, c] * q[t, h, d] (d < nope), with kv_b_proj as W
// ([heads * (nope + v), lora]). Grid: (ceil(lora / 256), n * heads).
extern "C" __global__ void q_absorb(const WeightLayout* __restrict__ layout, const u32* __restrict__ w, const float* __restrict__ scales,
                                    const Step* __restrict__ step, const float* __restrict__ q, float* __restrict__ q_lat, u32 heads,
                                    u32 nope, u32 v, u32 qk) {
    const WeightLayout l = *layout;
    const u32 c = blockIdx.x * blockDim.x + threadIdx.x, head = blockIdx.y; // head = t * heads + h
    if (c >= l.cols || head >= step->n_tokens * heads) return;
    const u32 row0 = (head % heads) * (nope + v);
    float acc = 0.0f;
    for (u32 d = 0; d < nope; d++) acc += weight1(l, w, scales, 0, row0 + d, c) * q[(u64)head * qk + d];
    q_lat[(u64)head * l.cols + c] = acc;
}

// o[t, h, i] = sum_c W_UV[h][i, c] * o_lat[t, h, c] (i < v). Grid: (ceil(v / 256), n * heads).
extern "C" __global__ void v_up(const WeightLayout* __restrict__ layout, const u32* __restrict__ w, const float* __restrict__ scales,
                                const Step* __restrict__ step, const float* __restrict__ o_lat, float* __restrict__ o, u32 heads, u32 nope,
                                u32 v) {
    const WeightLayout l = *layout;
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x, head = blockIdx.y;
    if (i >= v || head >= step->n_tokens * heads) return;
    const u32 row = (head % heads) * (nope + v) + nope + i;
    const float* src = o_lat + (u64)head * l.cols;
    float acc = 0.0f;
    for (u32 c = 0; c < l.cols; c++) acc += weight1(l, w, scales, 0, row, c) * src[c];
    o[(u64)head * v + i] = acc;
}

// Attention split across the sequence (FlashMLA's shape on plain CUDA cores): a block takes
// HEAD_GROUP heads of one token and `chunk` cache positions (split blockIdx.z); each cache tile
// is read once for all the group's heads. Scores use an online softmax; the block writes its
// running max m, sum l and unnormalised o_lat to `partial` ([t, h, split] x (2 + LORA)), and
// mla_merge combines the splits. Grid: (ceil(heads / HEAD_GROUP), n_tokens, splits); 256 threads.
// With `topk` > 0 (DeepSeek-V3.2's sparse attention) a token attends only to the positions its
// indexer chose: `selected` holds up to `topk` per token, ascending (indexer.cu).
extern "C" __global__ void mla_partial(const float* __restrict__ q, const float* __restrict__ q_lat, const u32* __restrict__ positions,
                                       const u32* __restrict__ cache, float* __restrict__ partial, u32 heads, u32 qk, u32 nope,
                                       u32 chunk, float scale, const u32* __restrict__ selected, u32 topk) {
    __shared__ float qs[HEAD_GROUP][LATENT];
    __shared__ float tile[TILE_POSITIONS][LATENT];
    __shared__ float p[HEAD_GROUP][TILE_POSITIONS];
    __shared__ float m[HEAD_GROUP], l[HEAD_GROUP], alpha[HEAD_GROUP];
    const u32 tid = threadIdx.x, t = blockIdx.y, h0 = blockIdx.x * HEAD_GROUP, split = blockIdx.z, splits = gridDim.z;
    const u32 visible = positions[2u * t] + 1u;
    const u64 row0 = (u64)positions[2u * t + 1u] * LATENT; // the sequence's first cache value
    const u32 begin = split * chunk;
    const u32 attended = topk == 0u || visible < topk ? visible : topk;
    const u32 end = begin + chunk < attended ? begin + chunk : attended;
    const u32* chosen = selected + (u64)t * topk;

    float acc[HEAD_GROUP][COLS_PER_THREAD];
    for (u32 hh = 0; hh < HEAD_GROUP; hh++)
        for (u32 k = 0; k < COLS_PER_THREAD; k++) acc[hh][k] = 0.0f;
    if (tid < HEAD_GROUP) {
        m[tid] = NEG_INF;
        l[tid] = 0.0f;
    }
    if (begin < end) {
        for (u32 i = tid; i < HEAD_GROUP * LATENT; i += THREADS) {
            const u32 hh = i / LATENT, c = i % LATENT, h = h0 + hh, head = t * heads + h;
            qs[hh][c] = h >= heads ? 0.0f : c < LORA ? q_lat[(u64)head * LORA + c] : q[(u64)head * qk + nope + (c - LORA)];
        }
    }
    // Threads per score: HEAD_GROUP x TILE_POSITIONS scores per tile.
    const u32 per_score = THREADS / (HEAD_GROUP * TILE_POSITIONS);
    const u32 pair = tid / per_score, part = tid % per_score;
    const u32 sh = pair / TILE_POSITIONS, sp = pair % TILE_POSITIONS;
    for (u32 p0 = begin; p0 < end; p0 += TILE_POSITIONS) {
        __syncthreads(); // the previous tile is used up (and qs is loaded)
        for (u32 i = tid; i < TILE_POSITIONS * LATENT; i += THREADS) {
            const u32 pp = i / LATENT, c = i % LATENT;
            const u32 pos = p0 + pp < end ? (topk == 0u ? p0 + pp : chosen[p0 + pp]) : 0u;
            tile[pp][c] = p0 + pp < end ? cache_load(cache, row0 + (u64)pos * LATENT + c) : 0.0f;
        }
        __syncthreads();
        float s = 0.0f;
        for (u32 c = part; c < LATENT; c += per_score) s += qs[sh][c] * tile[sp][c];
        for (u32 offset = per_score / 2u; offset > 0u; offset >>= 1) s += __shfl_xor_sync(0xffffffffu, s, offset);
        if (part == 0u) p[sh][sp] = p0 + sp < end ? s * scale : NEG_INF;
        __syncthreads();
        if (tid < HEAD_GROUP) {
            float top = m[tid];
            for (u32 pp = 0; pp < TILE_POSITIONS; pp++) top = fmaxf(top, p[tid][pp]);
            const float a = expf(m[tid] - top);
            float sum = 0.0f;
            for (u32 pp = 0; pp < TILE_POSITIONS; pp++) {
                const float e = p0 + pp < end ? expf(p[tid][pp] - top) : 0.0f;
                p[tid][pp] = e;
                sum += e;
            }
            l[tid] = l[tid] * a + sum;
            m[tid] = top;
            alpha[tid] = a;
        }
        __syncthreads();
        for (u32 hh = 0; hh < HEAD_GROUP; hh++) {
            for (u32 k = 0; k < COLS_PER_THREAD; k++) {
                const u32 c = tid + k * THREADS;
                if (c < LORA) {
                    float o = acc[hh][k] * alpha[hh];
                    for (u32 pp = 0; pp < TILE_POSITIONS; pp++) o += p[hh][pp] * tile[pp][c];
                    acc[hh][k] = o;
                }
            }
        }
    }
    __syncthreads();
    for (u32 hh = 0; hh < HEAD_GROUP; hh++) {
        const u32 h = h0 + hh;
        if (h >= heads) break;
        float* out = partial + ((u64)(t * heads + h) * splits + split) * (2u + LORA);
        if (tid == 0u) {
            out[0] = m[hh];
            out[1] = l[hh];
        }
        for (u32 k = 0; k < COLS_PER_THREAD; k++) {
            const u32 c = tid + k * THREADS;
            if (c < LORA) out[2u + c] = acc[hh][k];
        }
    }
}

// o_lat[t, h] = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s over the splits. Grid: (heads, n).
extern "C" __global__ void mla_merge(const float* __restrict__ partial, float* __restrict__ o_lat, u32 heads, u32 splits) {
    const u32 head = blockIdx.y * heads + blockIdx.x;
    const float* in = partial + (u64)head * splits * (2u + LORA);
    float top = NEG_INF;
    for (u32 s = 0; s < splits; s++) top = fmaxf(top, in[s * (2u + LORA)]);
    float total = 0.0f;
    for (u32 s = 0; s < splits; s++) total += in[s * (2u + LORA) + 1u] * expf(in[s * (2u + LORA)] - top);
    for (u32 c = threadIdx.x; c < LORA; c += blockDim.x) {
        float o = 0.0f;
        for (u32 s = 0; s < splits; s++) o += in[s * (2u + LORA) + 2u + c] * expf(in[s * (2u + LORA)] - top);
        o_lat[(u64)head * LORA + c] = o / total;
    }
}
