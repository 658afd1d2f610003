//! Adapter choice and the device/queue every wgpu op runs on.

use crate::backend::GpuChoice;
use crate::error::{Error, Result};
use crate::util::Choice;

#[derive(Clone)]
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    /// Split weight matrices into chunks of at most this many bytes (default: the binding limit).
    /// Lowered in tests to exercise chunking on small models.
    pub chunk_bytes: Option<u64>,
    /// Kernels may use subgroup operations: the adapter has them and the device was opened with
    /// them. Optional; every kernel has a workgroup-memory fallback (set false to force it).
    pub subgroups: bool,
    /// Multi-token steps group routed-expert slots by expert, so each expert's weights are read
    /// once per tile of its slots instead of once per slot (on software adapters only for steps
    /// of at least two slots per expert: below that the tiles are mostly empty).
    /// `DSRUN_GROUP_EXPERTS=0|1` overrides, and tests set it to run both paths.
    pub group_experts: bool,
    /// Dense matmuls of prefill steps run the workgroup-memory tiled GEMM (gemm.wgsl) instead of
    /// matmul.wgsl's register tiles. Off on software adapters, where it measured slower;
    /// `DSRUN_PREFILL_GEMM=0|1` overrides, and tests set it to run both paths.
    pub prefill_gemm: bool,
    /// Kernel shapes chosen for a CPU adapter (lavapipe, WARP, SwiftShader), where every lane's
    /// load costs alike and more than 16 sums per lane spill: fewer sums per lane, and routed
    /// experts per slot in small steps. The adapter type decides; `DSRUN_CPU_SHAPES=0|1`
    /// overrides, and tests set it to run both shapes.
    pub cpu_shapes: bool,
    /// Matmuls of bf16, f16, FP8 and q8 weights multiply in f16 (arith_f16.wgsl), f32 sums
    /// between lane steps: fewer registers and, on GPUs with fast f16, cheaper arithmetic, at
    /// ~2^-9 relative error per step and f16's range. Off by default everywhere (lavapipe
    /// measured it slower; exactness is the default on GPUs until one measures it faster);
    /// `DSRUN_F16_MATH=1` turns it on where the adapter has SHADER_F16.
    pub f16_math: bool,
    /// The device was opened with SHADER_F16 (f16 kernels can be built).
    pub shader_f16: bool,
    /// Memory `--gpu-mem auto` takes its share of: the largest device-local heap the adapter
    /// reports (Vulkan), or for software and integrated adapters the host's available memory.
    pub memory: Option<u64>,
}

fn backends_for(choice: GpuChoice) -> wgpu::Backends {
    match choice {
        GpuChoice::Vulkan => wgpu::Backends::VULKAN,
        GpuChoice::Metal => wgpu::Backends::METAL,
        GpuChoice::Dx12 => wgpu::Backends::DX12,
        GpuChoice::Gl => wgpu::Backends::GL,
        _ => wgpu::Backends::all(),
    }
}

fn instance(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = backends;
    wgpu::Instance::new(desc)
}

/// Every adapter wgpu can see for `choice`'s backends. For `auto`, GL is looked at only when no
/// Vulkan, Metal or DX12 adapter exists (probing GL/EGL is slow and noisy where it is unused).
pub fn adapters(choice: GpuChoice) -> Vec<wgpu::Adapter> {
    let enumerate = |backends| pollster::block_on(instance(backends).enumerate_adapters(backends));
    match choice {
        GpuChoice::Auto => {
            let primary = enumerate(wgpu::Backends::PRIMARY);
            if primary.is_empty() {
                enumerate(wgpu::Backends::SECONDARY)
            } else {
                primary
            }
        }
        _ => enumerate(backends_for(choice)),
    }
}

