//! The wgpu backend's whole-model logits against transformers on every fixture family (run on
//! whatever adapter wgpu finds; CI installs Mesa's lavapipe). A missing adapter fails, not skips.

mod common;
use common::*;
use dsrun::backend::wgpu::context;
use dsrun::device::GpuChoice;
use dsrun::engine::{CpuEngine, Steps};
use dsrun::model::{Logits, Model};
use dsrun::runtime::GpuModel;
use dsrun::util::Choice;

fn gpu(model: &Model, capacity: usize) -> GpuModel {
    let ctx = context::open(GpuChoice::Auto).expect("a wgpu adapter (on Debian: apt-get install mesa-vulkan-drivers)");
    GpuModel::new(ctx, model, capacity, dsrun::quant::QuantTarget::Keep).unwrap()
}

#[test]
fn gpu_prefill_matches_transformers_on_every_family() {
    for family in FAMILIES {
        let dir = fixture(family);
        let g = golden(&dir);
        let model = Model::load(&dir).unwrap();
        // Routed experts per slot and grouped by expert; CPU adapters' kernel shapes and GPUs'
        // (the tiled prefill GEMM among them).
        for (group_experts, cpu_shapes) in [(false, true), (true, true), (true, false)] {
            let mut ctx = context::open(GpuChoice::Auto).expect("a wgpu adapter");
            ctx.group_experts = group_experts;
            ctx.cpu_shapes = cpu_shapes;
            ctx.prefill_gemm = !cpu_shapes;
            let mut engine = GpuModel::new(ctx, &model, g.tokens.len(), dsrun::quant::QuantTarget::Keep).unwrap();
            let logits = engine.forward(&g.tokens, Logits::All).unwrap();
            let what = format!("{family}, grouped experts {group_experts}, CPU shapes {cpu_shapes}");
            eprintln!("{what}: GPU relative error {:e}", relative_error(&logits, &g.logits));
            assert_logits_match(&what, &logits, &g.logits, g.vocab, 1e-3);
        }
    }
}

#[test]
fn gpu_decode_matches_cpu_token_by_token() {
    for family in FAMILIES {
        let dir = fixture(family);
        let g = golden(&dir);
        let model = Model::load(&dir).unwrap();
        let mut engine = gpu(&model, g.tokens.len());
        let mut decoded = engine.forward(&g.tokens[..3], Logits::All).unwrap();
        for &t in &g.tokens[3..] {
            decoded.extend(engine.forward(&[t], Logits::Last).unwrap());
        }
        assert_eq!(engine.len(), g.tokens.len());
        assert_logits_match(&format!("{family} GPU decode"), &decoded, &g.logits, g.vocab, 1e-3);
    }
}

#[test]
fn gpu_matches_with_every_matrix_split_into_chunks() {
    for family in FAMILIES {
        let dir = fixture(family);
        let g = golden(&dir);
        let model = Model::load(&dir).unwrap();
        let mut ctx = context::open(GpuChoice::Auto).expect("a wgpu adapter");
        // Tiny chunks stand in for tensors beyond the binding limit (V3's 1.85 GB embedding).
        ctx.chunk_bytes = Some(2048);
        let mut engine = GpuModel::new(ctx, &model, g.tokens.len(), dsrun::quant::QuantTarget::Keep).unwrap();
        let logits = engine.forward(&g.tokens, Logits::All).unwrap();
        assert_logits_match(&format!("{family} chunked"), &logits, &g.logits, g.vocab, 1e-3);
    }
}

#[test]
fn gpu_greedy_reads_back_the_argmax() {
    let dir = fixture("v3_noaux");
    let g = golden(&dir);
    let model = Model::load(&dir).unwrap();
    let mut engine = gpu(&model, g.tokens.len());
    let id = engine.forward_greedy(&g.tokens).unwrap();
    let last = &g.logits[(g.tokens.len() - 1) * g.vocab..];
    assert_eq!(id as usize, argmax(last));
    assert_eq!(engine.counters.readback_bytes, 4, "greedy decode reads back only the token id");
    let mut cpu = CpuEngine::new(model, g.tokens.len());
    assert_eq!(cpu.forward_greedy(&g.tokens).unwrap(), id);
}

