// y[s, r] = sum_c W_e(s)[r, c] * x[s / x_div, c] for the slots s of this step.
//
// A workgroup computes ROWS output rows for TILE slots: each weight element is decoded once and
// used for every slot of the tile (TILE = 1 for decode and for routed experts, whose slots each
// read another expert, ids[s]; TILE = 8 for prefill chunks). Consecutive lanes read consecutive
// columns.
// Slots: n_tokens * slots_per_token, or fixed_slots when set (only the last position's logits).
// A chunk of a split matrix writes its rows at their place in y (wl.row0).
// COLS, TILE and USE_IDS are pipeline constants: constant loop bounds compile far better.

// WG (64) comes with the reduce snippet.
override COLS: u32;
override TILE: u32 = 1u;
// Output rows per workgroup: more for decode (fewer, fatter workgroups), fewer for prefill tiles
// (ROWS * TILE accumulators per lane, at most 32).
override ROWS: u32 = 4u;
override USE_IDS: u32 = 0u;
// Expert streaming: `ids` lists (slot, expert) pairs, one per workgroup z, and the host sizes an
// indirect dispatch to the list, so only the slots a pool of the expert cache serves are computed.
override SLOT_LIST: u32 = 0u;
// Routed experts grouped by expert (group_experts.wgsl's output in `ids`): workgroup z takes
// tile z, up to TILE slots of one expert, so the expert's weights are decoded once for all of
// them (an indirect dispatch launches one workgroup per tile and row group).
override GROUPED: u32 = 0u;

struct Params {
    slots_per_token: u32,
    x_div: u32,
    fixed_slots: u32,
    accumulate: u32,
}

@group(0) @binding(3) var<uniform> p: Params;
@group(0) @binding(4) var<uniform> step: Step;
@group(0) @binding(5) var<storage, read> x: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;
@group(0) @binding(7) var<storage, read> ids: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>, ids_in: LaneIds) {
    let lane = ids_in.lane;
    let r0 = (wid.x + wid.y * groups.x) * ROWS;
    let slots = select(step.n_tokens * p.slots_per_token, p.fixed_slots, p.fixed_slots != 0u);
    var s0 = wid.z * TILE;
    var expert = select(0u, ids[min(s0, slots - 1u)], USE_IDS == 1u);
    // Slots this workgroup computes (the rest of a last tile is skipped).
    var count = min(TILE, slots - min(s0, slots));
    if (SLOT_LIST == 1u) {
        s0 = ids[2u * wid.z];
        expert = ids[2u * wid.z + 1u];
        count = 1u;
    }
    // The t-th slot of the tile: its place in the step, and the row of x it reads.
    var order = 0u;
    if (GROUPED == 1u) {
        if (wid.z >= ids[0]) {
            return;
        }
        expert = ids[12u + 3u * wid.z];
        s0 = ids[13u + 3u * wid.z];
        count = ids[14u + 3u * wid.z];
        order = 12u + 3u * slots;
    }
    var slot: array<u32, 8>;
    for (var t = 0u; t < TILE; t++) {
        let i = min(t, max(count, 1u) - 1u);
        slot[t] = select(min(s0 + i, slots - 1u), ids[order + s0 + i], GROUPED == 1u);
    }
    var acc: array<f32, 32>; // ROWS * TILE
    if (COLS % ELEMS == 0u && (ELEMS != 4u || wl.block_cols % 4u == 0u)) {
        // Whole words per lane step: one load and decode give ELEMS weights.
        for (var wi = lane; wi < COLS / ELEMS; wi += WG) {
            var xs: array<vec4<f32>, 8>;
            for (var t = 0u; t < TILE; t++) {
                let base = (slot[t] / p.x_div) * COLS + wi * ELEMS;
                var v = vec4<f32>(x[base], 0.0, 0.0, 0.0);
                if (ELEMS >= 2u) { v.y = x[base + 1u]; }
                if (ELEMS == 4u) { v.z = x[base + 2u]; v.w = x[base + 3u]; }
                xs[t] = v;
            }
            for (var rr = 0u; rr < ROWS; rr++) {
                let w = weight_word(expert, min(r0 + rr, wl.rows - 1u), wi);
                for (var t = 0u; t < TILE; t++) {
                    acc[rr * TILE + t] += dot(w, xs[t]);
                }
            }
        }
    } else {
        for (var c = lane; c < COLS; c += WG) {
            var xs: array<f32, 8>;
            for (var t = 0u; t < TILE; t++) {
                xs[t] = x[(slot[t] / p.x_div) * COLS + c];
            }
            for (var rr = 0u; rr < ROWS; rr++) {
                let w = weight(expert, min(r0 + rr, wl.rows - 1u), c);
                for (var t = 0u; t < TILE; t++) {
                    acc[rr * TILE + t] += w * xs[t];
                }
            }
        }
    }
    // Partial sums meet behind a single barrier (through subgroups where the adapter has them).
    let total = sum_over_lanes(acc, ROWS * TILE, ids_in);
    if (lane < ROWS * TILE) {
        let r = r0 + lane / TILE;
        let t = lane % TILE;
        let s = slot[t];
        if (r < wl.rows && t < count && s < slots) {
            let o = s * wl.total_rows + wl.row0 + r;
            y[o] = select(total, y[o] + total, p.accumulate == 1u);
        }
    }
}
