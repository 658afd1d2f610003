//! Which compute device a command runs on (`--gpu`), and the engine that runs there.

use crate::backend::wgpu::{context, WgpuBackend};
use crate::backend::Backend;
pub use crate::backend::GpuChoice;
use crate::engine::{CpuEngine, Engine};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::plan::budget::{GpuMem, GpuOptions, Math};
use crate::plan::shard::{shard_experts, ExpertShard};
use crate::quant::QuantTarget;
use crate::runtime::comm::{Communicator, Launch, Tcp};
use crate::runtime::GpuModel;
use crate::runtime::{follow, Leader};
use crate::util::{Choice, Progress, Silent};
use std::sync::Arc;

/// Where the model runs when it is divided among devices (expert parallelism): several devices
/// of `--gpu`'s kind in this process (`--devices`), or this process's rank of a multi-process
/// job (`RANK`/`WORLD_SIZE`...). The default is one device.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Parallel {
    /// Adapters (wgpu, numbered as `dsrun devices` lists them; one index twice is two devices
    /// on one adapter) or CUDA ordinals. In a multi-process job, entry `LOCAL_RANK` is this
    /// rank's (default: `LOCAL_RANK` itself).
    pub devices: Vec<usize>,
    /// Each device's weight in dividing the routed experts (`--tensor-split`; default equal).
    pub split: Vec<f64>,
    /// This process's place in a multi-process job.
    pub launch: Option<Launch>,
}

impl Parallel {
    /// Ranks in the job: processes, or devices of this process.
    pub fn world(&self) -> usize {
        match &self.launch {
            Some(l) => l.world,
            None => self.devices.len().max(1),
        }
    }

    /// Each rank's routed experts of `model` (the same on every rank: a pure function of the
    /// model, the split and the router counts).
    fn shards(&self, model: &Model, options: &GpuOptions) -> Result<Vec<ExpertShard>> {
        let world = self.world();
        let split = if self.split.is_empty() { vec![1.0; world] } else { self.split.clone() };
        if split.len() != world {
            return Err(Error::Invalid(format!("--tensor-split has {} weights for {world} devices: one per device", split.len())));
        }
        let experts: Vec<usize> = model.weights.routed_layers(options.mtp).iter().map(|m| m.experts.len()).collect();
        shard_experts(&experts, &split, options.expert_counts.as_deref())
    }
}

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
    describe_parallel_plan(choice, model, capacity, options, &Parallel::default())
}

/// As [`describe_plan`], divided among the ranks `parallel` names: rank 0's plan, then what
/// each rank holds and moves per decoded token (every rank's plan built for the first device's
/// limits).
pub fn describe_parallel_plan(choice: GpuChoice, model: &Model, capacity: usize, options: &GpuOptions, parallel: &Parallel) -> Result<String> {
    fn text<B: Backend>(mut backend: B, model: &Model, capacity: usize, options: &GpuOptions, parallel: &Parallel) -> Result<String> {
        let target = backend.target(&model.config, capacity)?;
        if parallel.world() == 1 {
            let plan = crate::plan::build(model, capacity, options, &target)?;
            return Ok(format!("device     {}\n{}", backend.describe(), plan.describe()));
        }
        let shards = parallel.shards(model, options)?;
        let mut ranks = String::new();
        let mut first = String::new();
        for shard in shards {
            let rank = shard.rank;
            let plan = crate::plan::build(model, capacity, &GpuOptions { shard: Some(Arc::new(shard)), ..options.clone() }, &target)?;
            if rank == 0 {
                first = plan.describe();
            }
            let t = plan.rank_traffic().expect("a rank's plan is divided");
            ranks += &format!("           {}; device memory {}\n", t.describe(), crate::util::human_bytes(plan.memory.all_resident()));
        }
        Ok(format!("device     {} (rank 0's limits for every rank)\nranks\n{ranks}{first}", backend.describe()))
    }
    let first = parallel.devices.first().copied().unwrap_or(0);
    match choice {
        GpuChoice::Reference => Err(Error::Invalid("--plan: the CPU reference computes the model directly (src/model) without a plan; choose a backend with --gpu".into())),
        GpuChoice::Cpu if parallel.world() > 1 => Err(Error::Invalid("--devices divide a model among GPUs; --gpu cpu runs on the host's cores (choose --gpu vulkan, cuda, ...)".into())),
        GpuChoice::Cpu => text(crate::backend::cpu::CpuBackend::new(), model, capacity, options, parallel),
        GpuChoice::Auto if resolve(choice, options) == GpuChoice::Cpu && parallel.world() == 1 => text(crate::backend::cpu::CpuBackend::new(), model, capacity, options, parallel),
        #[cfg(feature = "cuda")]
        GpuChoice::Cuda => text(crate::backend::cuda::CudaBackend::new(std::sync::Arc::new(cuda_device_nth(first)?))?, model, capacity, options, parallel),
        #[cfg(not(feature = "cuda"))]
        GpuChoice::Cuda => Err(no_cuda()),
        _ => text(WgpuBackend::new(context::open_nth(choice, first)?)?, model, capacity, options, parallel),
    }
}

/// `--gpu cuda`: CUDA device 0 (`DSRUN_CUDA_EMULATOR=1`: the CPU emulator instead, for testing
/// the path where there is no NVIDIA GPU; very slow).
#[cfg(feature = "cuda")]
fn cuda_device() -> Result<crate::backend::cuda::Device> {
    cuda_device_nth(0)
}

