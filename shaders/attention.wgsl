// Causal latent attention (absorbed MLA), one workgroup per (head, token), over the token's
// sequence's rows of the cache (from row0, `positions` holding (pos, row0) per token):
//   score[j] = (q_lat . c_kv[row0 + j] + q_pe . k_pe[row0 + j]) * scale   for j <= pos
//   o_lat    = sum_j softmax(score)[j] * c_kv[j]
// Scores go through a scratch row of `ctx` floats per (token, head).

const WG: u32 = 64u;
// The latent widths, fixed per model, as pipeline constants: the score loops run inside a
// data-dependent loop, where buffer-bounded loops compile very poorly on llvmpipe.
override LORA: u32;
override ROPE: u32;

struct Params {
    heads: u32,
    lora: u32,
    rope: u32,
    qk: u32,
    nope: u32,
    ctx: u32,
    scale: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> q_lat: array<f32>;
@group(0) @binding(3) var<storage, read> positions: array<u32>;
@group(0) @binding(4) var<storage, read> cache: array<f32>;
@group(0) @binding(5) var<storage, read_write> scores: array<f32>;
@group(0) @binding(6) var<storage, read_write> o_lat: array<f32>;

var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let h = wid.x;
    let t = wid.y;
    let head = t * p.heads + h;
    let visible = positions[2u * t] + 1u;
    let latent = LORA + ROPE;
    let first = positions[2u * t + 1u] * latent;
    let lat = head * LORA;
    let pe = head * p.qk + p.nope;
    let row = head * p.ctx;

    var best = -3.4e38;
    for (var j = lane; j < visible; j += WG) {
        var s = 0.0;
        for (var c = 0u; c < LORA; c++) {
            s += q_lat[lat + c] * cache[first + j * latent + c];
        }
        for (var c = 0u; c < ROPE; c++) {
            s += q[pe + c] * cache[first + j * latent + LORA + c];
        }
        s *= p.scale;
        scores[row + j] = s;
        best = max(best, s);
    }
    red[lane] = best;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lane < stride) {
            red[lane] = max(red[lane], red[lane + stride]);
        }
        workgroupBarrier();
    }
    let m = red[0];
    workgroupBarrier();

    var total = 0.0;
    for (var j = lane; j < visible; j += WG) {
        let e = exp(scores[row + j] - m);
        scores[row + j] = e;
        total += e;
    }
    red[lane] = total;
    storageBarrier();
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lane < stride) {
            red[lane] += red[lane + stride];
        }
        workgroupBarrier();
    }
    let norm = 1.0 / red[0];

    for (var c = lane; c < LORA; c += WG) {
        var acc = 0.0;
        for (var j = 0u; j < visible; j++) {
            acc += scores[row + j] * cache[first + j * latent + c];
        }
        o_lat[lat + c] = acc * norm;
    }
}
