//! The native NVIDIA backend (`--features cuda`): the driver and NVRTC are loaded at run time
//! (the binary builds without a CUDA toolkit and fails cleanly where there is no driver); the
//! kernels (kernels/*.cu) are compiled by NVRTC for the device's architecture when a model
//! loads; the plan is lowered to launches once (`ops`) and a decode step is replayed as a CUDA
//! graph (`backend`). The same kernels and host code run on a CPU emulator (emulator.rs) so
//! they are tested on machines without an NVIDIA GPU. `device` is the driver or the emulator,
//! `pools` the expert slots, `upload` the pinned copy path for streamed experts.

pub mod args;
pub mod backend;
pub mod device;
pub mod emulator;
pub mod ops;
pub mod pools;
pub mod upload;

pub use backend::CudaBackend;
pub use device::{Arg, Buffer, Device};

use crate::error::{Error, Result};

/// Kernel families (one per file), compiled at run time after kernels/common.cuh.
pub mod sources {
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
}

/// Whether the NVIDIA driver library can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to load the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether NVRTC (the run-time compiler, part of the CUDA runtime libraries) can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to load the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Opens CUDA device `ordinal`, or says why not (no driver, no device).
pub fn open(ordinal: usize) -> Result<Device> {
    Device::driver(ordinal)
}

/// The virtual architecture NVRTC compiles for: `compute_90` on Hopper, and so on.
pub fn arch((major, minor): (i32, i32)) -> String {
    format!("compute_{major}{minor}")
}

/// Compiles `source` to PTX for `arch` with `-D` defines (kernel variants by constants) and
/// the format table's.
pub fn compile(source: &str, defines: &[(&str, u32)], arch: &str) -> Result<cudarc::nvrtc::Ptx> {
    if !nvrtc_present() {
        return Err(Error::NoDevice(
            "CUDA: NVRTC (libnvrtc) could not be loaded; install the CUDA runtime libraries (e.g. the \
             nvidia-cuda-nvrtc-cu12 wheel, with its lib folder on LD_LIBRARY_PATH)"
                .into(),
        ));
    }
    let table = crate::format::cuda_defines().map(|(k, v)| format!("-D{k}={v}"));
    let mut options: Vec<String> = defines.iter().map(|(k, v)| format!("-D{k}={v}")).chain(table).collect();
    options.push(format!("--gpu-architecture={arch}"));
    let opts = cudarc::nvrtc::CompileOptions { options, ..Default::default() };
    cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| Error::Kernel { device: format!("NVRTC ({arch})"), reason: e.to_string() })
}
