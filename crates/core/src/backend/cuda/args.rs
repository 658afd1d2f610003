//! What CUDA kernels take: device allocations (an address and a size, on the GPU or in the
//! emulator's host memory alike) and launch arguments.

/// A device allocation: an address the kernels take, and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    pub ptr: u64,
    pub bytes: usize,
}

/// A kernel argument as the kernel's signature takes it.
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    Buf(Buffer),
    U32(u32),
    F32(f32),
}

impl From<Buffer> for Arg {
    fn from(b: Buffer) -> Arg {
        Arg::Buf(b)
    }
}
impl From<&Buffer> for Arg {
    fn from(b: &Buffer) -> Arg {
        Arg::Buf(*b)
    }
}
impl From<u32> for Arg {
    fn from(v: u32) -> Arg {
        Arg::U32(v)
    }
}
impl From<f32> for Arg {
    fn from(v: f32) -> Arg {
        Arg::F32(v)
    }
}
