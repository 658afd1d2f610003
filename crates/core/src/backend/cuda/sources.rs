//! Kernel families (one per file), compiled at run time after kernels/common.cuh.

pub const MATMUL: &str = include_str!("kernels/matmul.cu");
pub const NORM: &str = include_str!("kernels/norm.cu");
pub const ROPE: &str = include_str!("kernels/rope.cu");
pub const MLA: &str = include_str!("kernels/mla.cu");
pub const ROUTER: &str = include_str!("kernels/router.cu");
pub const MOE: &str = include_str!("kernels/moe.cu");
pub const STREAM: &str = include_str!("kernels/stream.cu");
pub const INDEXER: &str = include_str!("kernels/indexer.cu");
/// Each family's source and kernels.
pub const ALL: [(&str, &[&str]); 8] = [
    (MATMUL, &["matmul", "embed"]),
    (NORM, &["rmsnorm"]),
    (ROPE, &["rope_q", "latent_store"]),
    (MLA, &["q_absorb", "v_up", "mla_partial", "mla_merge"]),
    (ROUTER, &["router"]),
    (MOE, &["silu_mul", "moe_combine", "argmax", "group_by_expert"]),
    (STREAM, &["stream_read", "copy"]),
    (INDEXER, &["indexer_prepare", "indexer_score", "indexer_top_k"]),
];

/// The kernels `source` defines.
pub fn kernels_of(source: &str) -> &'static [&'static str] {
    ALL.iter().find(|(s, _)| *s == source).map_or(&[], |(_, names)| names)
}
