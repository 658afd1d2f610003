//! Compute backends. The GPU backends implement [`Backend`]: each holds its device, lowers every plan op to its kernels,
//! keeps expert slot pools, and records, submits and reads back a step. The model (`plan`) and
//! the step loop, chunked prefill and expert streaming (`runtime`) are written once above them.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod wgpu;

use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::weights::{Matrix, Mlp};
use crate::model::Logits;
use crate::plan::{BufferId, Op, Target, WeightId};

/// Which compute device a command runs on (`--gpu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuChoice {
    /// The best hardware GPU adapter (discrete, then integrated, then virtual); the CPU backend
    /// where there is none, or only software adapters (slower than it) and no `--gpu-mem`.
    Auto,
    /// The CPU backend: the forward plan on the host's cores.
    Cpu,
    /// The f32 CPU reference (the oracle every backend is tested against).
    Reference,
    Vulkan,
    Metal,
    Dx12,
    Gl,
    /// NVIDIA datacenter GPUs through the `cuda` cargo feature.
    Cuda,
}

crate::util::choices!(GpuChoice {
    Auto => "auto": "the best GPU adapter; the CPU backend if there is none or only a software one (lavapipe)",
    Cpu => "cpu": "the CPU backend: the forward plan on the host's cores",
    Reference => "reference": "the f32 CPU reference (the oracle the backends are tested against)",
    Vulkan => "vulkan": "wgpu on Vulkan",
    Metal => "metal": "wgpu on Metal",
    Dx12 => "dx12": "wgpu on DirectX 12",
    Gl => "gl": "wgpu on OpenGL",
    Cuda => "cuda": "NVIDIA GPUs through the cuda cargo feature",
});

/// Workgroup (block) counts of a lowered op as a function of the step's token count: a plain
/// function of the count and four values fixed at lowering, so lowered ops are data (`Send`,
/// nothing boxed, nothing allocated per step).
#[derive(Clone, Copy)]
pub struct Grid {
    rule: fn(u32, [u32; 4]) -> [u32; 3],
    args: [u32; 4],
}

impl Grid {
    pub const fn new(args: [u32; 4], rule: fn(u32, [u32; 4]) -> [u32; 3]) -> Grid {
        Grid { rule, args }
    }

    /// The same counts for every step.
    pub const fn fixed([x, y, z]: [u32; 3]) -> Grid {
        Grid::new([x, y, z, 0], |_, [x, y, z, _]| [x, y, z])
    }

    /// `[n, 1, 1]`: one workgroup per token.
    pub const fn per_token() -> Grid {
        Grid::new([0; 4], |n, _| [n, 1, 1])
    }

    pub fn at(&self, n: u32) -> [u32; 3] {
        (self.rule)(n, self.args)
    }
}

impl std::fmt::Debug for Grid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Grid(n=1: {:?})", self.at(1))
    }
}

/// Per-step values every kernel reads (`Step` in shaders/step.wgsl and kernels/common.cuh),
/// written once before each step.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StepValues {
    /// Tokens in this step (a prefill chunk, or one token of each sequence decoded). Each
    /// token's position and cache rows are in the plan's `positions` buffer.
    pub n_tokens: u32,
    /// First row whose logits are wanted (n_tokens - 1 when only the last position's are).
    pub logits_row0: u32,
    pub pad: [u32; 2],
}

impl StepValues {
    pub fn new(n_tokens: u32) -> StepValues {
        StepValues { n_tokens, logits_row0: n_tokens.saturating_sub(1), pad: [0; 2] }
    }
}

/// What a whole step computes besides the body: which logits head, and the greedy argmax.
/// Backends that capture steps (CUDA graphs) keep one capture per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StepKind {
    pub head: Option<Logits>,
    pub greedy: bool,
    /// Which program: the main model (keeping its hidden states for the MTP layer or not), or
    /// the MTP layer's draft step.
    pub part: Part,
}

/// The programs of a plan a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    Main,
    /// The main model, then its rows' final norm kept for the MTP layer.
    MainKeepingHidden,
    /// The MTP layer's draft step.
    Mtp,
}

/// A backend's own work counters: two named counts (dispatches and submits on wgpu, launches
/// and graph replays on CUDA).
#[derive(Debug, Clone, Copy)]
pub struct WorkCounters {
    pub names: [&'static str; 2],
    pub counts: [u64; 2],
}

impl WorkCounters {
    pub const fn new(names: [&'static str; 2]) -> WorkCounters {
        WorkCounters { names, counts: [0; 2] }
    }

    pub fn reset(&mut self) {
        self.counts = [0; 2];
    }
}

/// A backend's device objects for a plan, by plan id.
pub struct Resources<B: Backend> {
    pub buffers: Vec<B::Buffer>,
    pub weights: Vec<B::Matrix>,
    /// Expert slot pools (`Plan::streaming`'s pools, in order).
    pub pools: Vec<B::Pool>,
}

impl<B: Backend> Default for Resources<B> {
    fn default() -> Self {
        Resources { buffers: Vec::new(), weights: Vec::new(), pools: Vec::new() }
    }
}

impl<B: Backend> Resources<B> {
    pub fn buf(&self, id: BufferId) -> &B::Buffer {
        &self.buffers[id.0]
    }

