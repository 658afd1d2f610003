// y[s, r] = sum_c W_e(s)[r, c] * x[s / x_div, c] for the slots s of this step.
//
// A workgroup's lanes form 64 / CL groups of CL lanes; each group computes ROWS output rows for
// TILE slots: each weight element is decoded once and used for every slot of the tile (TILE = 1
// for decode and for routed experts, whose slots each read another expert, ids[s]; more for
// prefill chunks). Consecutive lanes of a group read consecutive columns. CL = 64 (one group)
// suits GPUs; CPU adapters take smaller groups, whose lanes each run a longer loop over the
// columns, so the fixed cost of a workgroup (setup and the sum across lanes) weighs less.
// Slots: n_tokens * slots_per_token, or fixed_slots when set (only the last position's logits).
// A chunk of a split matrix writes its rows at their place in y (wl.row0).
// COLS, TILE and USE_IDS are pipeline constants: constant loop bounds compile far better.
// Lane steps multiply through arith_f32.wgsl (exact) or arith_f16.wgsl (f16 products, opt-in).

// WG (64) comes with the reduce snippet.
override COLS: u32;
override TILE: u32 = 1u;
// Output rows per lane group: more for decode (fewer, fatter workgroups), fewer for prefill tiles
// (ROWS * TILE accumulators per lane, at most 32).
override ROWS: u32 = 4u;
// Lanes per group (a divisor of 64).
override CL: u32 = 64u;
// 16-byte weight loads (`weights4`, the same buffer as `weights`): set by the lowering for
// formats of one step per word whose rows are whole 16-byte units (GPUs; on CPU adapters every
// lane's load costs alike and the wider step measured slower).
override WIDE: u32 = 0u;
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
@group(0) @binding(8) var<storage, read> weights4: array<vec4<u32>>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>, ids_in: LaneIds) {
    let lane = ids_in.lane;
    let column_lane = lane % CL;
    let r0 = ((wid.x + wid.y * groups.x) * (64u / CL) + lane / CL) * ROWS;
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
    if (WIDE == 1u) {
        // 16 bytes per lane step: four words of a row in one load, each decoded as below.
        for (var qi = column_lane; qi < COLS / ELEMS / 4u; qi += CL) {
            var xs: array<Arith4, 32>; // TILE x 4 words
            for (var t = 0u; t < TILE; t++) {
                for (var k = 0u; k < 4u; k++) {
                    let base = (slot[t] / p.x_div) * COLS + (qi * 4u + k) * ELEMS;
                    var v = vec4<f32>(x[base], 0.0, 0.0, 0.0);
                    if (ELEMS >= 2u) { v.y = x[base + 1u]; }
                    if (ELEMS == 4u) { v.z = x[base + 2u]; v.w = x[base + 3u]; }
                    xs[t * 4u + k] = arith_x(v);
                }
            }
            for (var rr = 0u; rr < ROWS; rr++) {
                let r = min(r0 + rr, wl.rows - 1u);
                let words = weights4[(expert * wl.expert_stride + r * wl.cols) / (4u * ELEMS) + qi];
                for (var k = 0u; k < 4u; k++) {
                    let w = arith_word(words[k], expert, r, qi * 4u + k);
                    let scale = arith_scale(expert, r, qi * 4u + k);
                    for (var t = 0u; t < TILE; t++) {
                        acc[rr * TILE + t] += arith_dot(w, xs[t * 4u + k]) * scale;
                    }
                }
            }
        }
    } else if (COLS % ELEMS == 0u && (ELEMS != 4u || wl.block_cols % 4u == 0u)) {
        // Whole words per lane step: one load and decode give ELEMS weights.
        for (var wi = column_lane; wi < COLS / ELEMS; wi += CL) {
            var xs: array<Arith4, 8>;
            for (var t = 0u; t < TILE; t++) {
                let base = (slot[t] / p.x_div) * COLS + wi * ELEMS;
                var v = vec4<f32>(x[base], 0.0, 0.0, 0.0);
                if (ELEMS >= 2u) { v.y = x[base + 1u]; }
                if (ELEMS == 4u) { v.z = x[base + 2u]; v.w = x[base + 3u]; }
                xs[t] = arith_x(v);
            }
            for (var rr = 0u; rr < ROWS; rr++) {
                let r = min(r0 + rr, wl.rows - 1u);
                let w = arith_step(expert, r, wi);
                let scale = arith_scale(expert, r, wi);
                for (var t = 0u; t < TILE; t++) {
                    acc[rr * TILE + t] += arith_dot(w, xs[t]) * scale;
                }
            }
        }
    } else {
        for (var c = column_lane; c < COLS; c += CL) {
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
    // Partial sums meet behind a single barrier (through subgroups where the adapter has them,
    // for a single group).
    if (CL == WG) {
        let total = sum_over_lanes(acc, ROWS * TILE, ids_in);
        if (lane < ROWS * TILE) {
            write_sum(r0 + lane / TILE, lane % TILE, total, count, slots, slot);
        }
        return;
    }
    for (var i = 0u; i < ROWS * TILE; i++) {
        partial[i * WG + lane] = acc[i];
    }
    workgroupBarrier();
    let per_group = ROWS * TILE;
    for (var o = lane; o < (WG / CL) * per_group; o += WG) {
        let g = o / per_group;
        let i = o % per_group;
        var total = 0.0;
        for (var j = 0u; j < CL; j++) {
            total += partial[i * WG + g * CL + j];
        }
        let group_r0 = ((wid.x + wid.y * groups.x) * (WG / CL) + g) * ROWS;
        write_sum(group_r0 + i / TILE, i % TILE, total, count, slots, slot);
    }
}

// Row r's sum for the t-th slot of the tile.
fn write_sum(r: u32, t: u32, total: f32, count: u32, slots: u32, slot: array<u32, 8>) {
    let s = slot[t];
    if (r < wl.rows && t < count && s < slots) {
        let o = s * wl.total_rows + wl.row0 + r;
        y[o] = select(total, y[o] + total, p.accumulate == 1u);
    }
}
