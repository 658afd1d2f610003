// Expert selection per token (one workgroup per token), the same rules as the CPU reference:
// sigmoid or softmax scores; optional correction bias for choosing only; group-limited top-k
// (groups ranked by top-2 sum for noaux_tc, by max for group_limited_greedy); ties to the lower
// index; weights = unbiased scores, optionally normalised, times the scaling factor.
// Selection is sequential in lane 0: at most a few hundred experts and k <= 16 per token.

const MAX_EXPERTS: u32 = 1024u;
const NEG_INF: f32 = -3.4028235e38;

struct Params {
    experts: u32,
    top_k: u32,
    n_group: u32,
    topk_group: u32,
    softmax: u32,
    method: u32, // 0 greedy, 1 group_limited_greedy, 2 noaux_tc
    normalize: u32,
    has_bias: u32,
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

var<workgroup> scores: array<f32, 1024>;
var<workgroup> choice: array<f32, 1024>;
var<workgroup> taken: array<u32, 1024>;

// Index of the best untaken choice among [first, first + count); ties to the lower index.
fn best_untaken(first: u32, count: u32) -> u32 {
    var best = first + count;
    for (var e = first; e < first + count; e++) {
        if (taken[e] == 0u && (best == first + count || choice[e] > choice[best])) {
            best = e;
        }
    }
    return best;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let t = wid.x;
    if (t >= step.n_tokens) {
        return;
    }
    let n = p.experts;
    for (var e = lane; e < n; e += 64u) {
        let l = logits[t * n + e];
        scores[e] = select(1.0 / (1.0 + exp(-l)), l, p.softmax == 1u);
        taken[e] = 0u;
    }
    workgroupBarrier();
    if (lane != 0u) {
        return;
    }
    if (p.softmax == 1u) {
        var m = NEG_INF;
        for (var e = 0u; e < n; e++) { m = max(m, scores[e]); }
        var total = 0.0;
        for (var e = 0u; e < n; e++) { scores[e] = exp(scores[e] - m); total += scores[e]; }
        for (var e = 0u; e < n; e++) { scores[e] = scores[e] / total; }
    }
    for (var e = 0u; e < n; e++) {
        choice[e] = scores[e] + select(0.0, bias[e], p.has_bias == 1u);
    }

    if (p.method != 0u && p.n_group > 1u) {
        let size = n / p.n_group;
        // Group scores go in `scores`' shadow: reuse `taken` as a kept-group flag per group.
        var group_score: array<f32, 64>;
        for (var g = 0u; g < p.n_group; g++) {
            let first = g * size;
            let a = best_untaken(first, size);
            if (p.method == 2u) {
                taken[a] = 1u;
                let b = best_untaken(first, size);
                taken[a] = 0u;
                group_score[g] = choice[a] + choice[b];
            } else {
                group_score[g] = choice[a];
            }
        }
        var kept: array<u32, 64>;
        for (var i = 0u; i < p.topk_group; i++) {
            var best = p.n_group;
            for (var g = 0u; g < p.n_group; g++) {
                if (kept[g] == 0u && (best == p.n_group || group_score[g] > group_score[best])) {
                    best = g;
                }
            }
            kept[best] = 1u;
        }
        for (var e = 0u; e < n; e++) {
            if (kept[e / size] == 0u) {
                choice[e] = NEG_INF;
            }
        }
    }

    var total = 0.0;
    for (var i = 0u; i < p.top_k; i++) {
        let e = best_untaken(0u, n);
        taken[e] = 1u;
        ids[t * p.top_k + i] = e;
        total += scores[e];
    }
    let denom = select(1.0, total + 1e-20, p.normalize == 1u);
    for (var i = 0u; i < p.top_k; i++) {
        weights_out[t * p.top_k + i] = scores[ids[t * p.top_k + i]] / denom * p.scaling;
    }
}
