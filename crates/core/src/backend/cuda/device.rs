//! Where CUDA kernels run: the NVIDIA driver, or the CPU emulator (kernels/emulator.h) that lets
//! the kernels and the host code that drives them be tested where there is no NVIDIA GPU.
//! Both take the same sources, buffers (device addresses) and launches.

pub use super::args::{Arg, Buffer};
use super::emulator::Emulator;
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// Sources shared by every kernel family, prepended to each (NVRTC gets no include paths).
pub const COMMON_SOURCE: &str = concat!(include_str!("kernels/common.cuh"), "\n", include_str!("kernels/ggml_blocks.cuh"));

/// A compiled kernel.
#[derive(Clone)]
pub enum Kernel {
    Driver(CudaFunction),
    Emulated(super::emulator::EmulatedKernel),
}

/// One kernel launch, kept so a step can be replayed (and captured as a CUDA graph).
#[derive(Clone)]
pub struct Launch {
    pub kernel: Kernel,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub args: Vec<Arg>,
}

pub struct DriverDevice {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub name: String,
    pub compute_capability: (i32, i32),
    modules: Mutex<Vec<Arc<CudaModule>>>,
    allocations: Mutex<Vec<u64>>,
    /// Pinned staging and a copy stream for streamed experts, made on first use.
    uploader: Mutex<Option<super::upload::Uploader>>,
}

pub enum Device {
    Driver(DriverDevice),
    Emulator(Emulator),
}

/// Kernel arguments a launch may take (the longest signature, matmul's, has 11).
const MAX_ARGS: usize = 16;

fn driver_error<'a>(device: &'a str, what: &'a str) -> impl Fn(cudarc::driver::DriverError) -> Error + 'a {
    move |e| Error::device(device, what, format!("{e:?}"))
}

impl DriverDevice {
    /// Makes the device's context current on the calling thread (a no-op when it is).
    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(self.error("binding the context"))
    }

    fn error<'a>(&'a self, what: &'a str) -> impl Fn(cudarc::driver::DriverError) -> Error + 'a {
        driver_error(&self.name, what)
    }
}

impl Device {
    /// The NVIDIA driver's device `ordinal`, or why there is none.
    pub fn driver(ordinal: usize) -> Result<Device> {
        if !super::driver_present() {
            return Err(Error::NoDevice(
                "--gpu cuda: no NVIDIA driver found (libcuda could not be loaded); install the NVIDIA driver, \
                 or use --gpu vulkan / --gpu cpu"
                    .into(),
            ));
        }
        let count = CudaContext::device_count().map_err(driver_error("CUDA driver", "counting devices"))?;
        if count <= ordinal as i32 {
            return Err(Error::NoDevice(format!("--gpu cuda: the NVIDIA driver reports {count} CUDA device(s); none at index {ordinal}")));
        }
        let opening = format!("CUDA device {ordinal}");
        let ctx = CudaContext::new(ordinal).map_err(driver_error(&opening, "opening the device"))?;
        let name = ctx.name().map_err(driver_error(&opening, "reading the device name"))?;
        let compute_capability = ctx.compute_capability().map_err(driver_error(&opening, "reading the compute capability"))?;
        let stream = ctx.new_stream().map_err(driver_error(&opening, "creating a stream"))?;
        Ok(Device::Driver(DriverDevice { ctx, stream, name, compute_capability, modules: Default::default(), allocations: Default::default(), uploader: Default::default() }))
    }

    /// The CPU emulator (needs a C++ compiler: `c++`, or `$CXX`).
    pub fn emulator() -> Result<Device> {
        Ok(Device::Emulator(Emulator::new()?))
    }

    pub fn describe(&self) -> String {
        match self {
            Device::Driver(d) => {
                let (major, minor) = d.compute_capability;
                format!("{} (CUDA, sm_{major}{minor})", d.name)
            }
            Device::Emulator(_) => "CUDA emulator on the CPU (tests only)".into(),
        }
    }

    /// The device's memory in bytes (the budget `--gpu-mem auto` takes a share of); unknown on
    /// the emulator.
    pub fn memory(&self) -> Option<u64> {
        match self {
            Device::Driver(d) => {
                d.bind().ok()?;
                cudarc::driver::result::mem_get_info().ok().map(|(_, total)| total as u64)
            }
            Device::Emulator(_) => None,
        }
    }

