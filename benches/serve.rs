//! The server under load, over real HTTP on 127.0.0.1: for 1, 4 and 8 concurrent streaming
//! completions (greedy, `ignore_eos`, `-n` tokens each, prompts of `-p` tokens), the
//! aggregate decode rate, time to first token, and that nothing was lost (every request
//! finished with exactly `-n` tokens):
//!
//!   cargo bench --bench serve -- MODEL_DIR [--gpu auto|cpu|vulkan|...] [-p 32] [-n 32] [--parallel 1,4,8]

use clap::Parser;
use dsrun::device::{open_engine, GpuChoice};
use dsrun::model::Model;
use dsrun::plan::budget::GpuOptions;
use dsrun::server::{App, ServerOptions};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    model: std::path::PathBuf,
    #[arg(long, default_value = "auto")]
    gpu: GpuChoice,
    #[arg(short = 'p', default_value_t = 32)]
    prompt: usize,
    #[arg(short = 'n', default_value_t = 32)]
    n: usize,
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    parallel: Vec<usize>,
    /// cargo passes --bench to bench targets.
    #[arg(long, hide = true)]
    bench: bool,
}

/// One streamed request: seconds to its first token, seconds to its end, completion tokens.
async fn request(client: &reqwest::Client, url: &str, prompt: &[u32], n: usize) -> (f64, f64, u64) {
    let started = Instant::now();
    let body = json!({"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
    let response = client.post(url).json(&body).send().await.expect("request");
    assert_eq!(response.status().as_u16(), 200);
    let (mut first, mut tokens, mut buffer) = (None, 0, String::new());
    let mut bytes = response.bytes_stream();
    while let Some(chunk) = bytes.next().await {
        buffer += std::str::from_utf8(&chunk.expect("body")).expect("UTF-8");
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else { continue };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).expect("a JSON chunk");
            if first.is_none() && v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()) {
                first = Some(started.elapsed().as_secs_f64());
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = n;
            }
        }
    }
    (first.unwrap_or(f64::NAN), started.elapsed().as_secs_f64(), tokens)
}

fn main() {
    let args = Args::parse();
    let model = Model::load(&args.model).unwrap_or_else(|e| panic!("{e}"));
    let vocab = model.config.vocab_size;
    let most = args.parallel.iter().copied().max().unwrap_or(1);
    let options = GpuOptions { sequences: most, ..Default::default() };
    let engine = open_engine(args.gpu, model, args.prompt + args.n + 1, &options).unwrap_or_else(|e| panic!("{e}"));
    let device = engine.device_name();
    let config = dsrun::config::ModelConfig::from_file(&args.model.join("config.json")).unwrap();
    let tokenizer = dsrun::tokenizer::Tokenizer::load(&args.model, &config).unwrap_or_else(|e| panic!("{e}"));
    let options = ServerOptions { model_name: "bench".into(), api_key: None, body_limit: 1 << 20, queue: 64, sampling: Default::default() };
    let app = Arc::new(App::new(engine, tokenizer, None, options));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1/completions", listener.local_addr().unwrap());
        tokio::spawn(dsrun::server::serve(listener, app, std::future::pending()));
        let client = reqwest::Client::new();
        println!("{} on {device}; prompts of {} tokens, {} generated each", args.model.display(), args.prompt, args.n);
        println!("{:>9} {:>14} {:>12} {:>12} {:>10}", "parallel", "aggregate t/s", "ttft mean", "ttft max", "complete");
        // Warm-up (pipelines compile on first use).
        request(&client, &url, &dsrun::bench::prompt_tokens(4, vocab), 2).await;
        for &p in &args.parallel {
            let started = Instant::now();
            let tasks: Vec<_> = (0..p)
                .map(|i| {
                    let (client, url) = (client.clone(), url.clone());
                    let prompt: Vec<u32> = dsrun::bench::prompt_tokens(args.prompt + i, vocab)[i..].to_vec();
                    tokio::spawn(async move { request(&client, &url, &prompt, args.n).await })
                })
                .collect();
            let mut results = Vec::new();
            for t in tasks {
                results.push(t.await.unwrap());
            }
            let wall = started.elapsed().as_secs_f64();
            let complete = results.iter().filter(|r| r.2 == args.n as u64).count();
            let ttft: Vec<f64> = results.iter().map(|r| r.0).collect();
            println!(
                "{p:>9} {:>14.2} {:>10.0}ms {:>10.0}ms {:>7}/{p}",
                (p * args.n) as f64 / wall,
                1e3 * ttft.iter().sum::<f64>() / p as f64,
                1e3 * ttft.iter().copied().fold(0.0, f64::max),
                complete
            );
        }
    });
}
