// Groups a step's routed-expert slots by expert, for matmul.wgsl's GROUPED mode, so each
// expert's weights are read once per tile of up to TILE of its slots instead of once per slot:
//   groups[0]                    = the number of tiles
//   groups[4..7], groups[8..11]  = indirect workgroup counts for the gate/up and the down matmul:
//                                  (row groups, 1, tiles), so no workgroup is launched idle
//   groups[12 + 3i .. 12 + 3i + 3] = tile i: (expert, first, count), count <= TILE slots of one expert
//   groups[12 + 3 * slots + j]   = the step's slots ordered by expert (first indexes this list)
// One invocation: a counting sort over the step's slots and at most MAX_EXPERTS experts.

override TILE: u32;
const MAX_EXPERTS: u32 = 1024u;

struct Params {
    slots_per_token: u32,
    experts: u32,
    // Row groups of the gate/up and of the down matrices (the matmul's grid x).
    gate_up_groups: u32,
    down_groups: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> groups: array<u32>;

var<workgroup> start: array<u32, 1025>;

@compute @workgroup_size(1)
fn main() {
    let slots = step.n_tokens * p.slots_per_token;
    let experts = min(p.experts, MAX_EXPERTS);
    for (var e = 0u; e <= experts; e++) {
        start[e] = 0u;
    }
    for (var s = 0u; s < slots; s++) {
        start[min(ids[s], experts - 1u) + 1u] += 1u;
    }
    for (var e = 0u; e < experts; e++) {
        start[e + 1u] += start[e];
    }
    var tiles = 0u;
    for (var e = 0u; e < experts; e++) {
        for (var first = start[e]; first < start[e + 1u]; first += TILE) {
            groups[12u + 3u * tiles] = e;
            groups[13u + 3u * tiles] = first;
            groups[14u + 3u * tiles] = min(TILE, start[e + 1u] - first);
            tiles += 1u;
        }
    }
    let order = 12u + 3u * slots;
    for (var s = 0u; s < slots; s++) {
        let e = min(ids[s], experts - 1u);
        groups[order + start[e]] = s;
        start[e] += 1u;
    }
    groups[0] = tiles;
    groups[4] = p.gate_up_groups;
    groups[5] = 1u;
    groups[6] = tiles;
    groups[8] = p.down_groups;
    groups[9] = 1u;
    groups[10] = tiles;
}
