// ids[row] = index of the largest logit in the row (the first on ties); one workgroup per row.

const WG: u32 = 64u;

struct Params {
    cols: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> ids: array<u32>;

var<workgroup> best_value: array<f32, 64>;
var<workgroup> best_index: array<u32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let base = wid.x * p.cols;
    var value = -3.4028235e38;
    var index = p.cols;
    for (var c = lane; c < p.cols; c += WG) {
        let v = logits[base + c];
        if (index == p.cols || v > value) {
            value = v;
            index = c;
        }
    }
    best_value[lane] = value;
    best_index[lane] = index;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lane < stride) {
            let v = best_value[lane + stride];
            let i = best_index[lane + stride];
            if (v > best_value[lane] || (v == best_value[lane] && i < best_index[lane])) {
                best_value[lane] = v;
                best_index[lane] = i;
            }
        }
        workgroupBarrier();
    }
    if (lane == 0u) {
        ids[wid.x] = best_index[0];
    }
}
