// Workgroup-wide sums with subgroup operations (adapters with the `subgroups` feature): each
// subgroup adds its lanes in registers, and only one value per subgroup crosses workgroup memory.

struct LaneIds {
    @builtin(local_invocation_index) lane: u32,
    @builtin(subgroup_invocation_id) sg_lane: u32,
    @builtin(subgroup_size) sg_size: u32,
}

var<workgroup> partial: array<f32, 2048>; // 32 values x up to 64 subgroups

// Lane j < count returns the sum over all WG lanes of their acc[j] (other lanes return 0).
// One barrier; call from uniform control flow.
fn sum_over_lanes(acc: array<f32, 32>, count: u32, ids: LaneIds) -> f32 {
    let groups = WG / ids.sg_size;
    let sg = ids.lane / ids.sg_size;
    for (var i = 0u; i < count; i++) {
        let s = subgroupAdd(acc[i]);
        if (ids.sg_lane == 0u) {
            partial[i * groups + sg] = s;
        }
    }
    workgroupBarrier();
    var total = 0.0;
    if (ids.lane < count) {
        for (var g = 0u; g < groups; g++) {
            total += partial[ids.lane * groups + g];
        }
    }
    return total;
}
