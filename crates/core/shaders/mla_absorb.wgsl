// The two halves of kv_b_proj ([heads * (nope + v), lora]) applied per head in the absorbed form:
//   q_absorb: q_lat[t, h, c] = sum_d W_UK[h][d, c] * q[t, h, d]        (d < nope)
//   v_up:     o[t, h, i]     = sum_c W_UV[h][i, c] * o_lat[t, h, c]     (i < v)
// One lane per output element.

struct Params {
    heads: u32,
    nope: u32,
    v: u32,
    qk: u32,
}

@group(0) @binding(3) var<uniform> p: Params;
@group(0) @binding(4) var<uniform> step: Step;
@group(0) @binding(5) var<storage, read> src: array<f32>;
@group(0) @binding(6) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(64)
fn q_absorb(@builtin(global_invocation_id) gid: vec3<u32>) {
    let lora = wl.cols;
    let c = gid.x;
    let head = gid.y; // t * heads + h
    if (c >= lora || head >= step.n_tokens * p.heads) {
        return;
    }
    let h = head % p.heads;
    let row0 = h * (p.nope + p.v);
    let q = head * p.qk;
    var acc = 0.0;
    for (var d = 0u; d < p.nope; d++) {
        acc += weight(0u, row0 + d, c) * src[q + d];
    }
    dst[head * lora + c] = acc;
}

@compute @workgroup_size(64)
fn v_up(@builtin(global_invocation_id) gid: vec3<u32>) {
    let lora = wl.cols;
    let i = gid.x;
    let head = gid.y;
    if (i >= p.v || head >= step.n_tokens * p.heads) {
        return;
    }
    let h = head % p.heads;
    let row = h * (p.nope + p.v) + p.nope + i;
    var acc = 0.0;
    for (var c = 0u; c < lora; c++) {
        acc += weight(0u, row, c) * src[head * lora + c];
    }
    dst[head * p.v + i] = acc;
}
