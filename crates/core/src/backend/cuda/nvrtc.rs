//! NVRTC, the run-time compiler the kernels are built with for the device's architecture.

use super::nvrtc_present;
use crate::error::{Error, Result};

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
    let table = crate::format::cuda_defines().into_iter().map(|(k, v)| format!("-D{k}={v}"));
    let mut options: Vec<String> = defines.iter().map(|(k, v)| format!("-D{k}={v}")).chain(table).collect();
    options.push(format!("--gpu-architecture={arch}"));
    let opts = cudarc::nvrtc::CompileOptions { options, ..Default::default() };
    cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| Error::Kernel { device: format!("NVRTC ({arch})"), reason: e.to_string() })
}
