//! The CPU backend: the forward plan lowered to kernels on the host's
//! cores, computed from the memory-mapped checkpoint in its stored format (a weight "upload"
//! keeps a reference to the mapped tensor, never a copy). Buffers are host vectors of 32-bit
//! words; a step's ops run as they are recorded.
//!
//! It lowers every plan op but expert slot pools (a `--gpu-mem`-style budget is refused naming
//! them): the whole model, its MTP layer and V3.2's indexer run through the runtime's step loop
//! (`Runtime<CpuBackend>`), held to transformers' logits on every fixture family
//! (tests/cpu_backend.rs) and every op to the CPU reference by the conformance harness.
//!
//! The kernels: one-token mat-vecs that stream each weight byte once (`matmul`, reading the
//! input as `input` lays it out: bf16 word pairs, or int8 activations or bf16 dots (`bf16`)
//! under `--math fast`), a
//! register-blocked matmul for several tokens and for experts grouped by expert (`gemm`),
//! attention that reads each cached latent once for every head (`attention`) and MLA's
//! per-head kv_b products around it (`absorb`), all written over a SIMD level's vector
//! (`vector`: AVX-512, AVX2, NEON, portable) and run on a persistent pool (`pool`) with
//! per-thread scratch, so a decode step allocates nothing. `DSRUN_PROFILE=1` times each op.

mod absorb;
mod attention;
mod bf16;
mod blocks;
mod gemm;
mod gguf_dot;
mod indexer;
mod input;
mod kernels;
mod matmul;
mod pool;
mod router;
mod scratch;
mod vector;

pub use pool::physical_cores;
pub use vector::Simd;

use super::{Backend, Resources, StepValues, WorkCounters};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::weights::{Matrix, Mlp};
use crate::plan::budget::Math;
use crate::plan::{ExpertWeights, KernelLimits, Op, Target};
pub use kernels::CpuMatrix;
use kernels::Kernel;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

// The kernels read 16-bit caches and weights through little-endian views of their words.
const _: () = assert!(cfg!(target_endian = "little"), "the CPU backend assumes a little-endian host");

/// Most tokens one step takes: prompts run in chunks of this many.
const MAX_CHUNK: usize = 256;

/// A buffer: its index among the backend's host vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuBuffer(usize);

/// The host: buffers of words, what the last read returned, the work counters.
pub struct CpuBackend {
    simd: Simd,
    math: Math,
    /// Plans for it stop at host layers as a GPU's do ([`CpuBackend::with_host_stops`]).
    host_stops: bool,
    buffers: Vec<Vec<u32>>,
    readback: Vec<u8>,
    work: WorkCounters,
    /// `DSRUN_PROFILE`: time per kind of op ("kernel shape" -> (calls, seconds)).
    profile: Option<std::collections::BTreeMap<String, (u64, f64)>>,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend {
            simd: Simd::detect(),
            math: Math::Exact,
            host_stops: false,
            buffers: Vec::new(),
            readback: Vec::new(),
            work: WorkCounters::new(["ops", "steps"]),
            profile: std::env::var_os("DSRUN_PROFILE").map(|_| Default::default()),
        }
    }
}

/// Sets the threads the CPU backend (and the reference, and weight conversion) computes on,
/// once per process, before anything runs (`--threads`). The default: the CPU backend one per
/// physical core ([`physical_cores`]), the reference rayon's one per logical CPU.
pub fn set_threads(threads: usize) -> Result<()> {
    if threads == 0 {
        return Err(Error::Invalid("--threads 0: give at least 1".into()));
    }
    pool::set_threads(threads)?;
    match rayon::ThreadPoolBuilder::new().num_threads(threads).build_global() {
        Err(_) if rayon::current_num_threads() == threads => Ok(()),
        built => built.map_err(|e| Error::Invalid(format!("--threads {threads}: {e}"))),
    }
}

