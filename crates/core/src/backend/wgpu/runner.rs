//! Runs single dispatches outside a model: for kernel tests against the CPU reference and for
//! kernel benchmarks.

use super::backend::WgpuBackend;
use super::context::GpuContext;
use super::lower::{Builder, Dispatch};
use super::tensors::{storage, storage_init};
use crate::backend::{Backend, StepValues};
use crate::error::Result;
use std::time::Instant;

pub struct OpRunner {
    pub backend: WgpuBackend,
}

impl OpRunner {
    pub fn new(ctx: GpuContext) -> Result<OpRunner> {
        Ok(OpRunner { backend: WgpuBackend::new(ctx)? })
    }

    pub fn ctx(&self) -> &GpuContext {
        self.backend.ctx()
    }

    pub fn builder(&self) -> &Builder {
        &self.backend.builder
    }

    pub fn f32_buffer(&self, data: &[f32]) -> wgpu::Buffer {
        storage_init(self.ctx(), "input", bytemuck::cast_slice(data))
    }

    pub fn u32_buffer(&self, data: &[u32]) -> wgpu::Buffer {
        storage_init(self.ctx(), "input", bytemuck::cast_slice(data))
    }

    pub fn zeros(&self, elements: usize) -> Result<wgpu::Buffer> {
        storage(self.ctx(), "output", elements)
    }

    pub fn set_step(&mut self, n_tokens: u32) {
        // Writing a uniform cannot fail on wgpu (errors surface at submit).
        let _ = self.backend.begin_step(StepValues::new(n_tokens));
    }

    /// Records `reps` copies of the dispatches (one op, possibly over several weight chunks) for an
    /// `n_tokens` step, submits once and waits.
    pub fn run(&mut self, ops: &[Dispatch], n_tokens: u32, reps: usize) -> Result<()> {
        for _ in 0..reps {
            self.backend.record(ops, n_tokens)?;
        }
        self.backend.read(&[]).map(|_| ())
    }

    /// Seconds per dispatch: one warm-up run (compiles on lazy drivers), then `reps` in one submit.
    pub fn time(&mut self, ops: &[Dispatch], n_tokens: u32, reps: usize) -> Result<f64> {
        self.run(ops, n_tokens, 1)?;
        let started = Instant::now();
        self.run(ops, n_tokens, reps)?;
        Ok(started.elapsed().as_secs_f64() / reps as f64)
    }

    pub fn read_f32(&mut self, buffer: &wgpu::Buffer, elements: usize) -> Result<Vec<f32>> {
        Ok(bytemuck::pod_collect_to_vec(self.backend.read(&[(buffer, elements * 4)])?))
    }

    pub fn read_u32(&mut self, buffer: &wgpu::Buffer, elements: usize) -> Result<Vec<u32>> {
        Ok(bytemuck::pod_collect_to_vec(self.backend.read(&[(buffer, elements * 4)])?))
    }
}
