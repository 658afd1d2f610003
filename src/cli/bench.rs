//! `dsrun bench`: prompt processing (pp) and generation (tg) speed, as llama-bench reports them.

use super::args::{DeviceArgs, ModelArgs};
use super::progress::{spinner, Bar};
use clap::Args;
use dsrun::device::GpuChoice;
use dsrun::error::Result;
use dsrun::model::Model;
use dsrun::util::Choice;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Prompt tokens processed in one call (0 skips the test). As in llama-bench, -p is a
    /// length here; generation's -p is the prompt text (as in llama-cli).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512, value_parser = parse_prompt_length)]
    pub prompt: usize,
    /// Tokens generated one by one (0 skips the test).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    pub generate: usize,
    /// Sequences decoded together for batched generation tests, comma-separated (1: the plain
    /// tg test); e.g. 1,4,8 reports tg128, tg128x4 and tg128x8 as aggregate tok/s.
    #[arg(long, value_delimiter = ',', default_value = "1", value_parser = clap::value_parser!(u64).range(1..=256))]
    pub parallel: Vec<u64>,
    /// Tokens already in the cache when each test starts (llama-bench's -d); filling is not timed.
    #[arg(short = 'd', long = "depth", default_value_t = 0, value_name = "N")]
    pub depth: usize,
    /// Repetitions of each test.
    #[arg(short = 'r', long = "repetitions", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    pub repetitions: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn parse_prompt_length(s: &str) -> std::result::Result<usize, String> {
    s.parse::<usize>().map_err(|_| format!("`{s}`: bench's -p is the prompt length in tokens, as in llama-bench (text prompts are for `dsrun -p TEXT`)"))
}

pub fn run(args: BenchArgs) -> Result<()> {
    let dir = args.model.dir();
    let capacity = args.depth + args.prompt.max(args.generate).max(9);
    let parallel: Vec<usize> = args.parallel.iter().map(|&p| p as usize).collect();
    let sequences = parallel.iter().copied().max().unwrap_or(1);
    let load = Bar::new();
    let builder = args.device.builder(&dir)?.context(Some(capacity)).sequences(sequences).progress(&load);
    let model = builder.model()?;
    let params = dsrun::inspect::count_params(&model.config, &model.weights).total;
    let weights = weight_dtypes(&model);
    let options = builder.resolved_options(&model)?;
    let active = dsrun::inspect::active_weight_bytes(&model.config, &model.weights, options.quant);
    let prefill_flops = dsrun::inspect::prompt_matmul_flops(&model.config, &model.weights);
    let mut engine = builder.build_from(model)?.engine;
    let draft = args.device.draft(engine.as_ref());
    let plan = dsrun::bench::BenchPlan { prompt: args.prompt, generate: args.generate, repetitions: args.repetitions as usize, parallel, depth: args.depth, draft };
    let bar = spinner("{spinner} bench: {msg} ({elapsed})");
    let results = dsrun::bench::run(engine.as_mut(), &plan, &mut |test| bar.set_message(format!("{test} x {} repetitions", args.repetitions)))?;
    bar.finish_and_clear();
    let setup = dsrun::bench::BenchSetup {
        model: dir.display().to_string(),
        params,
        weights,
        device: engine.device_name(),
        quant: args.device.quant.name().into(),
        gpu_mem: args.device.gpu_mem.to_string(),
        kv_cache: options.kv_cache.name().into(),
        counters: engine.counters(),
    };
    if args.json {
        super::print(&format!("{}\n", dsrun::bench::json(&setup, &results)))
    } else {
        let mut out = dsrun::bench::table(&setup, &results);
        // On the CPU backend decode streams each weight byte once a token: its rate against the
        // host's measured read bandwidth.
        if dsrun::device::resolve(args.device.gpu, &options) == GpuChoice::Cpu {
            let bandwidth = dsrun::backend::cpu::read_bandwidth();
            for r in results.iter().filter(|r| r.name.starts_with("tg") && !r.name.contains(' ') && !r.name.contains('x')) {
                let rate = r.mean() * active as f64;
                out += &format!(
                    "{}: {:.1} GB/s of weights ({} a token), {:.0}% of the host's measured read bandwidth ({:.1} GB/s)\n",
                    r.name,
                    rate / 1e9,
                    dsrun::util::human_bytes(active),
                    100.0 * rate / bandwidth,
                    bandwidth / 1e9
                );
            }
            // Prefill is compute-bound: its matmuls' rate against the cores' measured peak of
            // the instruction they multiply with (the FMA, or bf16 dots under --math fast).
            let (peak, what) = dsrun::backend::cpu::prefill_peak(options.math);
            for r in results.iter().filter(|r| r.name.starts_with("pp") && !r.name.contains(' ')) {
                let rate = r.mean() * prefill_flops as f64;
                out += &format!(
                    "{}: {:.1} GFLOP/s in matmuls ({:.0} MFLOP a token), {:.0}% of the cores' measured {what} peak ({:.1} GFLOP/s)\n",
                    r.name,
                    rate / 1e9,
                    prefill_flops as f64 / 1e6,
                    100.0 * rate / peak,
                    peak / 1e9
                );
            }
        }
        super::print(&out)
    }
}

/// The checkpoint's weight dtypes, most bytes first ("F8_E4M3 + BF16").
fn weight_dtypes(model: &Model) -> String {
    let w = &model.weights;
    let mut seen: Vec<String> = Vec::new();
    let mut note = |m: &dsrun::model::weights::Matrix| {
        let name = m.dtype.name().to_string();
        if !seen.contains(&name) {
            seen.push(name);
        }
    };
    for layer in &w.layers {
        if let dsrun::model::weights::FeedForward::Moe(moe) = &layer.ffn {
            moe.experts[0].matrices().into_iter().for_each(&mut note);
        }
        note(&layer.attention.o);
    }
    note(&w.embed);
    seen.join(" + ")
}
