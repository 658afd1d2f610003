// ids[row] = index of the largest logit in the row (the first on ties), or NON_FINITE
// (0xffffffff) when any logit of the row is NaN or infinite (the host reports it); one
// workgroup per row.

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
var<workgroup> non_finite: array<u32, 64>;

// NaN or an infinity: the exponent bits all set (a bit test, which no fast-math may drop).
fn is_non_finite(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7f800000u) == 0x7f800000u;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let base = wid.x * p.cols;
    var value = -3.4028235e38;
    var index = p.cols;
    var bad = 0u;
    for (var c = lane; c < p.cols; c += WG) {
        let v = logits[base + c];
        bad |= u32(is_non_finite(v));
        if (index == p.cols || v > value) {
            value = v;
            index = c;
        }
    }
    best_value[lane] = value;
    best_index[lane] = index;
    non_finite[lane] = bad;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lane < stride) {
            let v = best_value[lane + stride];
            let i = best_index[lane + stride];
            if (v > best_value[lane] || (v == best_value[lane] && i < best_index[lane])) {
                best_value[lane] = v;
                best_index[lane] = i;
            }
            non_finite[lane] |= non_finite[lane + stride];
        }
        workgroupBarrier();
    }
    if (lane == 0u) {
        ids[wid.x] = select(best_index[0], 0xffffffffu, non_finite[0] != 0u);
    }
}