#[test]
fn gpu_long_context_and_chunked_prefill_match_cpu() {
    // ~200 tokens: attention spans several sweeps of its 64 lanes, and the prompt runs as
    // several prefill chunks; then decoding continues past them.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("weights");
    let model = Model::load(&dir).unwrap();
    let tokens: Vec<u32> = (0..200u32).map(|i| 2 + (i * 37 + i * i) % 2000).collect();
    let mut cpu = CpuEngine::new(Model::load(&dir).unwrap(), tokens.len() + 8);
    let mut gpu = gpu(&model, tokens.len() + 8);
    assert!(gpu.max_chunk() < tokens.len(), "the prompt must span several chunks");
    let want = cpu.forward(&tokens, Logits::All).unwrap();
    let got = gpu.forward(&tokens, Logits::All).unwrap();
    assert_logits_match("long prefill", &got, &want, 2048, 1e-3);
    for t in [5u32, 77, 1999] {
        let want = cpu.forward(&[t], Logits::Last).unwrap();
        let got = gpu.forward(&[t], Logits::Last).unwrap();
        assert_logits_match("decode after long prefill", &got, &want, 2048, 1e-3);
    }
}

#[test]
fn gpu_batched_decode_matches_each_sequence_alone_on_every_family() {
    for family in FAMILIES {
        let model = Model::load(&fixture(family)).unwrap();
        let capacity = 9 + BATCH_STEPS + 1;
        let options = dsrun::plan::budget::GpuOptions { sequences: BATCH_ORDER.len(), ..Default::default() };
        let mut cpu = CpuEngine::new(Model::load(&fixture(family)).unwrap(), capacity);
        for (group_experts, cpu_shapes) in [(false, true), (true, true), (true, false)] {
            let mut ctx = context::open(GpuChoice::Auto).expect("a wgpu adapter");
            ctx.group_experts = group_experts;
            ctx.cpu_shapes = cpu_shapes;
            // Alone with the same kernel shapes (they fix the order of each row's sums).
            let mut alone = GpuModel::new(ctx.clone(), &model, capacity, dsrun::quant::QuantTarget::Keep).unwrap();
            let mut batched = GpuModel::with_options(ctx, &model, capacity, &options).unwrap();
            let what = format!("{family} wgpu, grouped experts {group_experts}, CPU shapes {cpu_shapes}");
            batched_decode_matches_alone(&what, &mut batched, &mut alone, &mut cpu);
        }
    }
}

