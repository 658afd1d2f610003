//! A decode step allocates nothing on the host: the lowered ops, read-back storage and argument
//! words are all made at load. A counting allocator counts this thread's allocations during
//! decode steps after a warm-up, apart from those made inside driver calls (wgpu allocates as
//! it records and submits; `dsrun::hot_path::driver` marks those calls), which are reported,
//! and the CPU backend's pool workers' (`dsrun::hot_path::is_pool_worker`). The tests that
//! count run one at a time: the workers' count is process-wide.

mod common;
use dsrun::backend::wgpu::context;
use dsrun::device::GpuChoice;
use dsrun::engine::{Engine, Steps};
use dsrun::model::{Logits, Model};
use dsrun::runtime::GpuModel;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static OURS: Cell<u64> = const { Cell::new(0) };
    static DRIVERS: Cell<u64> = const { Cell::new(0) };
}

/// Counting the pool workers' allocations (process-wide), and their count.
static WORKERS_COUNTING: AtomicBool = AtomicBool::new(false);
static WORKERS: AtomicU64 = AtomicU64::new(0);
/// One counting test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn count() {
    if WORKERS_COUNTING.load(Ordering::Relaxed) && dsrun::hot_path::is_pool_worker() {
        WORKERS.fetch_add(1, Ordering::Relaxed);
    }
    if COUNTING.with(Cell::get) {
        let counter = if dsrun::hot_path::in_driver() { &DRIVERS } else { &OURS };
        counter.with(|c| c.set(c.get() + 1));
    }
}

// SAFETY: forwards to the system allocator; counting touches only const-initialised
// thread-locals without destructors and static atomics (no allocation, no re-entry).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// (dsrun's, the drivers') allocations per call of `step`, over `steps` calls.
fn allocations_per_step(steps: u64, mut step: impl FnMut()) -> (f64, f64) {
    OURS.with(|c| c.set(0));
    DRIVERS.with(|c| c.set(0));
    WORKERS.store(0, Ordering::Relaxed);
    WORKERS_COUNTING.store(true, Ordering::Relaxed);
    COUNTING.with(|c| c.set(true));
    for _ in 0..steps {
        step();
    }
    COUNTING.with(|c| c.set(false));
    WORKERS_COUNTING.store(false, Ordering::Relaxed);
    let ours = OURS.with(Cell::get) + WORKERS.load(Ordering::Relaxed);
    (ours as f64 / steps as f64, DRIVERS.with(Cell::get) as f64 / steps as f64)
}

/// Greedy decode on `engine` after a prompt and a warm-up: dsrun allocates nothing per step;
/// a sampled step allocates only the logits vector it returns.
fn decode_allocates_nothing(engine: &mut dyn Engine) {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let vocab = engine.config().vocab_size as u32;
    let mut next = engine.forward_greedy(&[1, 2, 3, 4, 5]).unwrap();
    for _ in 0..3 {
        next = engine.forward_greedy(&[next]).unwrap();
        engine.forward(&[next], Logits::Last).unwrap();
    }
    let (ours, drivers) = allocations_per_step(16, || next = engine.forward_greedy(&[next % vocab]).unwrap());
    eprintln!("{}: greedy decode step: {ours} allocations by dsrun, {drivers} inside driver calls", engine.device_name());
    assert_eq!(ours, 0.0, "a greedy decode step allocated on the host");
    let (ours, _) = allocations_per_step(8, || {
        engine.forward(&[next % vocab], Logits::Last).unwrap();
    });
    assert_eq!(ours, 1.0, "a sampled decode step allocates only the logits it returns");
}

#[test]
fn a_wgpu_decode_step_allocates_nothing() {
    let model = Model::load(&common::fixture("v3_noaux")).unwrap();
    let ctx = context::open(GpuChoice::Auto).expect("a wgpu adapter (on Debian: apt-get install mesa-vulkan-drivers)");
    let mut engine = GpuModel::new(ctx, &model, 64, Default::default()).unwrap();
    decode_allocates_nothing(&mut engine);
}

