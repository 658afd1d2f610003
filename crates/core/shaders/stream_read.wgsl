// The bandwidth reference for benchmarks: reads `words` u32s, consecutive lanes reading
// consecutive words (the best pattern for software and hardware adapters alike), and writes one
// sum per lane so the reads cannot be optimised away.

struct Params {
    words: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> sums: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let lanes = groups.x * 64u;
    var acc = 0u;
    for (var i = gid.x; i < p.words; i += lanes) {
        acc += src[i];
    }
    sums[gid.x] = acc;
}
