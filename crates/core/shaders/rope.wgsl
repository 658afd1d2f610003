// Rotates the rope part of every query head in place (interleaved pairs), at each token's position
// (`positions`: (position, first cache row of its sequence) per token).

struct Params {
    heads: u32,
    qk: u32,
    nope: u32,
    rope_scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> inv_freq: array<f32>;
@group(0) @binding(3) var<storage, read> positions: array<u32>;
@group(0) @binding(4) var<storage, read_write> q: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let pairs = (p.qk - p.nope) / 2u;
    let i = gid.x;
    if (i >= step.n_tokens * p.heads * pairs) {
        return;
    }
    let j = i % pairs;
    let head = i / pairs; // t * heads + h
    let t = head / p.heads;
    let angle = f32(positions[2u * t]) * inv_freq[j];
    let cs = cos(angle) * p.rope_scale;
    let sn = sin(angle) * p.rope_scale;
    let k = head * p.qk + p.nope + 2u * j;
    let a = q[k];
    let b = q[k + 1u];
    q[k] = a * cs - b * sn;
    q[k + 1u] = a * sn + b * cs;
}