/// Hybrid placement: the host's stop at each MoE layer (read-back, the CPU backend's experts,
/// the routed sum written back) allocates nothing either.
#[test]
fn a_hybrid_decode_step_allocates_nothing() {
    let model = Model::load(&common::fixture("v3_noaux")).unwrap();
    let ctx = context::open(GpuChoice::Auto).expect("a wgpu adapter (on Debian: apt-get install mesa-vulkan-drivers)");
    let options = dsrun::plan::budget::GpuOptions { cpu_moe: usize::MAX, ..Default::default() };
    let mut engine = GpuModel::with_options(ctx, &model, 64, &options).unwrap();
    assert!(engine.host_layers().is_some());
    decode_allocates_nothing(&mut engine);
    // A layer split between the devices: the GPU's slot lists and weights written per stop.
    let ctx = context::open(GpuChoice::Auto).unwrap();
    let options = dsrun::plan::budget::GpuOptions { gpu_mem: dsrun::plan::budget::GpuMem::ExpertShare(0.25), ..Default::default() };
    let mut engine = GpuModel::with_options(ctx, &model, 64, &options).unwrap();
    assert!(engine.split_experts().is_some());
    decode_allocates_nothing(&mut engine);
    // With staging slots for prompt uploads (every host layer then lists slots).
    let ctx = context::open(GpuChoice::Auto).unwrap();
    let options = dsrun::plan::budget::GpuOptions { cpu_moe: usize::MAX, prompt_uploads: dsrun::plan::budget::PromptUploads::On, ..Default::default() };
    let mut engine = GpuModel::with_options(ctx, &model, 64, &options).unwrap();
    decode_allocates_nothing(&mut engine);
}

/// The CPU backend: nothing on the calling thread nor on its pool's workers (every kernel works
/// in per-thread scratch kept between steps), with the stored weights, and under `--math
/// fast` with q4 weights (int8 activations laid out in scratch) and the stored bf16 ones (bf16
/// dots, where the CPU has them).
#[test]
fn a_cpu_backend_decode_step_allocates_nothing() {
    use dsrun::backend::cpu::CpuBackend;
    let model = Model::load(&common::fixture("v3_noaux")).unwrap();
    let mut engine = dsrun::runtime::Runtime::new(CpuBackend::new(), &model, 64, Default::default()).unwrap();
    decode_allocates_nothing(&mut engine);
    let fast = CpuBackend::new().with_math(dsrun::plan::budget::Math::Fast);
    let mut engine = dsrun::runtime::Runtime::new(fast, &model, 64, dsrun::quant::QuantTarget::Q4).unwrap();
    decode_allocates_nothing(&mut engine);
    let fast = CpuBackend::new().with_math(dsrun::plan::budget::Math::Fast);
    let mut engine = dsrun::runtime::Runtime::new(fast, &model, 64, Default::default()).unwrap();
    decode_allocates_nothing(&mut engine);
}

/// On the CUDA emulator, and on an NVIDIA device where there is one (whose decode steps replay
/// a CUDA graph).
#[cfg(feature = "cuda")]
#[test]
fn a_cuda_decode_step_allocates_nothing() {
    use dsrun::backend::cuda::{self, Device};
    use dsrun::runtime::CudaModel;
    let model = Model::load(&common::fixture("v3_noaux")).unwrap();
    let mut devices = vec![Device::emulator().expect("the CUDA emulator needs a C++ compiler")];
    match cuda::open(0) {
        Ok(device) => devices.push(device),
        Err(e) => common::skip("cuda hot path", &format!("on an NVIDIA device: {e}"), true),
    }
    for device in devices {
        let mut engine = CudaModel::new(device, &model, 64, Default::default()).unwrap();
        decode_allocates_nothing(&mut engine);
    }
}

/// Engines can move to another thread (a server's worker owns its engine).
#[test]
fn engines_are_send() {
    fn send<T: Send>() {}
    send::<GpuModel>();
    send::<dsrun::engine::CpuEngine>();
    send::<Box<dyn Engine>>();
    #[cfg(feature = "cuda")]
    send::<dsrun::runtime::CudaModel>();

    let model = Model::load(&common::fixture("v2_lite")).unwrap();
    let ctx = context::open(GpuChoice::Auto).expect("a wgpu adapter");
    let mut engine: Box<dyn Engine> = Box::new(GpuModel::new(ctx, &model, 16, Default::default()).unwrap());
    let here = engine.forward_greedy(&[3, 1, 4]).unwrap();
    engine.reset();
    let there = std::thread::spawn(move || engine.forward_greedy(&[3, 1, 4]).unwrap()).join().unwrap();
    assert_eq!(here, there);
}