/// Preference for `auto`: discrete, then integrated, then virtual, then software (CPU) adapters.
fn rank(info: &wgpu::AdapterInfo) -> u8 {
    match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// Why `choice` found no adapter, and what to use instead.
fn no_adapter(choice: GpuChoice) -> String {
    let name = choice.name();
    let platform = match choice {
        GpuChoice::Metal if !cfg!(any(target_os = "macos", target_os = "ios")) => Some("Metal exists only on macOS and iOS"),
        GpuChoice::Dx12 if !cfg!(windows) => Some("DirectX 12 exists only on Windows"),
        _ => None,
    };
    let others: Vec<String> = [GpuChoice::Vulkan, GpuChoice::Metal, GpuChoice::Dx12, GpuChoice::Gl]
        .into_iter()
        .filter(|&c| c != choice && choice != GpuChoice::Auto)
        .filter_map(|c| adapters(c).first().map(|a| format!("--gpu {} ({})", c.name(), a.get_info().name)))
        .collect();
    let instead = if others.is_empty() { "--gpu cpu".to_string() } else { format!("{} or --gpu cpu", others.join(", ")) };
    match platform {
        Some(why) => format!("--gpu {name}: {why}; this system has {instead}"),
        None => format!(
            "--gpu {name}: no {} adapter found (install a driver; on Debian, `apt-get install mesa-vulkan-drivers` \
             gives the software Vulkan adapter lavapipe); use {instead}",
            if choice == GpuChoice::Auto { "GPU".to_string() } else { name.to_string() }
        ),
    }
}

/// Picks an adapter for `choice` (honouring `WGPU_ADAPTER_NAME`) and opens a device with the
/// adapter's own limits, not wgpu's conservative defaults.
pub fn open(choice: GpuChoice) -> Result<GpuContext> {
    open_nth(choice, 0)
}

/// As [`open`], the `index`-th adapter in order of preference (`dsrun devices` numbers them):
/// `--devices` opens several, the same index twice being two devices on one adapter.
pub fn open_nth(choice: GpuChoice, index: usize) -> Result<GpuContext> {
    let mut candidates = adapters(choice);
    if candidates.is_empty() {
        return Err(Error::NoDevice(no_adapter(choice)));
    }
    if let Ok(wanted) = std::env::var("WGPU_ADAPTER_NAME") {
        let wanted = wanted.to_lowercase();
        candidates.retain(|a| a.get_info().name.to_lowercase().contains(&wanted));
        if candidates.is_empty() {
            return Err(Error::NoDevice(format!("WGPU_ADAPTER_NAME={wanted}: no adapter's name contains it (`dsrun devices` lists them)")));
        }
    }
    candidates.sort_by_key(|a| rank(&a.get_info()));
    if index >= candidates.len() {
        return Err(Error::NoDevice(format!("--devices {index}: --gpu {} has {} adapter(s), numbered from 0 (`dsrun devices` lists them)", choice.name(), candidates.len())));
    }
    let adapter = candidates.swap_remove(index);
    let info = adapter.get_info();
    let limits = adapter.limits();
    // Optional speed-ups are requested only where the adapter offers them.
    let optional = adapter.features() & (wgpu::Features::SUBGROUP | wgpu::Features::SHADER_F16);
    let (device, queue) =
        pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor { label: Some("dsrun"), required_features: optional, required_limits: limits.clone(), ..Default::default() }))
            .map_err(|e| Error::device(info.name.clone(), "opening the device", e))?;
    log::info!("GPU: {} ({:?}, {:?}), optional features: {:?}", info.name, info.backend, info.device_type, optional);
    let subgroups = optional.contains(wgpu::Features::SUBGROUP) && std::env::var_os("DSRUN_NO_SUBGROUPS").is_none();
    // Software and integrated adapters draw from host memory, whatever heap they report (lavapipe
    // reports 2 GiB): `--gpu-mem auto` takes its share of what the host has available.
    let shares_host = matches!(info.device_type, wgpu::DeviceType::Cpu | wgpu::DeviceType::IntegratedGpu);
    let memory = if shares_host { host_available_memory().or_else(|| device_memory(&adapter)) } else { device_memory(&adapter) };
    log::info!(
        "GPU: memory for --gpu-mem auto {} ({})",
        memory.map_or("unknown".into(), crate::util::human_bytes),
        if shares_host { "the host's available memory" } else { "the largest device-local heap" }
    );
    let switch = |name: &str, default: bool| match std::env::var(name).as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => default,
    };
    let group_experts = switch("DSRUN_GROUP_EXPERTS", true);
    let software = info.device_type == wgpu::DeviceType::Cpu;
    let prefill_gemm = switch("DSRUN_PREFILL_GEMM", !software);
    let cpu_shapes = switch("DSRUN_CPU_SHAPES", software);
    let shader_f16 = optional.contains(wgpu::Features::SHADER_F16);
    let f16_math = switch("DSRUN_F16_MATH", false) && shader_f16;
    if switch("DSRUN_F16_MATH", false) && !shader_f16 {
        log::warn!("DSRUN_F16_MATH=1: {} has no SHADER_F16; the matmuls multiply in f32", info.name);
    }
    Ok(GpuContext { device, queue, info, limits, chunk_bytes: None, subgroups, group_experts, prefill_gemm, cpu_shapes, f16_math, shader_f16, memory })
}

