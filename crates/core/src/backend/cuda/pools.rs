//! Expert slot pools on CUDA: one device allocation per expert matrix holds every slot (no
//! binding limit), and the listed expert matmuls take their grid from the pool's pair count.
//! Slot copies go through the device's streamed uploads (pinned staging on a copy stream).

use super::device::{Buffer, Device};
use super::ops::{CudaMatrix, Op, Ops};
use crate::error::Result;
use crate::model::weights::{Matrix, Mlp};
use crate::plan::layout::{MatmulShape, SlotLayout};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// Device room for the cache's copies of one expert matrix.
pub struct SlotStack {
    pub matrix: CudaMatrix,
    slot: SlotLayout,
}

impl SlotStack {
    fn new(rt: &Device, template: &Matrix, slots: usize) -> Result<SlotStack> {
        let slot = SlotLayout::new(template);
        let matrix = CudaMatrix {
            format: template.dtype.format().code,
            rows: template.rows,
            cols: template.cols,
            experts: slots,
            layout: rt.upload(&[slot.layout])?,
            weights: rt.alloc(slot.data_stride as usize * slots)?,
            // Per-slot scales; formats without any bind what they read there instead, once (the
            // i-quants' codebook).
            scales: match slot.scale_values {
                0 => rt.upload(&crate::plan::layout::codebook(template.dtype))?,
                n => rt.alloc(n * 4 * slots)?,
            },
            bytes: slot.slot_bytes() * slots as u64,
        };
        Ok(SlotStack { matrix, slot })
    }

    /// Queues the copy of `m` into `slot`; returns the bytes copied.
    fn write(&self, rt: &Device, slot: usize, m: &Matrix) -> Result<u64> {
        rt.upload_async(&self.matrix.weights, slot * self.slot.data_stride as usize, &self.slot.padded(m))?;
        let mut bytes = m.data.as_slice().len() as u64;
        if let Some(s) = &m.scales {
            rt.upload_async(&self.matrix.scales, slot * self.slot.scale_values * 4, bytemuck::cast_slice(&s.values))?;
            bytes += s.values.len() as u64 * 4;
        }
        Ok(bytes)
    }
}

pub struct CudaPool {
    pub gate: SlotStack,
    pub up: SlotStack,
    pub down: SlotStack,
    /// (step slot, pool slot) pairs the current round computes.
    list: Buffer,
    /// How many: the listed matmuls' grid.
    pairs: Arc<AtomicU32>,
}

impl CudaPool {
    pub fn new(rt: &Device, template: &Mlp, slots: usize, max_pairs: usize) -> Result<CudaPool> {
        Ok(CudaPool {
            gate: SlotStack::new(rt, &template.gate, slots)?,
            up: SlotStack::new(rt, &template.up, slots)?,
            down: SlotStack::new(rt, &template.down, slots)?,
            list: rt.alloc(2 * max_pairs * 4)?,
            pairs: Arc::new(AtomicU32::new(0)),
        })
    }

    /// Queues the copies of `expert`'s matrices into `slot`; returns the bytes copied.
    pub fn write(&self, rt: &Device, slot: usize, expert: &Mlp) -> Result<u64> {
        let mut bytes = 0;
        for (stack, m) in [(&self.gate, &expert.gate), (&self.up, &expert.up), (&self.down, &expert.down)] {
            bytes += stack.write(rt, slot, m)?;
        }
        Ok(bytes)
    }

    /// Queues the list of (step slot, pool slot) pairs the pool's ops compute next.
    pub fn write_list(&self, rt: &Device, pairs: &[u32]) -> Result<()> {
        rt.upload_async(&self.list, 0, bytemuck::cast_slice(pairs))?;
        self.pairs.store((pairs.len() / 2) as u32, Ordering::Relaxed);
        Ok(())
    }

    /// A listed matmul of one of the pool's matrices: `x_div = k` for gate/up (the token's row),
    /// 1 for down (the slot's own).
    pub fn listed(&self, ops: &Ops, m: &SlotStack, k: u32, x_div: u32, x: &Buffer, y: &Buffer) -> Result<Op> {
        let shape = MatmulShape { slots_per_token: k, x_div, use_ids: true, fixed_slots: None, slot_list: true, accumulate: false };
        let mut op = ops.matmul_shaped(&m.matrix, shape, x, y, Some(&self.list))?;
        op.pairs = Some(self.pairs.clone());
        Ok(op)
    }
}
