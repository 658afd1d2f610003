// The split attention's parameters and bindings, shared by its two forms (attention_split.wgsl,
// attention_subgroup.wgsl; prepended by the loader). A token attends to its sequence's cache rows
// row0 .. row0 + pos (`positions`: (pos, row0)); each split writes (m, l, o) per (head, token) to
// split_out, `chunk` positions per split, `splits` per token. With `topk` > 0 (DeepSeek-V3.2's
// sparse attention) a token attends only to the positions its indexer selected: `selected`
// holds up to `topk` of them per token, ascending (indexer.wgsl), and splits cover that list.

struct Params {
    heads: u32,
    qk: u32,
    nope: u32,
    chunk: u32,
    scale: f32,
    splits: u32,
    topk: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> q_lat: array<f32>;
@group(0) @binding(3) var<storage, read> positions: array<u32>;
@group(0) @binding(4) var<storage, read> cache: array<u32>;
@group(0) @binding(5) var<storage, read_write> split_out: array<f32>;
@group(0) @binding(7) var<storage, read> selected: array<u32>;

// How many cache positions token t attends to: every visible one, or its selection.
fn attended(t: u32) -> u32 {
    let visible = positions[2u * t] + 1u;
    if (p.topk == 0u) {
        return visible;
    }
    return min(visible, p.topk);
}

// The cache row of the i-th position token t attends to.
fn attended_row(t: u32, i: u32) -> u32 {
    let row0 = positions[2u * t + 1u];
    if (p.topk == 0u) {
        return row0 + i;
    }
    return row0 + selected[t * p.topk + i];
}
