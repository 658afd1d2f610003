//! The native NVIDIA backend (`--features cuda`): the driver and NVRTC are loaded at run time
//! (the binary builds without a CUDA toolkit and fails cleanly where there is no driver); the
//! kernels (kernels/*.cu) are compiled by NVRTC for the device's architecture when a model
//! loads; the plan is lowered to launches once (`ops`) and a decode step is replayed as a CUDA
//! graph (`backend`). The same kernels and host code run on a CPU emulator (emulator.rs) so
//! they are tested on machines without an NVIDIA GPU. `device` is the driver or the emulator,
//! `pools` the expert slots, `upload` the pinned copy path for streamed experts.

internal_mod!(args);
mod backend;
pub mod device;
internal_mod!(emulator);
internal_mod!(nvrtc);
internal_mod!(ops);
internal_mod!(pools);
internal_mod!(sources);
internal_mod!(upload);

pub use backend::CudaBackend;
pub use device::{Arg, Buffer, Device};

use crate::error::Result;

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