/// The host's read bandwidth in bytes per second, measured: every thread of the pool summing its
/// share of a 256 MiB buffer (well past the caches), the best of three passes. Decode streams
/// each weight byte once, so this bounds it (`dsrun devices`).
pub fn read_bandwidth() -> f64 {
    const WORDS: usize = 32 << 20;
    let buffer: Vec<u64> = (0..WORDS as u64).collect();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let sum = AtomicU64::new(0);
        pool::pool().run(WORDS >> 16, &|i| {
            let part = buffer[i << 16..(i + 1) << 16].iter().fold(0u64, |a, &b| a.wrapping_add(b));
            sum.fetch_add(part, Ordering::Relaxed);
        });
        std::hint::black_box(sum);
        best = best.min(started.elapsed().as_secs_f64());
    }
    (WORDS * 8) as f64 / best
}

/// The cores' multiply-add rate in FLOP/s at the detected level, measured: every thread of the
/// pool running independent chains of vector FMAs held in registers, the best of three. The
/// ceiling for prefill, which the blocked matmul keeps compute-bound.
pub fn arithmetic_peak() -> f64 {
    const ITERATIONS: usize = 1 << 20;
    let simd = Simd::detect();
    measured_rate(FmaChains::flops(ITERATIONS, simd), &|| {
        std::hint::black_box(vector::dispatch(simd, FmaChains(ITERATIONS)));
    })
}

/// FLOP/s of `task` (`flops` each) run eight times per thread over the pool, the best of three.
fn measured_rate(flops: f64, task: &(dyn Fn() + Sync)) -> f64 {
    let pool = pool::pool();
    let tasks = 8 * pool.threads();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        pool.run(tasks, &|_| task());
        best = best.min(started.elapsed().as_secs_f64());
    }
    tasks as f64 * flops / best
}

/// The ceiling of the prefill's matmuls under `math`, measured (FLOP/s), and what it is: the
/// bf16 dots' where `--math fast` multiplies in them (twice the FMA's multiply-adds an
/// instruction), else the FMA's ([`arithmetic_peak`]).
pub fn prefill_peak(math: Math) -> (f64, &'static str) {
    if !(math == Math::Fast && bf16_dots()) {
        return (arithmetic_peak(), "FMA");
    }
    const ITERATIONS: usize = 1 << 20;
    let rate = measured_rate(bf16::chain_flops(ITERATIONS), &|| {
        std::hint::black_box(bf16::chains(ITERATIONS));
    });
    (rate, "bf16-dot")
}

/// Independent chains of FMAs (enough to cover the FMA's latency on two pipes), as many as
/// the level's registers hold.
struct FmaChains(usize);

impl FmaChains {
    fn chains(registers: usize) -> usize {
        if registers >= 32 {
            12
        } else {
            6
        }
    }

    fn flops(iterations: usize, simd: Simd) -> f64 {
        let registers = vector::dispatch(simd, Registers);
        (iterations * Self::chains(registers) * vector::LANES * 2) as f64
    }
}

struct Registers;
impl vector::AtLevel for Registers {
    type Output = usize;
    #[inline(always)]
    unsafe fn run<V: vector::Vector>(self) -> usize {
        V::REGISTERS
    }
}

impl vector::AtLevel for FmaChains {
    type Output = f32;
    #[inline(always)]
    unsafe fn run<V: vector::Vector>(self) -> f32 {
        // SAFETY (every call): the level is the caller's contract.
        unsafe {
            let (a, b) = (V::splat(0.999_999), V::splat(1e-7));
            // Distinct starts: identical chains would be computed once.
            let mut acc: [V; 12] = std::array::from_fn(|i| V::splat(1.0 + i as f32 * 1e-3));
            let chains = Self::chains(V::REGISTERS);
            for _ in 0..self.0 {
                for x in acc.iter_mut().take(chains) {
                    *x = V::mul_add(*x, a, b);
                }
            }
            // Every chain feeds the result: an unused one would not be computed.
            acc.chunks_exact(4).map(|c| V::sum4([c[0], c[1], c[2], c[3]]).iter().sum::<f32>()).sum()
        }
    }
}

