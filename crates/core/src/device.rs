//! Which compute device a command runs on (`--gpu`), and the engine that runs there.

use crate::backend::wgpu::{context, WgpuBackend};
use crate::backend::Backend;
pub use crate::backend::GpuChoice;
use crate::engine::{CpuEngine, Engine};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::plan::budget::{GpuMem, GpuOptions, Math};
use crate::quant::QuantTarget;
use crate::runtime::GpuModel;
use crate::util::{Progress, Silent};

/// Opens the engine for `choice` with room for `capacity` tokens of context.
/// `options` apply to the backends; the CPU reference always computes with the weights as stored.
pub fn open_engine(choice: GpuChoice, model: Model, capacity: usize, options: &GpuOptions) -> Result<Box<dyn Engine>> {
    open_engine_with_progress(choice, model, capacity, options, &Silent)
}

/// As [`open_engine`], reporting the weights loaded to `progress`.
pub fn open_engine_with_progress(choice: GpuChoice, model: Model, capacity: usize, options: &GpuOptions, progress: &dyn Progress) -> Result<Box<dyn Engine>> {
    let reference = |model: Model| -> Result<Box<dyn Engine>> {
        if options.quant != QuantTarget::Keep {
            return Err(Error::Invalid("--quant applies to the backends; the CPU reference keeps the stored weights (use --gpu cpu)".into()));
        }
        if options.gpu_mem != GpuMem::Auto {
            return Err(Error::Invalid("--gpu-mem applies to GPU backends; the CPU reference runs from host memory".into()));
        }
        if options.math != Math::Exact {
            return Err(Error::Invalid("--math fast applies to the backends; the CPU reference computes exactly (use --gpu cpu)".into()));
        }
        let engine = CpuEngine::with_sequences(model, capacity, options.sequences);
        Ok(Box::new(if options.mtp { engine.with_mtp()? } else { engine }))
    };
    let cpu_backend =
        |model: Model| -> Result<Box<dyn Engine>> { Ok(Box::new(crate::runtime::Runtime::load(crate::backend::cpu::CpuBackend::new().with_math(options.math), &model, capacity, options, progress)?)) };
    let resolved = resolve(choice, options);
    match choice {
        GpuChoice::Reference => reference(model),
        GpuChoice::Cpu => cpu_backend(model),
        GpuChoice::Cuda => cuda_engine(model, capacity, options, progress),
        GpuChoice::Auto if resolved == GpuChoice::Cpu => {
            log::info!("--gpu auto: no hardware GPU adapter; running on the CPU backend (--gpu vulkan runs a software adapter, slower)");
            cpu_backend(model)
        }
        _ => {
            let mut ctx = context::open(choice)?;
            if options.math == Math::Fast {
                match ctx.shader_f16 {
                    true => ctx.f16_math = true,
                    false => log::warn!("--math fast: {} has no SHADER_F16; its matmuls multiply in f32", ctx.describe()),
                }
            }
            if choice == GpuChoice::Auto {
                log::info!("--gpu auto chose {}", ctx.describe());
            }
            Ok(Box::new(GpuModel::load(ctx, &model, capacity, options, progress)?))
        }
    }
}

/// The device `choice` runs on: itself, or for `--gpu auto` the CPU backend where wgpu finds
/// no adapter, or only software ones (lavapipe, llvmpipe, WARP: the same cores behind a GPU
/// API, several times slower than the CPU backend's kernels) and no GPU memory budget was
/// asked for (`--gpu-mem` means a GPU).
pub fn resolve(choice: GpuChoice, options: &GpuOptions) -> GpuChoice {
    if choice != GpuChoice::Auto {
        return choice;
    }
    let adapters = context::adapters(GpuChoice::Auto);
    let software = adapters.iter().all(|a| a.get_info().device_type == wgpu::DeviceType::Cpu);
    match software && options.gpu_mem == GpuMem::Auto {
        true => GpuChoice::Cpu,
        false => GpuChoice::Auto,
    }
}

/// The forward plan `choice`'s backend would run `model` with, as text (`dsrun inspect --plan`):
/// the backend's limits are read from its device; nothing is uploaded.
pub fn describe_plan(choice: GpuChoice, model: &Model, capacity: usize, options: &GpuOptions) -> Result<String> {
    fn text<B: Backend>(mut backend: B, model: &Model, capacity: usize, options: &GpuOptions) -> Result<String> {
        let target = backend.target(&model.config, capacity)?;
        let plan = crate::plan::build(model, capacity, options, &target)?;
        Ok(format!("device     {}\n{}", backend.describe(), plan.describe()))
    }
    match choice {
        GpuChoice::Reference => Err(Error::Invalid("--plan: the CPU reference computes the model directly (src/model) without a plan; choose a backend with --gpu".into())),
        GpuChoice::Cpu => text(crate::backend::cpu::CpuBackend::new(), model, capacity, options),
        GpuChoice::Auto if resolve(choice, options) == GpuChoice::Cpu => text(crate::backend::cpu::CpuBackend::new(), model, capacity, options),
        #[cfg(feature = "cuda")]
        GpuChoice::Cuda => text(crate::backend::cuda::CudaBackend::new(std::sync::Arc::new(cuda_device()?))?, model, capacity, options),
        #[cfg(not(feature = "cuda"))]
        GpuChoice::Cuda => Err(no_cuda()),
        _ => text(WgpuBackend::new(context::open(choice)?)?, model, capacity, options),
    }
}

/// `--gpu cuda`: CUDA device 0 (`DSRUN_CUDA_EMULATOR=1`: the CPU emulator instead, for testing
/// the path where there is no NVIDIA GPU; very slow).
#[cfg(feature = "cuda")]
fn cuda_device() -> Result<crate::backend::cuda::Device> {
    use crate::backend::cuda::Device;
    let device = match std::env::var("DSRUN_CUDA_EMULATOR") {
        Ok(v) if v == "1" => Device::emulator()?,
        _ => Device::driver(0)?,
    };
    log::info!("--gpu cuda: {}", device.describe());
    Ok(device)
}

#[cfg(feature = "cuda")]
fn cuda_engine(model: Model, capacity: usize, options: &GpuOptions, progress: &dyn Progress) -> Result<Box<dyn Engine>> {
    if options.math == Math::Fast {
        log::warn!("--math fast: the CUDA kernels have no reduced-precision path yet; they multiply exactly");
    }
    Ok(Box::new(crate::runtime::CudaModel::load(cuda_device()?, &model, capacity, options, progress)?))
}

#[cfg(not(feature = "cuda"))]
fn cuda_engine(_: Model, _: usize, _: &GpuOptions, _: &dyn Progress) -> Result<Box<dyn Engine>> {
    Err(no_cuda())
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> Error {
    Error::NoDevice(
        "--gpu cuda: this dsrun was built without CUDA; rebuild with `cargo build --release --features cuda` \
         (no CUDA toolkit needed), or use --gpu vulkan (NVIDIA GPUs run through Vulkan too) or --gpu cpu"
            .into(),
    )
}
