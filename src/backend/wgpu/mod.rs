//! The wgpu backend: WGSL kernels on Vulkan, Metal, DX12 or GL (and software adapters in CI).

pub mod context;
pub mod kernels;
pub mod lower;
pub mod model;
pub mod runner;
pub mod streaming;
pub mod tensors;

pub use context::GpuContext;
pub use model::GpuModel;
