//! Runs single dispatches outside a model: for kernel tests against the CPU reference and for
//! kernel benchmarks.

use super::context::GpuContext;
use super::kernels::Pipelines;
use super::lower::{Builder, Dispatch, StepUniform};
use super::tensors::{storage, storage_init, uniform};
use crate::error::{Error, Result};
use std::time::Instant;

pub struct OpRunner {
    pub builder: Builder,
}

impl OpRunner {
    pub fn new(ctx: GpuContext) -> Result<OpRunner> {
        let step = uniform(&ctx, "step", &[0u8; 16]);
        let dummy = storage(&ctx, "dummy", 4)?;
        let pipelines = Pipelines::new(&ctx.device, ctx.subgroups);
        Ok(OpRunner { builder: Builder { ctx, pipelines, step, dummy } })
    }

    pub fn ctx(&self) -> &GpuContext {
        &self.builder.ctx
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

    pub fn set_step(&self, n_tokens: u32, start: u32) {
        let step = StepUniform { n_tokens, start, logits_row0: n_tokens - 1, _pad: 0 };
        self.ctx().queue.write_buffer(&self.builder.step, 0, bytemuck::bytes_of(&step));
    }

    /// Records `reps` copies of the dispatches (one op, possibly over several weight chunks) for an
    /// `n_tokens` step, submits once and waits.
    pub fn run(&self, ops: &[Dispatch], n_tokens: u32, reps: usize) -> Result<()> {
        let mut encoder = self.ctx().device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            for _ in 0..reps {
                ops.iter().for_each(|d| d.record(&mut pass, n_tokens));
            }
        }
        self.ctx().queue.submit([encoder.finish()]);
        self.wait()
    }

    fn wait(&self) -> Result<()> {
        self.ctx()
            .device
            .poll(wgpu::PollType::Wait { submission_index: None, timeout: None })
            .map(|_| ())
            .map_err(|e| Error::Invalid(format!("GPU: waiting failed: {e}")))
    }

    /// Seconds per dispatch: one warm-up run (compiles on lazy drivers), then `reps` in one submit.
    pub fn time(&self, ops: &[Dispatch], n_tokens: u32, reps: usize) -> Result<f64> {
        self.run(ops, n_tokens, 1)?;
        let started = Instant::now();
        self.run(ops, n_tokens, reps)?;
        Ok(started.elapsed().as_secs_f64() / reps as f64)
    }

    pub fn read_f32(&self, buffer: &wgpu::Buffer, elements: usize) -> Result<Vec<f32>> {
        Ok(bytemuck::pod_collect_to_vec(&self.read(buffer, elements * 4)?))
    }

    pub fn read_u32(&self, buffer: &wgpu::Buffer, elements: usize) -> Result<Vec<u32>> {
        Ok(bytemuck::pod_collect_to_vec(&self.read(buffer, elements * 4)?))
    }

    fn read(&self, buffer: &wgpu::Buffer, bytes: usize) -> Result<Vec<u8>> {
        let staging = self.ctx().device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self.ctx().device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, bytes as u64);
        self.ctx().queue.submit([encoder.finish()]);
        let slice = staging.slice(..);
        slice.map_async(wgpu::MapMode::Read, |_| {});
        self.wait()?;
        let out = slice.get_mapped_range().map_err(|e| Error::Invalid(format!("GPU: readback failed: {e}")))?.to_vec();
        Ok(out)
    }
}