    pub fn is_emulated(&self) -> bool {
        matches!(self, Device::Emulator(_))
    }

    /// Compiles `source` (after the common header) with `-D` defines and returns its `names`
    /// kernels: NVRTC for the device's architecture, or the host compiler for the emulator.
    /// Compiled sources are cached per runtime.
    pub fn kernels(&self, source: &str, defines: &[(&str, u32)], names: &[&str]) -> Result<Vec<Kernel>> {
        let full = format!("{COMMON_SOURCE}\n{source}");
        match self {
            Device::Driver(d) => {
                d.bind()?;
                let ptx = super::nvrtc::compile(&full, defines, &super::nvrtc::arch(d.compute_capability))?;
                let module = d.ctx.load_module(ptx).map_err(d.error("loading a kernel module"))?;
                let kernels = names.iter().map(|n| module.load_function(n).map(Kernel::Driver).map_err(d.error("finding a kernel"))).collect::<Result<Vec<_>>>()?;
                d.modules.lock().unwrap().push(module);
                Ok(kernels)
            }
            Device::Emulator(e) => Ok(e.compile(&full, defines, names)?.into_iter().map(Kernel::Emulated).collect()),
        }
    }

    /// `bytes` of zeroed device memory.
    pub fn alloc(&self, bytes: usize) -> Result<Buffer> {
        let bytes = bytes.max(4);
        match self {
            Device::Driver(d) => {
                d.bind()?;
                // SAFETY: a fresh allocation, zeroed before use; freed when the runtime drops.
                let ptr = unsafe {
                    let ptr = cudarc::driver::result::malloc_sync(bytes).map_err(|e| Error::DeviceLimit {
                        device: d.name.clone(),
                        what: format!("allocating {} failed ({e:?}); try a smaller --ctx or --gpu-mem", crate::util::human_bytes(bytes as u64)),
                    })?;
                    cudarc::driver::result::memset_d8_sync(ptr, 0, bytes).map_err(d.error("zeroing memory"))?;
                    ptr
                };
                d.allocations.lock().unwrap().push(ptr);
                Ok(Buffer { ptr, bytes })
            }
            Device::Emulator(e) => Ok(e.alloc(bytes)),
        }
    }

