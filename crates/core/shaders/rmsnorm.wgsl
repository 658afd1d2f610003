// dst[row] = w * src[row] / sqrt(mean(src[row]^2) + eps), one workgroup per row.
// With `from_logits_row`, source rows start at step.logits_row0 (the final norm before lm_head).

const WG: u32 = 64u;

struct Params {
    dim: u32,
    eps: f32,
    from_logits_row: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> src: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<f32>;
@group(0) @binding(4) var<storage, read_write> dst: array<f32>;

var<workgroup> sums: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let row = wid.x;
    let src_row = row + select(0u, step.logits_row0, p.from_logits_row == 1u);
    let base = src_row * p.dim;
    var acc = 0.0;
    for (var c = lane; c < p.dim; c += WG) {
        let v = src[base + c];
        acc += v * v;
    }
    sums[lane] = acc;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lane < stride) {
            sums[lane] += sums[lane + stride];
        }
        workgroupBarrier();
    }
    let inv = inverseSqrt(sums[0] / f32(p.dim) + p.eps);
    for (var c = lane; c < p.dim; c += WG) {
        dst[row * p.dim + c] = w[c] * (src[base + c] * inv);
    }
}
