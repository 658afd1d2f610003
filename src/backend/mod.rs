//! Compute backends. `cpu` is the f32 reference every other backend is tested against.

pub mod cpu;
pub mod layout;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod wgpu;
