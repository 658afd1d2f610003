//! The wgpu backend: WGSL kernels on Vulkan, Metal, DX12 or GL (and software adapters in CI).
//! `context` opens the device, `kernels` compiles pipelines, `lower` makes each op's dispatches,
//! `tensors` and `pools` hold weights and expert slots, `backend` records and submits steps.

pub mod backend;
pub mod context;
pub mod kernels;
pub mod lower;
pub mod pools;
pub mod runner;
pub mod tensors;

pub use backend::WgpuBackend;
pub use context::GpuContext;
