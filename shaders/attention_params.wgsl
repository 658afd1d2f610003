// The split attention's parameters and bindings, shared by its two forms (attention_split.wgsl,
// attention_subgroup.wgsl; prepended by the loader). A token attends to its sequence's cache rows
// row0 .. row0 + pos (`positions`: (pos, row0)); each split writes (m, l, o) per (head, token) to
// split_out, `chunk` positions per split, `splits` per token.

struct Params {
    heads: u32,
    qk: u32,
    nope: u32,
    chunk: u32,
    scale: f32,
    splits: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> q_lat: array<f32>;
@group(0) @binding(3) var<storage, read> positions: array<u32>;
@group(0) @binding(4) var<storage, read> cache: array<u32>;
@group(0) @binding(5) var<storage, read_write> split_out: array<f32>;
