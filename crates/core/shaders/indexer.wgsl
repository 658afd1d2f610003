// DeepSeek-V3.2's lightning indexer (DeepSeek Sparse Attention, transformers'
// `DeepseekV32Indexer`): which `topk` earlier positions each token's MLA attends to. Three steps,
// each one entry point:
//   prepare: per token, LayerNorm (weight, bias, eps 1e-6) of its key `wk x`, RoPE of the key's
//            first `rope` values in the half-split layout (value j pairs with j + rope/2, unlike
//            MLA's interleaved pairs), stored in the index key cache at the token's row; the same
//            RoPE on each head's query in place. One workgroup per token.
//   score:   scores[t, j] = sum_h (w[t, h] / sqrt(heads)) * relu(q[t, h] . k_j * scale) for every
//            visible position j (scale = 1 / sqrt(dim)). One invocation per (position, token).
//   top_k:   selected[t, :] = the `topk` highest-scoring visible positions, ties to the earlier,
//            in ascending order (all visible positions while there are at most `topk`). One
//            workgroup per token: the k-th largest score is found bit by bit on an order-keeping
//            integer form of the scores, then the chosen positions are compacted in order.
// The key cache holds `dim` values per row in cache.wgsl's formats (`--kv-cache`, as the latent
// cache; `dim` even); a token's rows start at its sequence's first row (`positions`: (position,
// first row) per token).

const WG: u32 = 64u;

struct Params {
    heads: u32,
    dim: u32,
    rope: u32,
    // Row length of `scores` (the context per sequence).
    ctx: u32,
    topk: u32,
    rope_scale: f32,
    // 1 / sqrt(dim) and sqrt(heads), as the host computes them in f32.
    scale: f32,
    sqrt_heads: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> positions: array<u32>;
@group(0) @binding(2) var<storage, read> keys: array<f32>;
@group(0) @binding(3) var<storage, read> norm: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read> inv_freq: array<f32>;
@group(0) @binding(6) var<storage, read_write> cache: array<u32>;
@group(0) @binding(7) var<storage, read_write> queries: array<f32>;
@group(0) @binding(8) var<storage, read> weights: array<f32>;
@group(0) @binding(9) var<storage, read_write> scores: array<f32>;
@group(0) @binding(10) var<storage, read_write> selected: array<u32>;

var<workgroup> sums: array<f32, 64>;
var<workgroup> normed: array<f32, 1024>; // the token's normalised key (dim <= 1024)
var<workgroup> rotated: array<f32, 1024>; // and rotated

fn workgroup_sum(v: f32, lane: u32) -> f32 {
    sums[lane] = v;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lane < stride) {
            sums[lane] += sums[lane + stride];
        }
        workgroupBarrier();
    }
    let total = sums[0];
    workgroupBarrier(); // sums is reused
    return total;
}

@compute @workgroup_size(64)
fn prepare(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let t = wid.x;
    let pos = positions[2u * t];
    let dst = (positions[2u * t + 1u] + pos) * p.dim;
    let src = t * p.dim;
    var acc = 0.0;
    for (var c = lane; c < p.dim; c += WG) {
        acc += keys[src + c];
    }
    let mean = workgroup_sum(acc, lane) / f32(p.dim);
    var dev = 0.0;
    for (var c = lane; c < p.dim; c += WG) {
        let d = keys[src + c] - mean;
        dev += d * d;
    }
    let inv = 1.0 / sqrt(workgroup_sum(dev, lane) / f32(p.dim) + 1e-6);
    for (var c = lane; c < p.dim; c += WG) {
        normed[c] = (keys[src + c] - mean) * inv * norm[c] + bias[c];
    }
    workgroupBarrier();
    let half = p.rope / 2u;
    for (var c = lane; c < p.dim; c += WG) {
        var v = normed[c];
        if (c < p.rope) {
            let j = c % half;
            let angle = f32(pos) * inv_freq[j];
            let cs = cos(angle) * p.rope_scale;
            let sn = sin(angle) * p.rope_scale;
            if (c < half) {
                v = normed[c] * cs - normed[c + half] * sn;
            } else {
                v = normed[c] * cs + normed[c - half] * sn;
            }
        }
        rotated[c] = v;
    }
    workgroupBarrier();
    for (var c2 = lane; c2 < p.dim / 2u; c2 += WG) {
        cache_store2(dst + 2u * c2, rotated[2u * c2], rotated[2u * c2 + 1u]);
    }
    for (var i = lane; i < p.heads * half; i += WG) {
        let h = i / half;
        let j = i % half;
        let angle = f32(pos) * inv_freq[j];
        let cs = cos(angle) * p.rope_scale;
        let sn = sin(angle) * p.rope_scale;
        let k = (t * p.heads + h) * p.dim + j;
        let a = queries[k];
        let b = queries[k + half];
        queries[k] = a * cs - b * sn;
        queries[k + half] = b * cs + a * sn;
    }
}

