//! `dsrun devices`: the GPU adapters wgpu can use (and the CUDA device in a `cuda` build), and
//! the CPU backend's host.

use dsrun::error::Result;

pub fn run() -> Result<()> {
    let adapters = dsrun::backend::wgpu::context::describe_adapters();
    let mut out = dsrun::backend::cpu::describe_host() + "\n";
    if adapters.is_empty() {
        out += "no GPU adapters found (dsrun runs on the CPU with --gpu cpu)\n";
    }
    for line in adapters {
        out += &line;
        out += "\n";
    }
    #[cfg(feature = "cuda")]
    match dsrun::backend::cuda::open(0) {
        Ok(rt) => out += &format!("cuda: {}, {} (--gpu cuda)\n", rt.describe(), rt.memory().map_or("memory unknown".into(), dsrun::util::human_bytes)),
        Err(e) => out += &format!("cuda: none ({e})\n"),
    }
    #[cfg(feature = "cuda")]
    match dsrun::runtime::comm::load_nccl() {
        Ok(version) => out += &format!("nccl: {version} (a multi-process job of CUDA devices all-reduces through it)\n"),
        Err(e) => out += &format!("nccl: none ({e})\n"),
    }
    super::print(&out)
}