/// `dsrun devices`' line for the CPU: its kernels' SIMD level, threads and read bandwidth.
pub fn describe_host() -> String {
    let dots = if bf16_dots() { ", bf16 dots under --math fast" } else { "" };
    format!("cpu: {} kernels, {} threads, read bandwidth {:.1} GB/s{dots} (--gpu cpu)", Simd::detect().name(), pool::pool().threads(), read_bandwidth() / 1e9)
}

/// Whether `--math fast` multiplies in bf16 dots here (AVX512-BF16 at the detected level).
pub fn bf16_dots() -> bool {
    bf16::applies(Simd::detect(), Math::Fast)
}

impl CpuBackend {
    pub fn new() -> CpuBackend {
        CpuBackend::default()
    }

    /// The backend with its kernels at `simd`'s level (tests of each level), or an error where
    /// this CPU does not run it.
    pub fn with_simd(simd: Simd) -> Result<CpuBackend> {
        if !Simd::available().contains(&simd) {
            return Err(Error::Invalid(format!("this CPU does not run {} kernels", simd.name())));
        }
        Ok(CpuBackend { simd, ..CpuBackend::default() })
    }

    /// The backend multiplying with `math`'s activations (`--math`).
    pub fn with_math(self, math: Math) -> CpuBackend {
        CpuBackend { math, ..self }
    }

    /// The backend standing in for a GPU in hybrid placement: plans for it hand MoE layers'
    /// routed experts to a second CPU backend on the host (`--cpu-moe`), as they would from a
    /// GPU. The same arithmetic with the hand-over added: its cost measured without a GPU
    /// (`cargo bench --bench decode -- --host-stops`), and the hybrid runtime tested on it.
    pub fn with_host_stops(self) -> CpuBackend {
        CpuBackend { host_stops: true, ..self }
    }

    fn index(b: &CpuBuffer) -> usize {
        b.0
    }
}

fn not_yet(op: &Op) -> Error {
    Error::Invalid(format!("the CPU backend does not lower `{}` yet", op.name()))
}

impl Backend for CpuBackend {
    type Buffer = CpuBuffer;
    type Matrix = Arc<CpuMatrix>;
    type Pool = ();
    type Op = Kernel;

    fn describe(&self) -> String {
        let math = match self.math {
            Math::Exact => "",
            Math::Fast if bf16::applies(self.simd, Math::Fast) => ", fast math: int8 and bf16 dots",
            Math::Fast => ", fast math: int8 dots",
        };
        format!("cpu ({}, {} threads{math})", self.simd.name(), pool::pool().threads())
    }

    fn target(&mut self, _config: &ModelConfig, _capacity: usize) -> Result<Target> {
        Ok(Target {
            max_chunk: MAX_CHUNK,
            attention_scratch: 0,
            binding_limit: u64::MAX,
            stack_limit: u64::MAX,
            private_bytes: 0,
            memory: None,
            software: true,
            kernels: KernelLimits { experts: usize::MAX, groups: usize::MAX, top_k: usize::MAX, index_dim: usize::MAX },
            group_experts: false,
            hybrid: self.host_stops,
        })
    }

    fn alloc(&mut self, _name: &str, words: usize) -> Result<CpuBuffer> {
        self.buffers.push(vec![0; words]);
        Ok(CpuBuffer(self.buffers.len() - 1))
    }

    fn upload(&mut self, _name: &str, values: &[f32]) -> Result<CpuBuffer> {
        self.buffers.push(bytemuck::cast_slice(values).to_vec());
        Ok(CpuBuffer(self.buffers.len() - 1))
    }

