//! Which compute device a command runs on (`--gpu`).

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GpuChoice {
    /// The best available device (the CPU until the GPU backends land).
    Auto,
    Cpu,
    Vulkan,
    Metal,
    Dx12,
    Gl,
    Cuda,
}

/// A device a model can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
}

impl Device {
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu (f32 reference)",
        }
    }
}

pub fn select(choice: GpuChoice) -> Result<Device> {
    match choice {
        GpuChoice::Auto => {
            log::info!("no GPU backend is built into this version yet; running on the CPU");
            Ok(Device::Cpu)
        }
        GpuChoice::Cpu => Ok(Device::Cpu),
        GpuChoice::Vulkan | GpuChoice::Metal | GpuChoice::Dx12 | GpuChoice::Gl => Err(Error::Invalid(format!(
            "--gpu {}: the wgpu GPU backend is not built yet in this version of dsrun; use --gpu cpu (or auto)",
            clap::ValueEnum::to_possible_value(&choice).unwrap().get_name()
        ))),
        GpuChoice::Cuda => Err(Error::Invalid(
            "--gpu cuda: the CUDA backend is not built yet in this version of dsrun; use --gpu cpu (or auto)".into(),
        )),
    }
}