    /// A buffer holding `data`.
    pub fn upload<T: bytemuck::Pod>(&self, data: &[T]) -> Result<Buffer> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let b = self.alloc(bytes.len())?;
        self.write(&b, 0, bytes)?;
        Ok(b)
    }

    /// Copies `data` into `dst` at byte `offset`, ordered after the launches already queued.
    pub fn write(&self, dst: &Buffer, offset: usize, data: &[u8]) -> Result<()> {
        if offset + data.len() > dst.bytes {
            return Err(self.out_of_bounds(format!("writing {} bytes at {offset} into a buffer of {}", data.len(), dst.bytes)));
        }
        if data.is_empty() {
            return Ok(());
        }
        match self {
            Device::Driver(d) => {
                d.bind()?;
                d.stream.synchronize().map_err(d.error("waiting for the stream"))?;
                // SAFETY: in bounds (checked above); the stream is idle.
                unsafe { cudarc::driver::result::memcpy_htod_sync(dst.ptr + offset as u64, data) }.map_err(d.error("copying to the device"))
            }
            Device::Emulator(e) => {
                e.write(dst.ptr + offset as u64, data);
                Ok(())
            }
        }
    }

    /// Waits for queued work and copies `out.len()` bytes from `src` at byte `offset`.
    pub fn read(&self, src: &Buffer, offset: usize, out: &mut [u8]) -> Result<()> {
        if offset + out.len() > src.bytes {
            return Err(self.out_of_bounds(format!("reading {} bytes at {offset} from a buffer of {}", out.len(), src.bytes)));
        }
        match self {
            Device::Driver(d) => {
                d.bind()?;
                d.stream.synchronize().map_err(d.error("running kernels"))?;
                // SAFETY: in bounds (checked above); the stream is idle.
                unsafe { cudarc::driver::result::memcpy_dtoh_sync(out, src.ptr + offset as u64) }.map_err(d.error("copying from the device"))
            }
            Device::Emulator(e) => {
                e.read(src.ptr + offset as u64, out);
                Ok(())
            }
        }
    }

    pub fn read_f32(&self, src: &Buffer, count: usize) -> Result<Vec<f32>> {
        let mut bytes = vec![0u8; count * 4];
        self.read(src, 0, &mut bytes)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Queues one launch (runs it at once on the emulator).
    pub fn launch(&self, l: &Launch) -> Result<()> {
        self.launch_args(&l.kernel, l.grid, l.block, &l.args)
    }

    /// Queues `kernel` over `grid` blocks of `block` threads with `args` (a grid with a zero
    /// extent launches nothing). Allocates nothing: the argument words live on the stack.
    pub fn launch_args(&self, kernel: &Kernel, grid: [u32; 3], block: [u32; 3], args: &[Arg]) -> Result<()> {
        if grid.contains(&0) {
            return Ok(());
        }
        if args.len() > MAX_ARGS {
            return Err(Error::Kernel { device: self.describe(), reason: format!("a launch takes at most {MAX_ARGS} arguments, not {}", args.len()) });
        }
        let mut values = [0u64; MAX_ARGS];
        for (v, a) in values.iter_mut().zip(args) {
            *v = match *a {
                Arg::Buf(b) => b.ptr,
                Arg::U32(v) => v as u64,
                Arg::F32(v) => v.to_bits() as u64,
            };
        }
        // Each value sits in the low bytes of its u64 (little-endian), where a pointer to a
        // u32 or f32 parameter finds it.
        let mut params = [std::ptr::null_mut::<c_void>(); MAX_ARGS];
        for (p, v) in params.iter_mut().zip(values.iter_mut()) {
            *p = v as *mut u64 as *mut c_void;
        }
        let params = &mut params[..args.len()];
        match (self, kernel) {
            (Device::Driver(d), Kernel::Driver(f)) => {
                d.bind()?;
                let [gx, gy, gz] = grid;
                let [bx, by, bz] = block;
                // SAFETY: the argument list was built for this kernel's signature by the code
                // that made the launch; buffers are live allocations of this device.
                unsafe { cudarc::driver::result::launch_kernel(f.cu_function(), (gx, gy, gz), (bx, by, bz), 0, d.stream.cu_stream(), params) }.map_err(d.error("launching a kernel"))
            }
            (Device::Emulator(e), Kernel::Emulated(k)) => e.launch(k, grid, block, params),
            _ => Err(Error::Kernel { device: self.describe(), reason: "a kernel compiled for another device".into() }),
        }
    }

    /// Queues `data` for `dst` at byte `offset` as a streamed upload: ordered after the work
    /// queued so far and before work queued after `uploads_done` (driver: pinned staging, copy
    /// stream; emulator: a plain copy). Bulk copies go this way; `write` is for small ones.
    pub fn upload_async(&self, dst: &Buffer, offset: usize, data: &[u8]) -> Result<()> {
        if offset + data.len() > dst.bytes {
            return Err(self.out_of_bounds(format!("uploading {} bytes at {offset} into a buffer of {}", data.len(), dst.bytes)));
        }
        match self {
            Device::Driver(d) => {
                let mut uploader = d.uploader.lock().unwrap();
                d.bind()?;
                if uploader.is_none() {
                    let mut u = super::upload::Uploader::new()?;
                    u.after(d.stream.cu_stream())?;
                    *uploader = Some(u);
                }
                uploader.as_mut().unwrap().copy(dst.ptr + offset as u64, data)
            }
            Device::Emulator(e) => {
                e.write(dst.ptr + offset as u64, data);
                Ok(())
            }
        }
    }

    /// Starts a batch of `upload_async`s: they wait for the compute work queued so far (which
    /// may still read what they overwrite).
    pub fn uploads_begin(&self) -> Result<()> {
        match self {
            Device::Driver(d) => match d.uploader.lock().unwrap().as_mut() {
                Some(u) => d.bind().and_then(|_| u.after(d.stream.cu_stream())),
                None => Ok(()),
            },
            Device::Emulator(_) => Ok(()),
        }
    }

    /// Ends a batch: compute work queued from now on waits for its copies.
    pub fn uploads_done(&self) -> Result<()> {
        match self {
            Device::Driver(d) => match d.uploader.lock().unwrap().as_mut() {
                Some(u) => d.bind().and_then(|_| u.before(d.stream.cu_stream())),
                None => Ok(()),
            },
            Device::Emulator(_) => Ok(()),
        }
    }

    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Driver(d) => d.stream.synchronize().map_err(d.error("running kernels")),
            Device::Emulator(_) => Ok(()),
        }
    }

    fn out_of_bounds(&self, what: String) -> Error {
        Error::device(self.describe(), what, "out of the buffer's bounds")
    }
}