@compute @workgroup_size(64)
fn score(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let t = wid.y;
    let j = gid.x;
    if (j > positions[2u * t]) {
        return;
    }
    let key = (positions[2u * t + 1u] + j) * p.dim;
    var total = 0.0;
    for (var h = 0u; h < p.heads; h++) {
        let q = (t * p.heads + h) * p.dim;
        var dot = 0.0;
        for (var c = 0u; c < p.dim; c += 2u) {
            let k = cache_pair(key + c);
            dot += queries[q + c] * k.x;
            dot += queries[q + c + 1u] * k.y;
        }
        total += (weights[t * p.heads + h] / p.sqrt_heads) * max(dot * p.scale, 0.0);
    }
    scores[t * p.ctx + j] = total;
}

var<workgroup> count: atomic<u32>;
var<workgroup> scan_buf: array<u32, 64>;

// A float's bits as an integer with the floats' order (total order, -0 below +0).
fn ordered(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

// How many visible positions have an ordered score at least `at_least` (all lanes get it).
fn count_at_least(base: u32, visible: u32, at_least: u32, lane: u32) -> u32 {
    if (lane == 0u) {
        atomicStore(&count, 0u);
    }
    workgroupBarrier();
    var n = 0u;
    for (var j = lane; j < visible; j += WG) {
        n += u32(ordered(scores[base + j]) >= at_least);
    }
    atomicAdd(&count, n);
    workgroupBarrier();
    let total = atomicLoad(&count);
    workgroupBarrier();
    return total;
}

// Inclusive prefix sum of `v` over the workgroup's lanes, and the total (every lane gets it).
fn prefix_sum(v: u32, lane: u32) -> vec2<u32> {
    scan_buf[lane] = v;
    workgroupBarrier();
    for (var offset = 1u; offset < WG; offset <<= 1u) {
        let x = select(0u, scan_buf[lane - offset], lane >= offset);
        workgroupBarrier();
        scan_buf[lane] += x;
        workgroupBarrier();
    }
    let sums = vec2<u32>(scan_buf[lane], scan_buf[WG - 1u]);
    workgroupBarrier(); // scan_buf is reused
    return sums;
}

@compute @workgroup_size(64)
fn top_k(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let t = wid.x;
    let visible = positions[2u * t] + 1u;
    let base = t * p.ctx;
    let out = t * p.topk;
    if (visible <= p.topk) {
        for (var j = lane; j < visible; j += WG) {
            selected[out + j] = j;
        }
        return;
    }
    // The largest threshold with at least topk scores at or above it: the k-th largest score.
    var threshold = 0u;
    for (var bit = 32u; bit > 0u; bit--) {
        let candidate = threshold | (1u << (bit - 1u));
        if (count_at_least(base, visible, candidate, lane) >= p.topk) {
            threshold = candidate;
        }
    }
    // Scores above the threshold are all taken; of those equal to it, the earliest.
    var above = 0u;
    if (threshold != 0xffffffffu) {
        above = count_at_least(base, visible, threshold + 1u, lane);
    }
    let ties_wanted = p.topk - above;
    var taken = 0u;
    var ties = 0u;
    for (var j0 = 0u; j0 < visible; j0 += WG) {
        let j = j0 + lane;
        var key = 0u;
        if (j < visible) {
            key = ordered(scores[base + j]);
        }
        let tie = j < visible && key == threshold;
        let tie_rank = prefix_sum(u32(tie), lane);
        let chosen = (j < visible && key > threshold) || (tie && ties + tie_rank.x <= ties_wanted);
        let offset = prefix_sum(u32(chosen), lane);
        if (chosen) {
            selected[out + taken + offset.x - 1u] = j;
        }
        taken += offset.y;
        ties += tie_rank.y;
    }
}
