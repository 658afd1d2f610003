// h[t, d] += sum_i w[t, i] * expert_out[t * k + i, d] + shared[t, d]: the MoE output joins the residual.
// A zero weight adds nothing, whatever its row holds (a slot the host computes, hybrid placement).

struct Params {
    dim: u32,
    top_k: u32,
    has_shared: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> expert_out: array<f32>;
@group(0) @binding(3) var<storage, read> route_weights: array<f32>;
@group(0) @binding(4) var<storage, read> shared_out: array<f32>;
@group(0) @binding(5) var<storage, read_write> h: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let d = gid.x;
    let t = gid.y;
    if (d >= p.dim || t >= step.n_tokens) {
        return;
    }
    var acc = 0.0;
    for (var i = 0u; i < p.top_k; i++) {
        let s = t * p.top_k + i;
        let w = route_weights[s];
        if (w != 0.0) {
            acc += w * expert_out[s * p.dim + d];
        }
    }
    if (p.has_shared == 1u) {
        acc += shared_out[t * p.dim + d];
    }
    h[t * p.dim + d] += acc;
}