impl Drop for DriverDevice {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
        drop(self.uploader.lock().unwrap().take());
        for ptr in self.allocations.lock().unwrap().drain(..) {
            // SAFETY: allocated by this runtime with malloc_sync, freed once.
            unsafe {
                let _ = cudarc::driver::result::free_sync(ptr);
            }
        }
    }
}

/// A step's launches captured once as a CUDA graph and replayed with one call (the driver), or
/// replayed launch by launch (the emulator). Valid while the launches' buffers and grids are:
/// per-step values live in device buffers the kernels read, so one graph serves every position.
pub struct Graph {
    exec: Option<cudarc::driver::sys::CUgraphExec>,
    launches: Vec<Launch>,
}

impl Graph {
    pub fn capture(rt: &Device, launches: Vec<Launch>) -> Result<Graph> {
        let exec = match rt {
            Device::Driver(d) => {
                use cudarc::driver::{result, sys};
                d.bind()?;
                let stream = d.stream.cu_stream();
                d.stream.synchronize().map_err(d.error("waiting for the stream"))?;
                // SAFETY: capture brackets launches on our own stream; the graph is destroyed
                // after instantiation, the executable one when this Graph drops.
                unsafe {
                    result::stream::begin_capture(stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(d.error("starting a graph capture"))?;
                    let recorded = launches.iter().try_for_each(|l| rt.launch(l));
                    let graph = result::stream::end_capture(stream).map_err(d.error("ending a graph capture"))?;
                    recorded?;
                    let exec = result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)).map_err(d.error("instantiating a graph"));
                    let _ = result::graph::destroy(graph);
                    Some(exec?)
                }
            }
            Device::Emulator(_) => None,
        };
        Ok(Graph { exec, launches })
    }

    pub fn replay(&self, rt: &Device) -> Result<()> {
        match (rt, self.exec) {
            (Device::Driver(d), Some(exec)) => {
                // The engine may have moved to another thread since the capture.
                d.bind()?;
                // SAFETY: the executable graph was instantiated from launches on this device.
                unsafe { cudarc::driver::result::graph::launch(exec, d.stream.cu_stream()) }.map_err(d.error("launching a graph"))
            }
            _ => self.launches.iter().try_for_each(|l| rt.launch(l)),
        }
    }
}

// SAFETY: the executable graph is an opaque driver handle, used and destroyed only through the
// driver, which allows any thread that binds the context.
unsafe impl Send for Graph {}

impl Drop for Graph {
    fn drop(&mut self) {
        if let Some(exec) = self.exec.take() {
            // SAFETY: instantiated in `capture`, destroyed once.
            unsafe {
                let _ = cudarc::driver::result::graph::exec_destroy(exec);
            }
        }
    }
}

/// Compiled kernel families by source and defines, so each variant compiles once per runtime.
#[derive(Default)]
pub struct KernelCache {
    compiled: Mutex<HashMap<FamilyKey, Vec<Kernel>>>,
}

/// A compiled family: its source and defines.
type FamilyKey = (&'static str, Vec<(String, u32)>);

impl KernelCache {
    /// Kernel `name` of the family `source` (one of `sources::ALL`) compiled with `defines`;
    /// the whole family compiles at once.
    pub fn get(&self, rt: &Device, source: &'static str, defines: &[(&str, u32)], name: &str) -> Result<Kernel> {
        let names = super::sources::kernels_of(source);
        let index = names.iter().position(|n| *n == name).ok_or_else(|| Error::Kernel { device: rt.describe(), reason: format!("no kernel `{name}` in its family") })?;
        let key = (source, defines.iter().map(|(k, v)| (k.to_string(), *v)).collect());
        let mut compiled = self.compiled.lock().unwrap();
        if !compiled.contains_key(&key) {
            compiled.insert(key.clone(), rt.kernels(source, defines, names)?);
        }
        Ok(compiled[&key][index].clone())
    }
}
