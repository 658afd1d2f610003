// y[s, r] = sum_c W_e(s)[r, c] * x[s / x_div, c] for every slot s of this step.
//
// One workgroup computes one output row for a tile of TILE slots: each weight element is decoded
// once and used for all of them (matrix-vector when the step has one token, matrix-matrix for
// prefill chunks). Consecutive lanes read consecutive columns. With `use_ids`, slot s reads the
// stacked expert ids[s] (routed experts: the router's choice never leaves the GPU).
// Slots: n_tokens * slots_per_token (top-k slots per token for experts).

const WG: u32 = 64u;
const TILE: u32 = 8u;
// The weight's column count as a pipeline constant: constant loop bounds compile much better.
override COLS: u32;

struct Params {
    slots_per_token: u32,
    x_div: u32,
    use_ids: u32,
    accumulate: u32,
}

@group(0) @binding(3) var<uniform> p: Params;
@group(0) @binding(4) var<uniform> step: Step;
@group(0) @binding(5) var<storage, read> x: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;
@group(0) @binding(7) var<storage, read> ids: array<u32>;

var<workgroup> partial: array<f32, 512>; // TILE * WG

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    let r = wid.x + wid.y * groups.x;
    let slots = step.n_tokens * p.slots_per_token;
    let s0 = wid.z * TILE;
    let cols = COLS;
    var acc: array<f32, 8>;
    if (r < wl.rows) {
        for (var c = lane; c < cols; c += WG) {
            if (p.use_ids == 0u) {
                let w = weight(0u, r, c);
                for (var i = 0u; i < TILE; i++) {
                    let s = s0 + i;
                    if (s < slots) {
                        acc[i] += w * x[(s / p.x_div) * cols + c];
                    }
                }
            } else {
                for (var i = 0u; i < TILE; i++) {
                    let s = s0 + i;
                    if (s < slots) {
                        acc[i] += weight(ids[s], r, c) * x[(s / p.x_div) * cols + c];
                    }
                }
            }
        }
    }
    for (var i = 0u; i < TILE; i++) {
        partial[i * WG + lane] = acc[i];
    }
    // One barrier, then a lane per slot sums the 64 partials: barriers are what software
    // adapters pay most for, and 64 adds are nothing.
    workgroupBarrier();
    var total = 0.0;
    if (lane < TILE) {
        for (var j = 0u; j < WG; j++) {
            total += partial[lane * WG + j];
        }
    }
    let s = s0 + lane;
    if (lane < TILE && r < wl.rows && s < slots) {
        let o = s * wl.rows + r;
        y[o] = select(total, y[o] + total, p.accumulate == 1u);
    }
}
