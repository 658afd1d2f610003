//! Expert slot pools on wgpu: a pool's gate, up and down slots each fit one binding, and each
//! pool computes only the slots its list names, through an indirect dispatch the host sizes.

use super::context::GpuContext;
use super::lower::{listed_grid, matmul_tiles, Builder, Dispatch, Tile};
use super::tensors::{storage, SlotMatrix};
use crate::error::Result;
use crate::model::weights::Mlp;
use crate::plan::ExpertMatrix;

pub struct SlotPool {
    pub gate: SlotMatrix,
    pub up: SlotMatrix,
    pub down: SlotMatrix,
    /// (step slot, pool-local expert slot) pairs this pool computes in the current round.
    pub list: wgpu::Buffer,
    /// Indirect workgroup counts for gate/up (offset 0) and down (offset 12), sized to the list.
    pub args: wgpu::Buffer,
    /// The adapter's single-slot matmul tile, which the counts are for.
    tile: Tile,
}

impl SlotPool {
    pub fn new(ctx: &GpuContext, template: &Mlp, slots: usize, max_pairs: usize) -> Result<SlotPool> {
        Ok(SlotPool {
            gate: SlotMatrix::new(ctx, &template.gate, slots)?,
            up: SlotMatrix::new(ctx, &template.up, slots)?,
            down: SlotMatrix::new(ctx, &template.down, slots)?,
            list: storage(ctx, "expert slot list", 2 * max_pairs)?,
            args: ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("expert slot dispatch sizes"),
                size: 24,
                usage: wgpu::BufferUsages::INDIRECT | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            tile: matmul_tiles(ctx).decode,
        })
    }

    /// Queues the copies of `expert`'s matrices into `slot`; returns the bytes copied.
    pub fn write(&self, queue: &wgpu::Queue, slot: usize, expert: &Mlp) -> u64 {
        [(&self.gate, &expert.gate), (&self.up, &expert.up), (&self.down, &expert.down)].iter().map(|(gpu, host)| gpu.write(queue, slot, host)).sum()
    }

    /// The list of (step slot, pool slot) pairs to compute and the dispatch sizes that cover it.
    pub fn write_list(&self, queue: &wgpu::Queue, pairs: &[u32]) {
        let count = (pairs.len() / 2) as u32;
        if count > 0 {
            queue.write_buffer(&self.list, 0, bytemuck::cast_slice(pairs));
        }
        let gate_up = listed_grid(self.tile, self.gate.matrix.rows, count);
        let down = listed_grid(self.tile, self.down.matrix.rows, count);
        queue.write_buffer(&self.args, 0, bytemuck::cast_slice(&[gate_up, down]));
    }

    /// The listed slots' `matrix` matmul of `x` into `y` (`k` slots per token): gate and up
    /// read the token's row and take the dispatch sizes at offset 0, down the slot's own row
    /// at offset 12.
    pub fn matmul(&self, b: &Builder, matrix: ExpertMatrix, k: u32, x: &wgpu::Buffer, y: &wgpu::Buffer) -> Dispatch {
        let (slots, x_div, offset) = match matrix {
            ExpertMatrix::Gate => (&self.gate, k, 0),
            ExpertMatrix::Up => (&self.up, k, 0),
            ExpertMatrix::Down => (&self.down, 1, 12),
        };
        b.listed_expert_matmul(&slots.matrix, k, x_div, x, y, &self.list, (&self.args, offset))
    }
}
