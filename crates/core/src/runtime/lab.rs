//! Plan ops on a backend outside a model: buffers and weights made by hand, ops lowered and
//! run one step at a time. For tests of an op's lowering against the CPU reference.

use crate::backend::{Backend, IntoBackend, Resources, StepValues};
use crate::error::Result;
use crate::model::weights::Matrix;
use crate::plan::{BufferId, Op, WeightId};

pub struct Lab<B: Backend> {
    pub backend: B,
    pub res: Resources<B>,
}

impl<B: Backend> Lab<B> {
    pub fn new(device: impl IntoBackend<B>) -> Result<Self> {
        Ok(Lab { backend: device.into_backend()?, res: Resources::default() })
    }

    /// A buffer holding `values`.
    pub fn input(&mut self, values: &[f32]) -> Result<BufferId> {
        let b = self.backend.upload("input", values)?;
        self.res.buffers.push(b);
        Ok(BufferId(self.res.buffers.len() - 1))
    }

    /// `words` zeroed words.
    pub fn zeros(&mut self, words: usize) -> Result<BufferId> {
        let b = self.backend.alloc("output", words)?;
        self.res.buffers.push(b);
        Ok(BufferId(self.res.buffers.len() - 1))
    }

    /// One matrix or a stack of experts, as the plan would upload it.
    pub fn matrix(&mut self, stack: &[&Matrix], chunked: bool) -> Result<WeightId> {
        let m = self.backend.upload_matrix(stack, chunked)?;
        self.res.weights.push(m);
        Ok(WeightId(self.res.weights.len() - 1))
    }

    pub fn write(&mut self, id: BufferId, values: &[f32]) -> Result<()> {
        self.backend.write(self.res.buf(id), bytemuck::cast_slice(values))
    }

    pub fn write_u32(&mut self, id: BufferId, values: &[u32]) -> Result<()> {
        self.backend.write(self.res.buf(id), bytemuck::cast_slice(values))
    }

    pub fn lower(&mut self, ops: &[Op]) -> Result<Vec<B::Op>> {
        let mut out = Vec::new();
        for op in ops {
            self.backend.lower(op, &self.res, &mut out)?;
        }
        Ok(out)
    }

    /// Runs lowered ops as a step of `n` tokens and waits for them (ops that need the tokens'
    /// positions read them from the buffer the test wrote).
    pub fn run(&mut self, ops: &[B::Op], n: u32) -> Result<()> {
        self.backend.begin_step(StepValues::new(n))?;
        self.backend.record(ops, n)?;
        self.backend.read(&[]).map(|_| ())
    }

    pub fn read_f32(&mut self, id: BufferId, words: usize) -> Result<Vec<f32>> {
        Ok(bytemuck::pod_collect_to_vec(self.read_bytes(id, words)?))
    }

    pub fn read_u32(&mut self, id: BufferId, words: usize) -> Result<Vec<u32>> {
        Ok(bytemuck::pod_collect_to_vec(self.read_bytes(id, words)?))
    }

    /// The backend's limits for `config` (and what it makes with them: expert grouping).
    pub fn target(&mut self, config: &crate::config::ModelConfig, capacity: usize) -> Result<crate::plan::Target> {
        self.backend.target(config, capacity)
    }

    fn read_bytes(&mut self, id: BufferId, words: usize) -> Result<&[u8]> {
        self.backend.read(&[(self.res.buf(id), words * 4)])
    }
}
