// out[t, c] = embedding[tokens[t], c]  (ids were checked against the vocabulary on the host).
// Each row chunk of a split table writes the tokens whose rows it holds.

@group(0) @binding(3) var<uniform> step: Step;
@group(0) @binding(4) var<storage, read> tokens: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let t = gid.y;
    if (c < wl.cols && t < step.n_tokens) {
        let row = tokens[t];
        if (row >= wl.row0 && row < wl.row0 + wl.rows) {
            out[t * wl.cols + c] = weight(0u, row - wl.row0, c);
        }
    }
}
