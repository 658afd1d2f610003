// Prefill GEMM: y[t, r] = sum_c W[r, c] * x[t, c] over a tile of 64 rows by TN tokens per
// workgroup (matmul.wgsl is the mat-vec form, for steps of a few tokens and for routed experts).
//
// The columns go by in chunks of KW weight words. Each chunk's weights are read by consecutive
// lanes along each row (coalesced), decoded once into workgroup memory, and the tile's
// activations under them staged beside; then lane l computes row r0 + l for all TN tokens from
// workgroup memory: the weight it reads is its own (consecutive lanes, consecutive words: no
// bank conflicts), the activation the same for every lane (a broadcast). The TN sums stay in
// registers and never cross lanes. Each weight is read from memory once per TN tokens, each
// activation once per 64 rows.
// (On CPU adapters, where every lane's load costs alike wherever it reads, matmul.wgsl's register
// tiles measure faster, and the lowering uses them there.)
// Needs cols % ELEMS == 0 and FP8/q8 blocks of whole words (the lowering checks).

override COLS: u32;
override TN: u32 = 16u; // at most MAX_TN
// Weight words per column chunk.
const KW: u32 = 8u;
const MAX_TN: u32 = 16u;

struct Params {
    accumulate: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(3) var<uniform> p: Params;
@group(0) @binding(4) var<uniform> step: Step;
@group(0) @binding(5) var<storage, read> x: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;

// xs[t * KW + w]: token t's ELEMS activations under weight word w of the chunk (2 KiB).
var<workgroup> xs: array<vec4<f32>, 128>; // MAX_TN * KW
// ws[w * 64 + m]: row r0 + m's decoded word w of the chunk (8 KiB).
var<workgroup> ws: array<vec4<f32>, 512>; // KW * 64

fn dot_elems(w: vec4<f32>, v: vec4<f32>) -> f32 {
    // Only the ELEMS components a word holds (the rest are zero).
    var d = w.x * v.x;
    if (ELEMS >= 2u) {
        d += w.y * v.y;
    }
    if (ELEMS == 4u) {
        d += w.z * v.z + w.w * v.w;
    }
    return d;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let r0 = (wid.x + wid.y * groups.x) * 64u;
    let tokens = step.n_tokens;
    let t0 = wid.z * TN;
    // The tile's tokens (a short last tile repeats its last token; those sums are not written).
    let count = min(TN, tokens - min(t0, tokens));
    if (count == 0u) {
        return;
    }
    let words = COLS / ELEMS;
    var acc: array<f32, MAX_TN>;
    for (var k0 = 0u; k0 < words; k0 += KW) {
        for (var i = lane; i < TN * KW; i += 64u) {
            let wi = min(k0 + i % KW, words - 1u);
            let base = (t0 + min(i / KW, count - 1u)) * COLS + wi * ELEMS;
            var v = vec4<f32>(x[base], 0.0, 0.0, 0.0);
            if (ELEMS >= 2u) { v.y = x[base + 1u]; }
            if (ELEMS == 4u) { v.z = x[base + 2u]; v.w = x[base + 3u]; }
            xs[i] = v;
        }
        // Consecutive lanes take consecutive words of a row.
        for (var i = lane; i < 64u * KW; i += 64u) {
            let m = i / KW;
            let w = i % KW;
            ws[w * 64u + m] = weight_word(0u, min(r0 + m, wl.rows - 1u), min(k0 + w, words - 1u));
        }
        workgroupBarrier();
        let chunk = min(KW, words - k0);
        for (var w = 0u; w < chunk; w++) {
            let wv = ws[w * 64u + lane];
            for (var t = 0u; t < TN; t++) {
                acc[t] += dot_elems(wv, xs[t * KW + w]);
            }
        }
        workgroupBarrier();
    }
    let r = r0 + lane;
    if (r < wl.rows) {
        for (var t = 0u; t < count; t++) {
            let o = (t0 + t) * wl.total_rows + wl.row0 + r;
            y[o] = select(acc[t], y[o] + acc[t], p.accumulate == 1u);
        }
    }
}