/// Memory the host has available (`MemAvailable` in /proc/meminfo; None elsewhere).
fn host_available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The largest device-local memory heap, read through the Vulkan API beneath wgpu (wgpu itself
/// does not report memory sizes). None on other backends.
fn device_memory(adapter: &wgpu::Adapter) -> Option<u64> {
    #[cfg(any(target_os = "linux", target_os = "windows", target_os = "android", target_os = "freebsd"))]
    {
        // SAFETY: read-only queries on a live adapter; nothing is created or destroyed.
        let vulkan = unsafe { adapter.as_hal::<wgpu::hal::api::Vulkan>() }?;
        let instance = vulkan.shared_instance().raw_instance();
        let props = unsafe { instance.get_physical_device_memory_properties(vulkan.raw_physical_device()) };
        const DEVICE_LOCAL: u32 = 1; // VK_MEMORY_HEAP_DEVICE_LOCAL_BIT
        let heaps = &props.memory_heaps[..props.memory_heap_count as usize];
        heaps.iter().filter(|h| h.flags.as_raw() & DEVICE_LOCAL != 0).map(|h| h.size).max()
    }
    #[cfg(not(any(target_os = "linux", target_os = "windows", target_os = "android", target_os = "freebsd")))]
    {
        let _ = adapter;
        None
    }
}

impl GpuContext {
    pub fn describe(&self) -> String {
        format!("{} ({:?}, {:?})", self.info.name, self.info.backend, self.info.device_type)
    }

    /// Optional features in use, for logs and benchmark headers.
    pub fn features_in_use(&self) -> &'static str {
        match (self.subgroups, self.f16_math) {
            (true, true) => "subgroups, f16 math",
            (true, false) => "subgroups",
            (false, true) => "f16 math",
            (false, false) => "no optional features",
        }
    }

    /// Largest row chunk of a split weight matrix.
    pub fn chunk_limit(&self) -> u64 {
        self.chunk_bytes.map_or(self.max_binding(), |c| c.min(self.max_binding()))
    }

    /// An error for what this adapter cannot hold.
    pub fn limit(&self, what: String) -> Error {
        Error::DeviceLimit { device: self.describe(), what }
    }

    /// A failed call on this device.
    pub fn failed(&self, what: &str, reason: impl std::fmt::Display) -> Error {
        Error::device(self.describe(), what, reason)
    }

    /// The largest storage buffer one binding may cover.
    pub fn max_binding(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size)
    }
}

/// One line per adapter for `dsrun devices`, numbered as `--devices` counts them (for
/// `--gpu auto`; GL adapters after them where auto does not use GL).
pub fn describe_adapters() -> Vec<String> {
    let mut all = adapters(GpuChoice::Auto);
    all.sort_by_key(|a| rank(&a.get_info()));
    if all.iter().all(|a| a.get_info().backend != wgpu::Backend::Gl) {
        all.extend(adapters(GpuChoice::Gl));
    }
    all.iter()
        .enumerate()
        .map(|(index, a)| {
            let i = a.get_info();
            let l = a.limits();
            let f = a.features();
            let has = |flag: wgpu::Features, name: &str| if f.contains(flag) { name.to_string() } else { format!("no {name}") };
            format!(
                "[{index}] {} | {:?} {:?} | driver {} {} | max binding {} MiB, max buffer {} MiB, workgroup storage {} KiB | {}, {}, {}",
                i.name,
                i.backend,
                i.device_type,
                i.driver,
                i.driver_info,
                l.max_storage_buffer_binding_size >> 20,
                l.max_buffer_size >> 20,
                l.max_compute_workgroup_storage_size >> 10,
                has(wgpu::Features::SHADER_F16, "f16"),
                has(wgpu::Features::SUBGROUP, "subgroups"),
                has(wgpu::Features::TIMESTAMP_QUERY, "timestamps"),
            )
        })
        .collect()
}