/// The 16-bit latent caches against f32 on the bundled model, over text like its training
/// data: a 96-token prefill, then 96 tokens decoded one by one. Floors (measured values in the
/// README): the most likely next token agrees with f32's at >= 99% (f16) / 97% (bf16) of
/// positions, and the perplexity of the text is within 1% (f16) / 3% (bf16) of f32's.
#[test]
fn sixteen_bit_latent_caches_hold_their_quality_floors() {
    use dsrun::plan::layout::CacheFormat;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("weights");
    let model = Model::load(&dir).unwrap();
    let config = dsrun::config::ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let tokenizer = dsrun::tokenizer::Tokenizer::load(&dir, &config).unwrap();
    let text = "Return the value of the attribute named by the string. If the object has no such attribute, \
                raise an exception. This module provides functions for reading and writing files in the \
                archive format, and for creating temporary directories that are removed when the context \
                manager exits. The function returns a list of the names of the entries in the directory, \
                in arbitrary order, not including the special entries. Raise an error if the path is not a \
                directory. The default value is used when the argument is omitted.";
    let tokens = tokenizer.encode(&format!("{text} {text}")).unwrap();
    assert!(tokens.len() >= 192, "{} tokens", tokens.len());
    let tokens = &tokens[..tokens.len().min(192)];
    let split = tokens.len() / 2;
    let vocab = config.vocab_size;
    let run = |cache: CacheFormat| -> Vec<f32> {
        let ctx = context::open(GpuChoice::Auto).expect("a wgpu adapter");
        let options = dsrun::plan::budget::GpuOptions { kv_cache: cache, ..Default::default() };
        let mut engine = GpuModel::with_options(ctx, &model, tokens.len(), &options).unwrap();
        let mut logits = engine.forward(&tokens[..split], Logits::All).unwrap();
        for &t in &tokens[split..tokens.len() - 1] {
            logits.extend(engine.forward(&[t], Logits::Last).unwrap());
        }
        logits
    };
    // Perplexity of tokens[1..] and the argmax per position.
    let score = |logits: &[f32]| -> (f64, Vec<usize>) {
        let rows: Vec<&[f32]> = logits.chunks(vocab).collect();
        let nll: f64 = rows
            .iter()
            .zip(&tokens[1..])
            .map(|(row, &t)| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let total = max + row.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
                total - row[t as usize] as f64
            })
            .sum();
        ((nll / rows.len() as f64).exp(), rows.iter().map(|r| argmax(r)).collect())
    };
    let (ppl32, top32) = score(&run(CacheFormat::F32));
    for (cache, agreement_floor, ppl_bound) in [(CacheFormat::F16, 0.99, 0.01), (CacheFormat::Bf16, 0.97, 0.03)] {
        let (ppl, top) = score(&run(cache));
        let agreement = top.iter().zip(&top32).filter(|(a, b)| a == b).count() as f64 / top.len() as f64;
        eprintln!("--kv-cache {}: top-1 agreement {agreement:.4}, perplexity {ppl:.4} (f32 {ppl32:.4})", cache.name());
        assert!(agreement >= agreement_floor, "{}: top-1 agreement {agreement}", cache.name());
        assert!(((ppl - ppl32) / ppl32).abs() <= ppl_bound, "{}: perplexity {ppl} vs f32 {ppl32}", cache.name());
    }
}

/// DeepSeek-V3.2 with 16-bit caches (the latent cache and the indexer's key cache both take
/// `--kv-cache`'s format): logits against transformers' within the rounding a 16-bit cache adds
/// (f16 2e-3, bf16 2e-2 of the logits' scale, as for the latent caches on CUDA), the greedy
/// choice unchanged at every position, in prefill and then decode.
#[test]
fn v32_sixteen_bit_caches_stay_close_to_transformers() {
    use dsrun::plan::layout::CacheFormat;
    let dir = fixture("v32");
    let g = golden(&dir);
    let model = Model::load(&dir).unwrap();
    for (cache, tolerance) in [(CacheFormat::F16, 2e-3), (CacheFormat::Bf16, 2e-2)] {
        let ctx = context::open(GpuChoice::Auto).expect("a wgpu adapter");
        let options = dsrun::plan::budget::GpuOptions { kv_cache: cache, ..Default::default() };
        let mut engine = GpuModel::with_options(ctx, &model, g.tokens.len(), &options).unwrap();
        let mut logits = engine.forward(&g.tokens[..8], Logits::All).unwrap();
        for &t in &g.tokens[8..] {
            logits.extend(engine.forward(&[t], Logits::All).unwrap());
        }
        let err = relative_error(&logits, &g.logits);
        eprintln!("v32 --kv-cache {}: relative error {err:e}", cache.name());
        assert!(err <= tolerance, "--kv-cache {}: relative error {err:e}", cache.name());
        let argmaxes = |l: &[f32]| l.chunks(g.vocab).map(argmax).collect::<Vec<_>>();
        assert_eq!(argmaxes(&logits), argmaxes(&g.logits), "--kv-cache {}: greedy choices", cache.name());
    }
}
