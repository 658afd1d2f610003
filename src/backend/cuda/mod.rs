//! The native NVIDIA backend (`--features cuda`), work in progress: opening a device through the
//! driver (loaded at run time, so the binary runs, and fails cleanly, where there is none),
//! run-time kernel compilation with NVRTC for the device's architecture, and the first kernel
//! family (matrix-vector for bf16 and FP8 block-scaled weights). The model does not run on it
//! yet; `--gpu vulkan` runs it on NVIDIA GPUs meanwhile.

use crate::error::{Error, Result};
use crate::model::weights::Matrix;
use crate::quant::DType;
use cudarc::driver::{CudaContext, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Kernel sources, compiled at run time (no toolkit headers needed).
pub const MATVEC_SOURCE: &str = include_str!("kernels/matvec.cu");

pub struct CudaDevice {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub name: String,
    pub compute_capability: (i32, i32),
}

fn driver_error(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Invalid(format!("CUDA: {what}: {e:?}"))
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
pub fn open(ordinal: usize) -> Result<CudaDevice> {
    if !driver_present() {
        return Err(Error::Invalid(
            "--gpu cuda: no NVIDIA driver found (libcuda could not be loaded); install the NVIDIA driver, \
             or use --gpu vulkan / --gpu cpu"
                .into(),
        ));
    }
    let count = CudaContext::device_count().map_err(driver_error("counting devices"))?;
    if count <= ordinal as i32 {
        return Err(Error::Invalid(format!("--gpu cuda: the NVIDIA driver reports {count} CUDA device(s); none at index {ordinal}")));
    }
    let ctx = CudaContext::new(ordinal).map_err(driver_error("opening the device"))?;
    let name = ctx.name().map_err(driver_error("reading the device name"))?;
    let compute_capability = ctx.compute_capability().map_err(driver_error("reading the compute capability"))?;
    let stream = ctx.default_stream();
    Ok(CudaDevice { ctx, stream, name, compute_capability })
}

/// The virtual architecture NVRTC compiles for: `compute_90` on Hopper, and so on.
pub fn arch((major, minor): (i32, i32)) -> String {
    format!("compute_{major}{minor}")
}

/// Compiles `source` to PTX for `arch` with `-D` defines (kernel variants by constants).
pub fn compile(source: &str, defines: &[(&str, u32)], arch: &str) -> Result<cudarc::nvrtc::Ptx> {
    if !nvrtc_present() {
        return Err(Error::Invalid(
            "CUDA: NVRTC (libnvrtc) could not be loaded; install the CUDA runtime libraries (e.g. the \
             nvidia-cuda-nvrtc-cu12 wheel, with its lib folder on LD_LIBRARY_PATH)"
                .into(),
        ));
    }
    let mut options: Vec<String> = defines.iter().map(|(k, v)| format!("-D{k}={v}")).collect();
    options.push(format!("--gpu-architecture={arch}"));
    let opts = cudarc::nvrtc::CompileOptions { options, ..Default::default() };
    cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| Error::Invalid(format!("CUDA: compiling kernels for {arch}: {e}")))
}

/// Kernel-format code of a matrix (as in matvec.cu), if the CUDA kernels handle it yet.
fn format_code(dtype: DType) -> Option<u32> {
    match dtype {
        DType::BF16 => Some(1),
        DType::F8E4M3 => Some(3),
        _ => None,
    }
}

/// Most tokens one matvec launch serves (the kernel's accumulators per lane).
pub const MAX_TOKENS: usize = 8;

impl CudaDevice {
    pub fn describe(&self) -> String {
        let (major, minor) = self.compute_capability;
        format!("{} (CUDA, sm_{major}{minor})", self.name)
    }

    /// `y = W x` for `n` tokens (rows of x) on the device: for tests and benchmarks of the kernel.
    pub fn matvec(&self, w: &Matrix, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let format = format_code(w.dtype).ok_or_else(|| Error::Invalid(format!("CUDA: no matvec kernel for {:?} yet", w.dtype)))?;
        if w.cols % 4 != 0 || n == 0 || n > MAX_TOKENS || x.len() != n * w.cols {
            return Err(Error::Invalid(format!("CUDA matvec: {}x{} with {n} tokens is outside the kernel's shapes", w.rows, w.cols)));
        }
        let (block_rows, block_cols, grid_cols, scales) = match &w.scales {
            Some(s) => (s.block_rows, s.block_cols, s.grid_cols, s.values.clone()),
            None => (128, 128, 1, vec![0.0]),
        };
        if block_cols % 4 != 0 {
            return Err(Error::Invalid(format!("CUDA matvec: scale blocks of {block_cols} columns are not whole words")));
        }
        let defines = [("FORMAT", format), ("TOKENS", MAX_TOKENS as u32), ("BLOCK_ROWS", block_rows as u32), ("BLOCK_COLS", block_cols as u32)];
        let ptx = compile(MATVEC_SOURCE, &defines, &arch(self.compute_capability))?;
        let module = self.ctx.load_module(ptx).map_err(driver_error("loading the matvec module"))?;
        let f = module.load_function("matvec").map_err(driver_error("finding the matvec kernel"))?;

        let mut bytes = w.data.as_slice().to_vec();
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        let words: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes);
        let s = &self.stream;
        let w_dev = s.clone_htod(&words).map_err(driver_error("uploading weights"))?;
        let scales_dev = s.clone_htod(&scales).map_err(driver_error("uploading scales"))?;
        let x_dev = s.clone_htod(x).map_err(driver_error("uploading the input"))?;
        let mut y_dev = s.alloc_zeros::<f32>(n * w.rows).map_err(driver_error("allocating the output"))?;
        let (rows, cols, grid, tokens) = (w.rows as u32, w.cols as u32, grid_cols as u32, n as u32);
        let warps_per_block = 8u32;
        let cfg = LaunchConfig { grid_dim: (rows.div_ceil(warps_per_block), 1, 1), block_dim: (32 * warps_per_block, 1, 1), shared_mem_bytes: 0 };
        let mut launch = s.launch_builder(&f);
        launch.arg(&w_dev).arg(&scales_dev).arg(&x_dev).arg(&mut y_dev).arg(&rows).arg(&cols).arg(&grid).arg(&tokens);
        // SAFETY: the argument list matches matvec.cu's signature; buffers hold rows x cols
        // weights, the scale grid, n x cols inputs and n x rows outputs.
        unsafe { launch.launch(cfg) }.map_err(driver_error("launching matvec"))?;
        s.clone_dtoh(&y_dev).map_err(driver_error("reading the output"))
    }
}