/// CUDA device `ordinal` (each emulated device is one more emulator).
#[cfg(feature = "cuda")]
fn cuda_device_nth(ordinal: usize) -> Result<crate::backend::cuda::Device> {
    use crate::backend::cuda::Device;
    let device = match std::env::var("DSRUN_CUDA_EMULATOR") {
        Ok(v) if v == "1" => Device::emulator()?,
        _ => Device::driver(ordinal)?,
    };
    log::info!("--gpu cuda: {}", device.describe());
    Ok(device)
}

/// As [`open_engine_with_progress`], divided among the devices or ranks `parallel` names
/// (one device: the same as it). A rank other than 0 of a multi-process job follows rank 0's
/// steps here and returns `Error::Followed` when rank 0 ends the job.
pub fn open_parallel(choice: GpuChoice, model: Model, capacity: usize, options: &GpuOptions, parallel: &Parallel, progress: &dyn Progress) -> Result<Box<dyn Engine>> {
    if parallel.launch.is_none() && parallel.devices.len() <= 1 {
        if let (Some(&index), false) = (parallel.devices.first(), matches!(choice, GpuChoice::Cpu | GpuChoice::Reference | GpuChoice::Cuda)) {
            return Ok(Box::new(GpuModel::load(context::open_nth(choice, index)?, &model, capacity, options, progress)?));
        }
        return open_engine_with_progress(choice, model, capacity, options, progress);
    }
    if matches!(choice, GpuChoice::Cpu | GpuChoice::Reference) {
        return Err(Error::Invalid(format!("--devices divide a model among GPUs; --gpu {} runs on the host's cores (choose --gpu vulkan, cuda, ...)", choice.name())));
    }
    let shards = parallel.shards(&model, options)?;
    let rank_options = |rank: usize| GpuOptions { shard: Some(Arc::new(shards[rank].clone())), ..options.clone() };
    let device_of = |rank: usize| parallel.devices.get(rank).copied().unwrap_or(rank);
    match &parallel.launch {
        None => {
            let leader = Leader::in_process(parallel.world(), |rank, comm| open_rank(choice, &model, capacity, &rank_options(rank), device_of(rank), comm, progress))?;
            Ok(Box::new(leader))
        }
        Some(launch) => {
            let comm = communicator(choice, launch)?;
            let device = parallel.devices.get(launch.local_rank).copied().unwrap_or(launch.local_rank);
            let loaded = open_rank(choice, &model, capacity, &rank_options(launch.rank), device, comm.clone(), progress);
            let mut engine = match loaded {
                Ok(engine) => engine,
                Err(e) => {
                    comm.abort(&format!("loading: {e}"));
                    return Err(e);
                }
            };
            // Every rank has its share before the first step (the steps' collectives have a
            // time limit; loading a big model may take minutes).
            comm.ready()?;
            if launch.rank == 0 {
                return Ok(Box::new(Leader::new(engine, comm)));
            }
            follow(&mut *engine, &*comm)?;
            Err(Error::Followed)
        }
    }
}

/// The communicator of a multi-process job: NCCL between CUDA devices (`DSRUN_COMM=tcp`:
/// through rank 0 over TCP instead), TCP for wgpu devices.
fn communicator(choice: GpuChoice, launch: &Launch) -> Result<Arc<dyn Communicator>> {
    let transport = std::env::var("DSRUN_COMM").unwrap_or_default();
    match (choice, transport.as_str()) {
        (_, "tcp") | (_, "") if choice != GpuChoice::Cuda => Ok(Arc::new(Tcp::connect(launch)?)),
        (GpuChoice::Cuda, "tcp") => Ok(Arc::new(Tcp::connect(launch)?)),
        #[cfg(feature = "cuda")]
        (GpuChoice::Cuda, "" | "nccl") => Ok(Arc::new(crate::runtime::comm::Nccl::connect(launch)?)),
        #[cfg(not(feature = "cuda"))]
        (GpuChoice::Cuda, "" | "nccl") => Err(no_cuda()),
        (_, "nccl") => Err(Error::Invalid(format!("DSRUN_COMM=nccl joins CUDA devices; --gpu {} ranks use DSRUN_COMM=tcp", choice.name()))),
        (_, other) => Err(Error::Invalid(format!("DSRUN_COMM={other}: expected nccl or tcp"))),
    }
}

/// One rank's engine: its device (`index` among `choice`'s adapters, or its CUDA ordinal), its
/// share of the experts in `options.shard`, its communicator.
fn open_rank(choice: GpuChoice, model: &Model, capacity: usize, options: &GpuOptions, index: usize, comm: Arc<dyn Communicator>, progress: &dyn Progress) -> Result<Box<dyn Engine>> {
    match choice {
        #[cfg(feature = "cuda")]
        GpuChoice::Cuda => Ok(Box::new(crate::runtime::CudaModel::load_rank(cuda_device_nth(index)?, model, capacity, options, comm, progress)?)),
        #[cfg(not(feature = "cuda"))]
        GpuChoice::Cuda => Err(no_cuda()),
        _ => {
            let ctx = context::open_nth(choice, index)?;
            Ok(Box::new(GpuModel::load_rank(ctx, model, capacity, options, comm, progress)?))
        }
    }
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
