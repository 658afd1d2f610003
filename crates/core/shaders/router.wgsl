// Expert selection per token (one workgroup per token), the same rules as the CPU reference:
// sigmoid or softmax scores; an optional correction bias that chooses but never weighs;
// group-limited top-k (groups ranked by their top-2 sum for noaux_tc, by their max for
// group_limited_greedy); ties to the lower index; weights = unbiased scores, optionally
// normalised, times the scaling factor.
//
// Top-k is a parallel ranking: an expert's rank is the number of experts that beat it, so the
// k experts of rank < k are the choice, in order. Loops are plain counted loops with selects:
// data-dependent branches inside loops run very slowly on software adapters (llvmpipe).

const WG: u32 = 64u;
const MAX_EXPERTS: u32 = 1024u;
const MAX_GROUPS: u32 = 64u;
const MAX_TOP_K: u32 = 16u;
const NEG_INF: f32 = -3.4028235e38;

// The model's routing shape, fixed per model, as pipeline constants: loops with constant bounds
// compile far better than loops bounded by buffer values (on llvmpipe by orders of magnitude).
override EXPERTS: u32;
override TOP_K: u32;
override N_GROUP: u32;
override TOPK_GROUP: u32;
override SOFTMAX: u32;
override METHOD: u32; // 0 greedy, 1 group_limited_greedy, 2 noaux_tc
override NORMALIZE: u32;
override HAS_BIAS: u32;

struct Params {
    scaling: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> logits: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> ids: array<u32>;
@group(0) @binding(5) var<storage, read_write> weights_out: array<f32>;

var<workgroup> scores: array<f32, MAX_EXPERTS>;
var<workgroup> choice: array<f32, MAX_EXPERTS>;
var<workgroup> group_score: array<f32, MAX_GROUPS>;
var<workgroup> group_kept: array<u32, MAX_GROUPS>;
var<workgroup> chosen: array<u32, MAX_TOP_K>;

// Does `a` (value, index) rank before `b`? Higher value first, then lower index.
fn beats(va: f32, ia: u32, vb: f32, ib: u32) -> bool {
    return va > vb || (va == vb && ia < ib);
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let t = wid.x;
    let n = EXPERTS;
    let base = t * n;

    // Softmax normaliser, computed redundantly by every lane (n is a few hundred at most).
    var max_logit = NEG_INF;
    var denom = 0.0;
    if (SOFTMAX == 1u) {
        for (var e = 0u; e < n; e++) {
            max_logit = max(max_logit, logits[base + e]);
        }
        for (var e = 0u; e < n; e++) {
            denom += exp(logits[base + e] - max_logit);
        }
    }
    for (var e = lane; e < n; e += WG) {
        let l = logits[base + e];
        let s = select(1.0 / (1.0 + exp(-l)), exp(l - max_logit) / denom, SOFTMAX == 1u);
        scores[e] = s;
        choice[e] = s + select(0.0, bias[e], HAS_BIAS == 1u);
    }
    workgroupBarrier();

    if (METHOD != 0u && N_GROUP > 1u) {
        let size = n / N_GROUP;
        for (var g = lane; g < N_GROUP; g += WG) {
            var first = NEG_INF;
            var second = NEG_INF;
            for (var e = g * size; e < (g + 1u) * size; e++) {
                let c = choice[e];
                second = select(max(second, c), first, c > first);
                first = max(first, c);
            }
            group_score[g] = select(first, first + second, METHOD == 2u);
        }
        workgroupBarrier();
        for (var g = lane; g < N_GROUP; g += WG) {
            var rank = 0u;
            for (var h = 0u; h < N_GROUP; h++) {
                rank += u32(beats(group_score[h], h, group_score[g], g));
            }
            group_kept[g] = u32(rank < TOPK_GROUP);
        }
        workgroupBarrier();
        for (var e = lane; e < n; e += WG) {
            choice[e] = select(NEG_INF, choice[e], group_kept[e / size] == 1u);
        }
        workgroupBarrier();
    }

    for (var e = lane; e < n; e += WG) {
        var rank = 0u;
        let c = choice[e];
        for (var f = 0u; f < n; f++) {
            rank += u32(beats(choice[f], f, c, e));
        }
        if (rank < TOP_K) {
            chosen[rank] = e;
        }
    }
    workgroupBarrier();

    if (lane == 0u && t < step.n_tokens) {
        var total = 0.0;
        for (var i = 0u; i < TOP_K; i++) {
            total += scores[chosen[i]];
        }
        let norm = select(1.0, total + 1e-20, NORMALIZE == 1u);
        for (var i = 0u; i < TOP_K; i++) {
            ids[t * TOP_K + i] = chosen[i];
            weights_out[t * TOP_K + i] = scores[chosen[i]] / norm * p.scaling;
        }
    }
}