    fn upload_matrix(&mut self, stack: &[&Matrix], _chunked: bool) -> Result<Arc<CpuMatrix>> {
        let first = stack.first().ok_or_else(|| Error::Invalid("an empty weight stack".into()))?;
        if stack.iter().any(|m| (m.rows, m.cols, m.dtype) != (first.rows, first.cols, first.dtype)) {
            return Err(Error::Invalid(format!("`{}`: a stack of matrices of different shapes or formats", first.name)));
        }
        // Clones share the mapped bytes: nothing is copied.
        Ok(Arc::new(CpuMatrix { stack: stack.iter().map(|m| (*m).clone()).collect() }))
    }

    fn matrix_bytes(m: &Arc<CpuMatrix>) -> u64 {
        m.stack.iter().map(|m| m.stored_bytes() as u64).sum()
    }

    fn write(&mut self, dst: &CpuBuffer, data: &[u8]) -> Result<()> {
        let words = &mut self.buffers[Self::index(dst)];
        if data.len() > words.len() * 4 {
            return Err(Error::Invalid(format!("writing {} bytes into a buffer of {}", data.len(), words.len() * 4)));
        }
        bytemuck::cast_slice_mut::<u32, u8>(words)[..data.len()].copy_from_slice(data);
        Ok(())
    }

    fn pool(&mut self, _expert: &Mlp, _slots: usize, _max_pairs: usize) -> Result<()> {
        Err(Error::Invalid("the CPU backend does not stream experts through slot pools yet".into()))
    }

    fn write_expert(&mut self, _pool: &(), _slot: usize, _expert: &Mlp) -> Result<u64> {
        Err(Error::Invalid("the CPU backend does not stream experts through slot pools yet".into()))
    }

    fn write_slot_list(&mut self, _pool: &(), _pairs: &[u32]) -> Result<()> {
        Err(Error::Invalid("the CPU backend does not stream experts through slot pools yet".into()))
    }

    fn lower(&mut self, op: &Op, res: &Resources<Self>, out: &mut Vec<Kernel>) -> Result<()> {
        let buf = |id| Self::index(res.buf(id));
        let weight = |id| res.weight(id).clone();
        let kernel = match op {
            Op::Embed { table, tokens, out } => Kernel::Embed { table: weight(*table), tokens: buf(*tokens), out: buf(*out) },
            Op::RmsNorm { dim, eps, x, weight: w, out, rows } => Kernel::RmsNorm { dim: *dim, eps: *eps, x: buf(*x), weight: buf(*w), out: buf(*out), rows: *rows },
            Op::Matmul { w, x, y, rows, accumulate } => Kernel::Matmul { w: weight(*w), x: buf(*x), y: buf(*y), rows: *rows, accumulate: *accumulate },
            Op::SiluMul { width, gate, up } => Kernel::SiluMul { width: *width, gate: buf(*gate), up: buf(*up) },
            Op::Router { params, experts, logits, bias, ids, weights, rows } => {
                Kernel::Router { params: params.clone(), experts: *experts, logits: buf(*logits), bias: bias.map(buf), ids: buf(*ids), weights: buf(*weights), rows: *rows }
            }
            Op::ExpertMatmul { matrix, weights: ExpertWeights::Stack(w), k, x, y, ids, .. } => {
                Kernel::ExpertMatmul { w: weight(*w), x_div: matrix.x_div(*k), k: *k, x: buf(*x), y: buf(*y), ids: buf(*ids) }
            }
            // Experts are not grouped here (the target says so); a plan for another target may
            // still hold the op, which then changes nothing.
            Op::GroupExperts { .. } => return Ok(()),
            Op::MoeCombine { dim, k, expert_out, weights, shared, h } => {
                Kernel::MoeCombine { dim: *dim, k: *k, expert_out: buf(*expert_out), weights: buf(*weights), shared: shared.map(buf), h: buf(*h) }
            }
            Op::Argmax { vocab, logits, ids } => Kernel::Argmax { vocab: *vocab, logits: buf(*logits), ids: buf(*ids) },
            Op::RopeQ { q, inv_freq, positions, mla } => Kernel::RopeQ { q: buf(*q), inv_freq: buf(*inv_freq), positions: buf(*positions), mla: *mla },
            Op::LatentStore { kv, norm, inv_freq, positions, cache, mla } => {
                Kernel::LatentStore { kv: buf(*kv), norm: buf(*norm), inv_freq: buf(*inv_freq), positions: buf(*positions), cache: buf(*cache), mla: *mla }
            }
            Op::QAbsorb { kv_b, q, q_lat, mla } => Kernel::QAbsorb { kv_b: weight(*kv_b), q: buf(*q), q_lat: buf(*q_lat), mla: *mla },
            // The scratch is the GPUs' split space: unused here.
            Op::Attention { q, q_lat, positions, cache, o_lat, mla, sparse, .. } => {
                Kernel::Attention { q: buf(*q), q_lat: buf(*q_lat), positions: buf(*positions), cache: buf(*cache), o_lat: buf(*o_lat), mla: *mla, sparse: sparse.map(|(s, k)| (buf(s), k)) }
            }
            Op::VUp { kv_b, o_lat, o, mla } => Kernel::VUp { kv_b: weight(*kv_b), o_lat: buf(*o_lat), o: buf(*o), mla: *mla },
            Op::IndexerPrepare { keys, queries, norm, bias, inv_freq, positions, cache, shape } => Kernel::IndexerPrepare {
                keys: buf(*keys),
                queries: buf(*queries),
                norm: buf(*norm),
                bias: buf(*bias),
                inv_freq: buf(*inv_freq),
                positions: buf(*positions),
                cache: buf(*cache),
                shape: *shape,
            },
            Op::IndexerScores { queries, weights, positions, cache, scores, shape } => {
                Kernel::IndexerScores { queries: buf(*queries), weights: buf(*weights), positions: buf(*positions), cache: buf(*cache), scores: buf(*scores), shape: *shape }
            }
            Op::IndexerTopK { scores, positions, selected, shape } => Kernel::IndexerTopK { scores: buf(*scores), positions: buf(*positions), selected: buf(*selected), shape: *shape },
            _ => return Err(not_yet(op)),
        };
        kernel.check_aliasing()?;
        out.push(kernel);
        Ok(())
    }

