//! Helpers shared by the benchmarks.

/// Deterministic pseudo-random values in [-0.5, 0.5): benchmark inputs.
pub fn values(n: usize) -> Vec<f32> {
    let mut s = 0x2545F4914F6CDD1Du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}
