//! The wgpu backend: WGSL kernels on Vulkan, Metal, DX12 or GL (and software adapters in CI).
//! `context` opens the device, `kernels` compiles pipelines, `lower` makes each op's dispatches,
//! `tensors` and `pools` hold weights and expert slots, `backend` records and submits steps.

mod backend;
pub mod context;
internal_mod!(kernels);
internal_mod!(lower);
internal_mod!(pools);
internal_mod!(runner);
internal_mod!(tensors);

pub use backend::WgpuBackend;
pub use context::GpuContext;