    /// The step's values live in the plan's buffers the ops read; only the count is kept.
    fn begin_step(&mut self, _step: StepValues) -> Result<()> {
        self.work.counts[1] += 1;
        Ok(())
    }

    fn record(&mut self, ops: &[Kernel], n: u32) -> Result<()> {
        for op in ops {
            let started = self.profile.as_ref().map(|_| std::time::Instant::now());
            op.run(&mut self.buffers, n as usize, self.simd, self.math);
            if let (Some(profile), Some(started)) = (self.profile.as_mut(), started) {
                let entry = profile.entry(op.label(n as usize)).or_default();
                entry.0 += 1;
                entry.1 += started.elapsed().as_secs_f64();
            }
        }
        self.work.counts[0] += ops.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    fn read(&mut self, parts: &[(&CpuBuffer, usize)]) -> Result<&[u8]> {
        self.readback.clear();
        for (b, bytes) in parts {
            let words = &self.buffers[Self::index(b)];
            self.readback.extend_from_slice(&bytemuck::cast_slice::<u32, u8>(words)[..*bytes]);
        }
        Ok(&self.readback)
    }

    fn work(&self) -> WorkCounters {
        self.work
    }

    fn profile_report(&self) -> Option<String> {
        let profile = self.profile.as_ref()?;
        let total: f64 = profile.values().map(|(_, s)| s).sum();
        let mut rows: Vec<_> = profile.iter().collect();
        rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        let lines = rows.iter().take(20).map(|(name, (calls, seconds))| format!("{:>9.3} ms {:>5.1}% {calls:>7} x  {name}", seconds * 1e3, 100.0 * seconds / total));
        Some(lines.collect::<Vec<_>>().join("\n"))
    }

    fn reset_work(&mut self) {
        self.work.reset();
    }
}
