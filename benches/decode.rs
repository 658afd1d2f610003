//! Decode and prefill speed of a checkpoint on one backend, fed token ids (no tokenizer needed):
//!
//!   cargo bench --bench decode -- MODEL_DIR [--gpu auto|cpu|vulkan|...] [-p 64] [-n 32]
//!
//! Reports tok/s and the bound that decode is held to: active weight bytes per token divided by
//! the adapter's streaming-read bandwidth (`cargo bench --bench kernels` measures it).

use clap::Parser;
use dsrun::device::{open_engine, GpuChoice};
use dsrun::engine::Steps;
use dsrun::inspect::active_weight_bytes;
use dsrun::model::{Logits, Model};
use dsrun::util::human_bytes;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    model: std::path::PathBuf,
    #[arg(long, default_value = "auto")]
    gpu: GpuChoice,
    #[arg(long, default_value = "keep")]
    quant: dsrun::quant::QuantTarget,
    /// GPU memory budget (as dsrun's --gpu-mem: auto, bytes, or N% of routed experts).
    #[arg(long, default_value = "auto")]
    gpu_mem: dsrun::plan::budget::GpuMem,
    #[arg(long, default_value = "lru")]
    eviction: dsrun::plan::budget::Eviction,
    #[arg(long, default_value = "auto")]
    prefetch: dsrun::plan::budget::Prefetch,
    /// Routed experts of the first N MoE layers on the CPU (as dsrun's --n-cpu-moe).
    #[arg(long, default_value_t = 0)]
    n_cpu_moe: usize,
    #[arg(long, default_value = "auto")]
    expert_placement: dsrun::plan::budget::ExpertPlacement,
    /// With --gpu cpu: the CPU backend stands in for the GPU of hybrid placement, so
    /// --n-cpu-moe hands layers to a second CPU backend (the hand-over's cost, without a GPU).
    #[arg(long)]
    host_stops: bool,
    #[arg(short = 'p', default_value_t = 64)]
    prompt: usize,
    #[arg(short = 'n', default_value_t = 32)]
    n: usize,
    /// cargo passes --bench to bench targets.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let args = Args::parse();
    let model = Model::load(&args.model).unwrap_or_else(|e| panic!("{e}"));
    let active = active_weight_bytes(&model.config, &model.weights, args.quant);
    let vocab = model.config.vocab_size as u32;
    let options = dsrun::plan::budget::GpuOptions {
        quant: args.quant,
        gpu_mem: args.gpu_mem,
        eviction: args.eviction,
        prefetch: args.prefetch,
        sequences: 1,
        kv_cache: Default::default(),
        mtp: false,
        math: Default::default(),
        cpu_moe: args.n_cpu_moe,
        placement: args.expert_placement,
        prompt_uploads: Default::default(),
        expert_counts: None,
        shard: None,
    };
    let capacity = args.prompt + args.n + 1;
    let mut engine: Box<dyn dsrun::engine::Engine> = match (args.host_stops, args.gpu) {
        (true, GpuChoice::Cpu) => Box::new(dsrun::runtime::Runtime::with_options(dsrun::backend::cpu::CpuBackend::new().with_host_stops(), &model, capacity, &options).unwrap()),
        (true, _) => panic!("--host-stops goes with --gpu cpu"),
        _ => open_engine(args.gpu, model, capacity, &options).unwrap(),
    };
    println!("{} on {}", args.model.display(), engine.device_name());
    let prompt: Vec<u32> = (0..args.prompt as u32).map(|i| (i * 7919 + 11) % vocab).collect();

    // Warm-up (first dispatches compile on lazy drivers), then measure.
    engine.forward(&prompt[..4.min(prompt.len())], Logits::Last).unwrap();
    engine.forward_greedy(&[1]).unwrap();
    engine.reset();

    engine.reset_counters();
    let started = Instant::now();
    let mut next = engine.forward_greedy(&prompt).unwrap();
    let prefill = started.elapsed().as_secs_f64();
    if let Some(c) = engine.counters() {
        println!("prefill counters: {c}");
    }
    engine.reset_counters();
    let started = Instant::now();
    for _ in 0..args.n {
        next = engine.forward_greedy(&[next]).unwrap();
    }
    let decode = started.elapsed().as_secs_f64() / args.n as f64;
    println!("prefill {} tokens: {:.1} tok/s", args.prompt, args.prompt as f64 / prefill);
    println!("decode: {:.2} tok/s ({:.1} ms/token); active weights {} per token -> {:.2} GB/s effective", 1.0 / decode, decode * 1e3, human_bytes(active), active as f64 / decode / 1e9);
    if let Some(c) = engine.counters() {
        println!("decode counters: {c}");
    }
}
