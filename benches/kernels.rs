//! Kernel benchmarks on the default adapter (`cargo bench --bench kernels`; `WGPU_ADAPTER_NAME`
//! picks another). Each figure is effective bandwidth (weight bytes read per second) and its
//! fraction of a plain streaming-read kernel measured on the same adapter in the same run.

mod common;
use common::values;
use dsrun::backend::wgpu::kernels::Kernel;
use dsrun::backend::wgpu::lower::MlaShape;
use dsrun::backend::wgpu::runner::OpRunner;
use dsrun::backend::wgpu::{context, tensors::GpuMatrix};
use dsrun::config::{ScoringFunc, TopkMethod};
use dsrun::device::GpuChoice;
use dsrun::model::router::RouterParams;
use dsrun::model::weights::Matrix;
use dsrun::quant::DType;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let ctx = context::open(GpuChoice::Auto).expect("a GPU adapter");
    println!("adapter: {} ({})", ctx.describe(), ctx.features_in_use());
    let mut r = OpRunner::new(ctx).unwrap();
    let reps = if quick { 3 } else { 10 };

    // Bandwidth reference: stream 64 MiB.
    let words = 16 << 20;
    let src = r.u32_buffer(&vec![1u32; words]);
    let lanes = 64 * 1024;
    let sums = r.zeros(lanes).unwrap();
    let p = r.builder().params("stream", &[words as u32, 0, 0, 0]);
    let d = r.builder().dispatch(Kernel::StreamRead, None, &[&p, &src, &sums], dsrun::backend::Grid::fixed([1024, 1, 1]));
    let seconds = r.time(&[d], 1, reps).unwrap();
    let stream = (words * 4) as f64 / seconds / 1e9;
    println!("stream read 64 MiB: {stream:.2} GB/s (reference)");
    println!("{:<34} {:>10} {:>9} {:>8}", "kernel", "time", "GB/s", "of ref");

    let (rows, cols) = if quick { (1024, 2048) } else { (4096, 4096) };
    let w = values(rows * cols);
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::F8E4M3, DType::Q8, DType::Q4] {
        let m = Matrix::from_values("bench", rows, cols, dtype, &w, (128, 128));
        let gm = GpuMatrix::upload(r.ctx(), &[&m]).unwrap();
        for n in [1usize, 16, 256] {
            let x = r.f32_buffer(&values(n * cols));
            let y = r.zeros(n * rows).unwrap();
            let d = r.builder().matmul(&gm, &x, &y, false);
            r.set_step(n as u32);
            let t = r.time(&d, n as u32, reps).unwrap();
            let gbs = gm.bytes as f64 / t / 1e9;
            // Prefill-sized steps name the kernel the adapter's defaults chose.
            let what = match n {
                1 => "mat-vec (decode)".to_string(),
                _ if d[0].kernel == Kernel::Gemm => format!("GEMM {n} tokens"),
                _ => format!("matmul {n} tokens"),
            };
            println!("{:<34} {:>8.3}ms {:>9.2} {:>7.0}%   {:.2} GFLOP/s", format!("{what} {dtype:?} {rows}x{cols}"), t * 1e3, gbs, 100.0 * gbs / stream, 2.0 * (rows * cols * n) as f64 / t / 1e9);
        }
    }

    // DeepSeek-V3's router: 256 experts in 8 groups, keep 4 groups, 8 experts per token.
    let p = RouterParams { scoring: ScoringFunc::Sigmoid, method: TopkMethod::NoauxTc, n_group: 8, topk_group: 4, top_k: 8, normalize: true, scaling: 2.5 };
    for n in [1usize, 64] {
        let logits = r.f32_buffer(&values(n * 256));
        let bias = r.f32_buffer(&values(256));
        let (ids, wts) = (r.zeros(n * 8).unwrap(), r.zeros(n * 8).unwrap());
        let d = r.builder().router(&p, 256, &logits, Some(&bias), &ids, &wts, false);
        r.set_step(n as u32);
        let t = r.time(&[d], n as u32, reps).unwrap();
        println!("{:<34} {:>8.3}ms", format!("router V3 shape, {n} tokens"), t * 1e3);
    }

    // MLA decode attention at DeepSeek-V3's shape (128 heads, latent 512 + rope 64) over a
    // latent cache of L tokens in f32 and f16: one token attends to all L. The bound is the cache
    // read once (L x 576 values in the cache's format).
    use dsrun::plan::layout::CacheFormat;
    let (heads, lora, rope, nope) = (if quick { 16 } else { 128 }, 512usize, 64usize, 128usize);
    let qk = nope + rope;
    for cache_format in [CacheFormat::F32, CacheFormat::F16] {
        let value_bytes = if cache_format == CacheFormat::F32 { 4 } else { 2 };
        for len in if quick { vec![1024usize] } else { vec![1024, 4096, 32768] } {
            let cache = r.u32_buffer(&vec![0x3c003c00u32; len * (lora + rope) * value_bytes / 4]);
            let q = r.f32_buffer(&values(heads * qk));
            let q_lat = r.f32_buffer(&values(heads * lora));
            let max_binding = r.ctx().max_binding();
            let o_lat = r.zeros(heads * lora).unwrap();
            let scale = 1.0f32 / (qk as f32).sqrt();
            let shape = MlaShape { heads, nope, rope, v: 128, lora, ctx: len, scale, rope_scale: 1.0, cache: cache_format };
            let scores = r.zeros(dsrun::backend::wgpu::lower::Builder::attention_scratch(&shape, 1, max_binding)).unwrap();
            // One token at the cache's last position, in sequence 0's rows.
            let positions = r.u32_buffer(&[len as u32 - 1, 0]);
            let d = r.builder().mla_attention(&shape, [&q, &q_lat, &positions, &cache, &scores, &o_lat], None);
            r.set_step(1);
            let t = r.time(&d, 1, if len > 1024 { 1 } else { reps }).unwrap();
            let gbs = (len * (lora + rope) * value_bytes) as f64 / t / 1e9;
            println!("{:<34} {:>8.3}ms {:>9.2} {:>7.0}%", format!("MLA decode {cache_format:?}, {heads} heads, {}k ctx", len / 1024), t * 1e3, gbs, 100.0 * gbs / stream);
        }
    }
}
