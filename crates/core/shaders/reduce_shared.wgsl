// Workgroup-wide sums through workgroup memory (every adapter). The loader prepends this or
// reduce_subgroups.wgsl to kernels that reduce across lanes.

struct LaneIds {
    @builtin(local_invocation_index) lane: u32,
}

var<workgroup> partial: array<f32, 2048>; // 32 values x 64 lanes

// Lane j < count returns the sum over all WG lanes of their acc[j] (other lanes return 0).
// One barrier; call from uniform control flow.
fn sum_over_lanes(acc: array<f32, 32>, count: u32, ids: LaneIds) -> f32 {
    for (var i = 0u; i < count; i++) {
        partial[i * WG + ids.lane] = acc[i];
    }
    workgroupBarrier();
    var total = 0.0;
    if (ids.lane < count) {
        for (var j = 0u; j < WG; j++) {
            total += partial[ids.lane * WG + j];
        }
    }
    return total;
}