    pub fn weight(&self, id: WeightId) -> &B::Matrix {
        &self.weights[id.0]
    }
}

/// What a backend is opened from: a device (`GpuContext`, a CUDA device), or the backend itself.
pub trait IntoBackend<B> {
    fn into_backend(self) -> Result<B>;
}

impl<B: Backend> IntoBackend<B> for B {
    fn into_backend(self) -> Result<B> {
        Ok(self)
    }
}

/// A GPU backend: its device, its lowering of each plan op, its expert slot pools, and how it
/// records and submits a step. Buffers hold 32-bit words.
pub trait Backend: Send + Sized {
    type Buffer: Send;
    /// A weight matrix, or a stack of experts, in its format.
    type Matrix: Send;
    /// Room for a pool of expert slots (gate, up and down) and the list of slots to compute.
    type Pool: Send;
    /// One lowered op (a dispatch, a launch).
    type Op: Send;

    /// The device, for stats lines and errors.
    fn describe(&self) -> String;

    /// The limits a plan for `config` with room for `capacity` tokens is built for here.
    fn target(&mut self, config: &ModelConfig, capacity: usize) -> Result<Target>;

    /// Runs `load` (allocations, uploads, lowering), turning what the device rejected on the way
    /// into one error.
    fn checked<T>(&mut self, load: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        load(self)
    }

    /// `words` zeroed 32-bit words.
    fn alloc(&mut self, name: &str, words: usize) -> Result<Self::Buffer>;
    /// A buffer holding `values`.
    fn upload(&mut self, name: &str, values: &[f32]) -> Result<Self::Buffer>;
    /// One matrix or same-shaped experts in their format; `chunked`: the kernels reading it take
    /// row chunks, so it may be split where it exceeds a binding.
    fn upload_matrix(&mut self, stack: &[&Matrix], chunked: bool) -> Result<Self::Matrix>;
    /// Bytes a matrix takes on the device.
    fn matrix_bytes(m: &Self::Matrix) -> u64;
    /// Copies `data` into `dst` from its start, ordered before the work recorded after it.
    fn write(&mut self, dst: &Self::Buffer, data: &[u8]) -> Result<()>;

    /// Room for `slots` experts shaped like `expert`, and a slot list of `max_pairs` entries.
    fn pool(&mut self, expert: &Mlp, slots: usize, max_pairs: usize) -> Result<Self::Pool>;
    /// Queues the copy of `expert` into the pool's `slot`; returns the bytes copied.
    fn write_expert(&mut self, pool: &Self::Pool, slot: usize, expert: &Mlp) -> Result<u64>;
    /// The (step slot, pool slot) pairs the pool's expert ops compute next, flattened.
    fn write_slot_list(&mut self, pool: &Self::Pool, pairs: &[u32]) -> Result<()>;
    /// Expert copies queued from now on wait for the work recorded so far (which may still
    /// read the slots they overwrite).
    fn uploads_begin(&mut self) -> Result<()> {
        Ok(())
    }
    /// Work recorded from now on waits for the expert copies queued so far.
    fn uploads_done(&mut self) -> Result<()> {
        Ok(())
    }

    /// Appends `op`'s lowering (one or more device ops) to `out`.
    fn lower(&mut self, op: &Op, res: &Resources<Self>, out: &mut Vec<Self::Op>) -> Result<()>;

    /// Starts a step: its per-step values.
    fn begin_step(&mut self, step: StepValues) -> Result<()>;
    /// Records `ops` for a step of `n` tokens (the argmax: `n` rows).
    fn record(&mut self, ops: &[Self::Op], n: u32) -> Result<()>;
    /// Records a whole step that never stops for the host, as `(ops, n)` parts in order: body,
    /// head, argmax. Backends may replay a capture of it (one per kind of single-token step).
    fn record_step(&mut self, _kind: StepKind, parts: [(&[Self::Op], u32); 3]) -> Result<()> {
        parts.into_iter().try_for_each(|(ops, n)| self.record(ops, n))
    }
    /// Sends what was recorded to the device without waiting for it.
    fn flush(&mut self) -> Result<()>;
    /// Waits for everything recorded and returns the bytes of `parts` (buffer, bytes from its
    /// start), one after the other, in storage the backend keeps (no allocation per step).
    fn read(&mut self, parts: &[(&Self::Buffer, usize)]) -> Result<&[u8]>;

    /// The backend's own work counters for `--verbose`, since the last reset.
    fn work(&self) -> WorkCounters;
    fn reset_work(&mut self);
    /// Per-kernel timings, where the backend was asked to profile (`DSRUN_PROFILE`).
    fn profile_report(&self) -> Option<String> {
        None
    }
}
