//! CUDA kernel benchmarks (`cargo bench --features cuda --bench cuda_kernels [-- --quick]`) on
//! CUDA device 0. Each figure is effective bandwidth (bytes the kernel must read, per second)
//! and its fraction of a streaming-read kernel measured on the same device in the same run; the
//! copy kernel's figure (read + write) is printed beside it. Without a device: NOT RUN.
//! `--emulator` runs tiny shapes on the CPU emulator: a check that the benchmark works, not a
//! measurement.

mod common;
use common::values;
use dsrun::backend::cuda::device::Launch;
use dsrun::backend::cuda::ops::{AttentionSplit, CudaMatrix, Op, Ops};
use dsrun::backend::cuda::{self, sources, Arg, Device};
use dsrun::model::weights::Matrix;
use dsrun::plan::layout::MlaShape;
use dsrun::quant::DType;
use std::sync::Arc;
use std::time::Instant;

/// Seconds per run of `launches` (mean of `reps` after a warm-up).
fn time(rt: &Device, launches: &[Launch], reps: usize) -> f64 {
    let run = || launches.iter().for_each(|l| rt.launch(l).unwrap());
    run();
    rt.synchronize().unwrap();
    let started = Instant::now();
    for _ in 0..reps {
        run();
    }
    rt.synchronize().unwrap();
    started.elapsed().as_secs_f64() / reps as f64
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let emulated = std::env::args().any(|a| a == "--emulator");
    let opened = if emulated { Device::emulator() } else { cuda::open(0) };
    let rt = match opened {
        Ok(rt) => Arc::new(rt),
        Err(e) => {
            println!("NOT RUN: {e}");
            return;
        }
    };
    // Sizes: (stream bytes, matrix rows, matrix cols, attention contexts).
    let (stream_bytes, rows, cols, contexts) = match (emulated, quick) {
        (true, _) => (1usize << 20, 64, 256, [512usize, 1024]),
        (false, true) => (1 << 30, 4096, 7168, [4096, 32768]),
        (false, false) => (1 << 30, 18432, 7168, [4096, 32768]),
    };
    println!("device: {}", rt.describe());
    let reps = if quick || emulated { 3 } else { 20 };
    let ops = Ops::new(rt.clone()).unwrap();

    let words = stream_bytes / 16;
    let src = rt.alloc(words * 16).unwrap();
    let dst = rt.alloc(words * 16).unwrap();
    // One partial sum per thread of the reference kernels' grid.
    let (blocks, threads) = (4 * 1024u32, 256u32);
    let sums = rt.alloc((blocks * threads) as usize * 4).unwrap();
    let kernel = |name| ops.kernel(sources::STREAM, &[], name).unwrap();
    let read = Launch { kernel: kernel("stream_read"), grid: [blocks, 1, 1], block: [threads, 1, 1], args: vec![Arg::Buf(src), Arg::Buf(sums), Arg::U32(words as u32)] };
    let stream = (words * 16) as f64 / time(&rt, &[read], reps) / 1e9;
    let copy = Launch { kernel: kernel("copy"), grid: [blocks, 1, 1], block: [threads, 1, 1], args: vec![Arg::Buf(src), Arg::Buf(dst), Arg::U32(words as u32)] };
    let copied = (2 * words * 16) as f64 / time(&rt, &[copy], reps) / 1e9;
    let mib = stream_bytes >> 20;
    println!("stream read {mib} MiB: {stream:.1} GB/s (reference); copy {mib} MiB: {copied:.1} GB/s (read + write)");
    println!("{:<40} {:>10} {:>9} {:>8}", "kernel", "time", "GB/s", "of ref");
    let row = |what: &str, seconds: f64, bytes: f64| {
        let gbs = bytes / seconds / 1e9;
        println!("{what:<40} {:>8.3}ms {gbs:>9.1} {:>7.0}%", seconds * 1e3, 100.0 * gbs / stream);
    };

    // A V3 dense-FFN-sized matrix (18432 x 7168), one token (decode) and 16 (a prefill tile).
    let w = values(rows * cols);
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::F8E4M3, DType::Q8, DType::Q4] {
        let m = Matrix::from_values("bench", rows, cols, dtype, &w, (128, 128));
        let gm = CudaMatrix::upload(&rt, &[&m]).unwrap();
        for n in [1u32, 16] {
            let x = rt.upload(&values(n as usize * cols)).unwrap();
            let y = rt.alloc(n as usize * rows * 4).unwrap();
            rt.write(&ops.step, 0, bytemuck::cast_slice(&[n, n - 1, 0, 0])).unwrap();
            let op: Op = ops.matmul(&gm, &x, &y, false).unwrap();
            let t = time(&rt, &[op.launch(n)], reps);
            row(&format!("{dtype:?} {rows}x{cols}, {n} token(s)"), t, gm.bytes as f64);
        }
    }

    // MLA decode at V3's shape: 128 heads, latent 512 + 64, one token over 4k and 32k cached
    // positions; bytes = the cache read once.
    let shape = |ctx| MlaShape { heads: 128, nope: 128, rope: 64, v: 128, lora: 512, ctx, scale: 0.1, rope_scale: 1.0, cache: Default::default() };
    for ctx in contexts {
        let s = shape(ctx);
        let split = AttentionSplit::new(ctx, 256);
        let latent = s.lora + s.rope;
        let q = rt.upload(&values(s.heads * (s.nope + s.rope))).unwrap();
        let q_lat = rt.upload(&values(s.heads * s.lora)).unwrap();
        let cache = rt.upload(&values(ctx * latent)).unwrap();
        let partial = rt.alloc(split.partial_floats(1, s.heads, s.lora) * 4).unwrap();
        let o_lat = rt.alloc(s.heads * s.lora * 4).unwrap();
        // One token at the last position, in sequence 0's rows.
        let positions = rt.upload(&[ctx as u32 - 1, 0u32]).unwrap();
        rt.write(&ops.step, 0, bytemuck::cast_slice(&[1u32, 0, 0, 0])).unwrap();
        let [partial_op, merge] = ops.mla_attention(&s, [&q, &q_lat, &positions, &cache, &partial, &o_lat], split, None).unwrap();
        let t = time(&rt, &[partial_op.launch(1), merge.launch(1)], reps);
        row(&format!("MLA decode, 128 heads, {ctx} positions ({} splits)", split.splits), t, (ctx * latent * 4) as f64);
    }
}
