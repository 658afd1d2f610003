//! GGUF files written by llama.cpp's own converter (tools/make_gguf_fixtures.py) from the tiny
//! fixtures: the `deepseek2` layout mapped onto dsrun's (config, tensor names, both MLA
//! layouts), run on the reference and every backend against the fixtures' transformers logits,
//! and the tokenizer they carry against llama.cpp's own tokenizer on the same files.
//!
//! Tolerance: 1e-3 of the largest reference logit, as for the safetensors fixtures
//! (tests/fixtures.rs): the GGUFs hold the same weights in f32, exactly.

mod common;
use common::*;
use dsrun::builder::EngineBuilder;
use dsrun::config::ModelConfig;
use dsrun::device::GpuChoice;
use dsrun::engine::Steps;
use dsrun::gguf::{deepseek2, Gguf, Value};
use dsrun::model::Logits;
use dsrun::quant::DType;
use dsrun::util::Choice;
use std::path::PathBuf;

/// Each GGUF fixture and the safetensors family it was converted from.
const FILES: [(&str, &str); 3] = [("v3_noaux-f32", "v3_noaux"), ("v3_noaux-kvb-f32", "v3_noaux"), ("v2_lite-f32", "v2_lite")];

fn gguf(name: &str) -> PathBuf {
    fixture("gguf").join(format!("{name}.gguf"))
}

/// What the metadata maps to is the config the file was converted from, key for key, but for
/// the MTP layer (the converter drops it).
#[test]
fn the_metadata_maps_to_the_original_config() {
    for (file, family) in FILES {
        let from_gguf = EngineBuilder::open(gguf(file)).unwrap().config().clone();
        let mut original = ModelConfig::from_file(&fixture(family).join("config.json")).unwrap();
        original.num_nextn_predict_layers = 0;
        // Both printed: every field compared, floats as written.
        assert_eq!(format!("{from_gguf:?}"), format!("{original:?}"), "{file}");
    }
}

#[test]
fn gguf_models_match_transformers_on_the_reference() {
    for (file, family) in FILES {
        let g = golden(&fixture(family));
        let model = EngineBuilder::open(gguf(file)).unwrap().model().unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(model.ignored.is_empty(), "{file}: unused tensors {:?}", model.ignored);
        let logits = model.forward(&mut model.new_cache(g.tokens.len()), &g.tokens, Logits::All).unwrap();
        eprintln!("{file}: relative error {:e}", relative_error(&logits, &g.logits));
        assert_logits_match(file, &logits, &g.logits, g.vocab, 1e-3);
    }
}

/// The CPU backend and wgpu (lavapipe in CI) on the same files.
#[test]
fn gguf_models_match_transformers_on_the_backends() {
    for device in [GpuChoice::Cpu, GpuChoice::Vulkan] {
        for (file, family) in FILES {
            let g = golden(&fixture(family));
            let builder = EngineBuilder::open(gguf(file)).unwrap().device(device).context(Some(g.tokens.len())).speculative(Some(dsrun::speculative::Speculative::Off));
            let mut engine = builder.build().unwrap_or_else(|e| panic!("{file} on {}: {e}", device.name())).engine;
            let logits = engine.forward(&g.tokens, Logits::All).unwrap();
            assert_logits_match(&format!("{file} on {}", engine.device_name()), &logits, &g.logits, g.vocab, 1e-3);
        }
    }
}

/// The tokenizer in the file gives llama.cpp's ids (llama-tokenize on the same files, with its
/// BOS) for every text, and decodes them back.
#[test]
fn the_files_tokenizer_matches_llama_cpps() {
    let text = std::fs::read_to_string(fixture("gguf").join("tokens.json")).unwrap();
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    let texts: Vec<&str> = expected["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    for (file, _) in FILES {
        let builder = EngineBuilder::open(gguf(file)).unwrap();
        let tokenizer = builder.tokenizer().unwrap();
        let ids = &expected["files"][format!("{file}.gguf")];
        for (i, text) in texts.iter().enumerate() {
            let want: Vec<u32> = ids[i].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            let got = tokenizer.encode(text).unwrap();
            assert_eq!(got, want, "{file}: {text:?}");
            assert_eq!(tokenizer.decode(&got).unwrap(), *text, "{file}: decoded back");
        }
        assert!(tokenizer.is_eos(1), "{file}: the file's EOS");
        let template = builder.chat_template().unwrap().expect("the file's chat template");
        let rendered = template.render(&[dsrun::chat_template::Message::new("user", "Hi")], true).unwrap();
        assert_eq!(rendered, "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>", "{file}");
    }
}

fn tables(file: &str) -> Gguf {
    Gguf::parse(&std::fs::read(gguf(file)).unwrap()).unwrap()
}

fn set(g: &mut Gguf, key: &str, value: Option<Value>) {
    g.metadata.retain(|(k, _)| k != key);
    if let Some(v) = value {
        g.metadata.push((key.to_string(), v));
    }
}

/// Files that are not DeepSeek models, or whose metadata is missing or of the wrong type, are
/// refused with the key or the architecture named.
#[test]
fn bad_metadata_is_refused_by_name() {
    let cases: [(&str, Option<Value>, &str); 5] = [
        ("general.architecture", Some(Value::String("llama".into())), "architecture `llama`"),
        ("deepseek2.attention.kv_lora_rank", None, "`deepseek2.attention.kv_lora_rank` is missing"),
        ("deepseek2.expert_count", Some(Value::String("many".into())), "`deepseek2.expert_count`"),
        ("deepseek2.expert_gating_func", Some(Value::U32(7)), "expert_gating_func` is 7"),
        ("deepseek2.rope.scaling.type", Some(Value::String("linear".into())), "rope.scaling.type` is `linear`"),
    ];
    for (key, value, want) in cases {
        let mut g = tables("v3_noaux-f32");
        set(&mut g, key, value);
        let e = deepseek2::config(&g).expect_err(key).to_string();
        assert!(e.contains(want), "{key}: {e}");
    }
    // A size the config's own checks refuse (more experts used than exist) names its key.
    let mut g = tables("v3_noaux-f32");
    set(&mut g, "deepseek2.expert_used_count", Some(Value::U32(99)));
    let e = deepseek2::config(&g).unwrap_err().to_string();
    assert!(e.contains("num_experts_per_tok"), "{e}");
}

/// llama-quantize's Q8_0 of v3_noaux (Q8_0 where rows hold whole blocks of 32, F16 where not,
/// F32 vectors: a mixed file, as real ones are) against transformers run on gguf-py's
/// dequantisation of the same file, on the reference, the CPU backend and wgpu (Q8_0 decoded
/// in their kernels as stored), and converted at load (`--quant q8`).
#[test]
fn a_q8_0_file_matches_its_dequantised_reference() {
    let path = gguf("v3_noaux-q8_0");
    let (tokens, want) = golden_of("v3_noaux-q8_0");
    let vocab = want.len() / tokens.len();
    let formats = tables("v3_noaux-q8_0").bytes_by_type();
    assert!(formats.iter().any(|(t, _)| *t == "Q8_0") && formats.iter().any(|(t, _)| *t == "F16"), "{formats:?}");
    for device in [GpuChoice::Reference, GpuChoice::Cpu, GpuChoice::Vulkan] {
        let builder = EngineBuilder::open(&path).unwrap().device(device).context(Some(tokens.len()));
        let mut engine = builder.build().unwrap().engine;
        let logits = engine.forward(&tokens, Logits::All).unwrap();
        assert_logits_match(&format!("Q8_0 on {}", engine.device_name()), &logits, &want, vocab, 1e-3);
    }
    let options = dsrun::plan::budget::GpuOptions { quant: dsrun::quant::QuantTarget::Q8, ..Default::default() };
    let mut converted = EngineBuilder::open(&path).unwrap().device(GpuChoice::Vulkan).gpu_options(options).context(Some(tokens.len())).build().unwrap().engine;
    let logits = converted.forward(&tokens, Logits::All).unwrap();
    // Converted at load it runs on the GPU backend. Re-quantised to q8 (an f32 scale per 32 of
    // the dequantised values) it is near, not exact: on this tiny random model q8 of the f32
    // file itself lands 0.26 (relative) from its golden logits, so the bound says only that the
    // conversion read the Q8_0 values (garbage would be ~1).
    let error = relative_error(&logits, &want);
    assert!(error < 0.35, "{error}");
}

/// `formats.safetensors` (tools/make_gguf_fixtures.py): for each ggml type llama-quantize
/// wrote, two rows as stored and gguf-py's dequantisation of them.
fn format_samples() -> Vec<(DType, Vec<u8>, Vec<f32>, usize)> {
    let bytes = std::fs::read(fixture("gguf").join("formats.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let Some(ty) = name.strip_suffix(".bytes") else { continue };
        let dtype = DType::from_ggml(ty).unwrap_or_else(|| panic!("{ty}: a ggml type dsrun reads"));
        let values = st.tensor(&format!("{ty}.values")).unwrap();
        let cols = values.shape()[1];
        let values: Vec<f32> = values.data().chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        out.push((dtype, view.data().to_vec(), values, cols));
    }
    out.sort_by_key(|(d, ..)| d.name());
    out
}

/// Every GGUF block format dsrun reads decodes llama-quantize's own blocks to exactly the
/// values gguf-py gives (the independent reference: its numpy decoders), and the matmul on
/// those rows equals the reference's on the CPU backend at every SIMD level and on wgpu.
#[test]
fn every_format_decodes_as_gguf_py_and_multiplies_on_the_backends() {
    use dsrun::backend::cpu::{CpuBackend, Simd};
    use dsrun::model::weights::Matrix;
    let samples = format_samples();
    let names: Vec<&str> = samples.iter().map(|(d, ..)| d.name()).collect();
    assert_eq!(names, ["IQ1_M", "IQ1_S", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ3_S", "IQ3_XXS", "IQ4_NL", "IQ4_XS", "Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"]);
    for (dtype, bytes, want, cols) in &samples {
        let got = dsrun::quant::decode_vec(*dtype, bytes);
        assert_eq!(got.len(), want.len(), "{dtype:?}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(g.to_bits() == w.to_bits(), "{dtype:?} value {i}: dsrun {g}, gguf-py {w}");
        }
        let m = Matrix { name: dtype.name().into(), rows: 2, cols: *cols, dtype: *dtype, data: dsrun::checkpoint::TensorBytes::from_vec(bytes.clone()), scales: None };
        fast_math_dot(&m);
        let x = random(7, 3 * cols);
        let reference = dsrun::model::math::matmul(&m, &x, 3);
        for simd in Simd::available() {
            let mut lab = dsrun::runtime::Lab::new(CpuBackend::with_simd(simd).unwrap()).unwrap();
            matmul_matches(&mut lab, &m, &x, &reference, &format!("at {}", simd.name()));
        }
        let ctx = dsrun::backend::wgpu::context::open(GpuChoice::Vulkan).expect("a wgpu adapter (on Debian: apt-get install mesa-vulkan-drivers)");
        matmul_matches(&mut dsrun::runtime::Lab::<dsrun::backend::wgpu::WgpuBackend>::new(ctx).unwrap(), &m, &x, &reference, "on wgpu");
    }
}

/// `m` (two rows) times one and three rows of `x` on `lab`'s backend, within 1e-5 of `reference`.
fn matmul_matches<B: dsrun::backend::Backend>(lab: &mut dsrun::runtime::Lab<B>, m: &dsrun::model::weights::Matrix, x: &[f32], reference: &[f32], what: &str) {
    let w = lab.matrix(&[m], true).unwrap();
    for n in [1, 3] {
        let xb = lab.input(&x[..n * m.cols]).unwrap();
        let y = lab.zeros(2 * n).unwrap();
        let ops = lab.lower(&[dsrun::plan::Op::Matmul { w, x: xb, y, rows: dsrun::plan::Rows::All, accumulate: false }]).unwrap();
        lab.run(&ops, n as u32).unwrap();
        let err = relative_error(&lab.read_f32(y, 2 * n).unwrap(), &reference[..2 * n]);
        assert!(err <= 1e-5, "{:?} {what} with {n} tokens: relative error {err:e}", m.dtype);
    }
}

/// The one-token dot under `--math fast` on `m`'s two rows (every format: Q8_0, Q4_K, Q5_0 and
/// Q6_K take int8 activations, the rest the exact kernels): Q8_0, Q5_0 and Q6_K equal the exact
/// dot of the activations
/// as int8 rounds them (per 32: scale max|x| / 127, ties to even) within 1e-5; Q4_K, whose mins
/// meet the exact activations' sums, is within 2e-2 of the exact dot.
fn fast_math_dot(m: &dsrun::model::weights::Matrix) {
    use dsrun::backend::cpu::{CpuBackend, Simd};
    use dsrun::plan::budget::Math;
    let x: Vec<f32> = random(11, m.cols).iter().map(|v| v * 2.0).collect();
    let rounded: Vec<f32> = x
        .chunks(32)
        .flat_map(|g| {
            let scale = g.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
            g.iter().map(move |v| (v / scale).round_ties_even() * scale).collect::<Vec<_>>()
        })
        .collect();
    let (want, tolerance) = match m.dtype {
        DType::Q8_0 | DType::Q5_0 | DType::Q6_K => (dsrun::model::math::matmul(m, &rounded, 1), 1e-5),
        // Two rows against one rounded activation vector: the rounding does not average out
        // (measured 1.0e-2); a wrong nibble half or scale is off by order 1.
        DType::Q4_K | DType::Q5_K => (dsrun::model::math::matmul(m, &x, 1), 2e-2),
        _ => (dsrun::model::math::matmul(m, &x, 1), 1e-5),
    };
    for simd in Simd::available() {
        let mut lab = dsrun::runtime::Lab::new(CpuBackend::with_simd(simd).unwrap().with_math(Math::Fast)).unwrap();
        let w = lab.matrix(&[m], true).unwrap();
        let (xb, y) = (lab.input(&x).unwrap(), lab.zeros(2).unwrap());
        let ops = lab.lower(&[dsrun::plan::Op::Matmul { w, x: xb, y, rows: dsrun::plan::Rows::All, accumulate: false }]).unwrap();
        lab.run(&ops, 1).unwrap();
        let err = relative_error(&lab.read_f32(y, 2).unwrap(), &want);
        assert!(err <= tolerance, "{:?} with fast math at {}: relative error {err:e}", m.dtype, simd.name());
    }
}

/// `--math fast` on the Q8_0 and Q4_K_M files: Q8_0, Q4_K, Q5_0 and Q6_K meet int8 activations
/// (llama.cpp's arithmetic), the other formats stay exact; it must differ from the exact kernels' logits.
/// Floors: median position error <= 3e-2 of the largest logit, top-1 >= 85%, decoding token by
/// token. The tiny random fixtures amplify activation rounding (q8 weights move v3_noaux 0.26
/// from its golden): measured 1.95e-2 / 88% (Q8_0) and 2.5e-2 / 96% (Q4_K_M: Q4_K, Q5_0 and Q6_K in int8), where a wrong
/// scale or nibble half gives errors of order 1. The kernel itself is held tighter below.
#[test]
fn fast_math_on_gguf_files_stays_near_their_references() {
    use dsrun::plan::budget::{GpuOptions, Math};
    for file in ["v3_noaux-q8_0", "kq-q4_k_m"] {
        let (tokens, want) = golden_of(file);
        let vocab = want.len() / tokens.len();
        let open = |math| EngineBuilder::open(gguf(file)).unwrap().device(GpuChoice::Cpu).gpu_options(GpuOptions { math, ..Default::default() }).context(Some(tokens.len())).build().unwrap().engine;
        let exact = open(Math::Exact).forward(&tokens, Logits::All).unwrap();
        let mut fast = open(Math::Fast);
        let mut got = fast.forward(&tokens[..3], Logits::All).unwrap();
        for &t in &tokens[3..] {
            got.extend(fast.forward(&[t], Logits::Last).unwrap());
        }
        assert!(got != exact, "{file}: fast math gave the exact kernels' logits");
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let mut errors: Vec<f32> = got.chunks(vocab).zip(want.chunks(vocab)).map(|(a, b)| a.iter().zip(b).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale).collect();
        let agree = got.chunks(vocab).zip(want.chunks(vocab)).filter(|(a, b)| argmax(a) == argmax(b)).count() as f64 / errors.len() as f64;
        errors.sort_by(f32::total_cmp);
        let median = errors[errors.len() / 2];
        eprintln!("{file} with fast math: error {median:e} at the median position; top-1 {:.0}%", agree * 100.0);
        assert!(median <= 3e-2 && agree >= 0.85, "{file}: error {median:e} at the median position, top-1 agreement {agree:.2}");
    }
}

/// llama-quantize's Q4_K_M (Q4_K and Q6_K, with Q5_0 where rows are not whole 256-blocks) and
/// IQ2_XXS mix (IQ2_XXS, Q5_K, Q2_K, IQ4_NL; made with an importance matrix) of a model whose
/// rows are whole 256-blocks: logits within 1e-3 of transformers on gguf-py's dequantisation,
/// on the reference, the CPU backend and wgpu.
#[test]
fn k_quant_and_i_quant_files_match_their_dequantised_references() {
    for (file, holds) in [("kq-q4_k_m", ["Q4_K", "Q6_K"]), ("kq-iq2_xxs", ["IQ2_XXS", "Q2_K"])] {
        let path = gguf(file);
        let formats = tables(file).bytes_by_type();
        assert!(holds.iter().all(|t| formats.iter().any(|(f, _)| f == t)), "{file}: {formats:?}");
        let (tokens, want) = golden_of(file);
        let vocab = want.len() / tokens.len();
        for device in [GpuChoice::Reference, GpuChoice::Cpu, GpuChoice::Vulkan] {
            let mut engine = EngineBuilder::open(&path).unwrap().device(device).context(Some(tokens.len())).build().unwrap().engine;
            let logits = engine.forward(&tokens, Logits::All).unwrap();
            eprintln!("{file} on {}: relative error {:e}", engine.device_name(), relative_error(&logits, &want));
            assert_logits_match(&format!("{file} on {}", engine.device_name()), &logits, &want, vocab, 1e-3);
        }
    }
}

/// A quantised file is refused naming its formats (until they run), and the CLI says so with a
/// non-zero exit rather than running anything.
#[test]
fn a_file_of_unsupported_formats_is_refused_by_name() {
    let mut bytes = std::fs::read(gguf("v3_noaux-f32")).unwrap();
    let g = Gguf::parse(&bytes).unwrap();
    // Retype one f32 vector as Q8_1 (ggml's activation format, which no model file holds: a
    // 64-value row is 2 blocks of 36 bytes, 72 of its 256; the rest of the range is padding)
    // by editing its type id.
    let t = g.tensors.iter().find(|t| t.name == "blk.0.attn_norm.weight").unwrap();
    let name_at = bytes.windows(t.name.len()).position(|w| w == t.name.as_bytes()).unwrap();
    let type_at = name_at + t.name.len() + 4 + 8 * t.dims.len();
    bytes[type_at..type_at + 4].copy_from_slice(&9u32.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q8_1.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let e = EngineBuilder::open(&path).unwrap().model().map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("Q8_1") && e.contains("not supported yet"), "{e}");
}

/// Split files (llama.cpp's `llama-gguf-split --split-max-tensors 20` of the Q8_0 fixture: three
/// files, the correction biases in later ones) load from the first as the whole file does, to
/// the bit; a later split or a missing one is refused naming the file.
#[test]
fn split_files_load_as_the_whole_file() {
    let first = fixture("gguf").join("split").join("v3_noaux-q8_0-00001-of-00003.gguf");
    let (tokens, _) = golden_of("v3_noaux-q8_0");
    let logits = |path: &std::path::Path| {
        let builder = EngineBuilder::open(path).unwrap().device(GpuChoice::Cpu).context(Some(tokens.len()));
        builder.build().unwrap().engine.forward(&tokens, Logits::All).unwrap()
    };
    assert_eq!(logits(&first), logits(&gguf("v3_noaux-q8_0")));
    let second = first.with_file_name("v3_noaux-q8_0-00002-of-00003.gguf");
    let e = EngineBuilder::open(&second).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("split 2 of 3") && e.contains("00001-of-00003"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    for n in [1, 2] {
        let name = format!("v3_noaux-q8_0-0000{n}-of-00003.gguf");
        std::fs::copy(first.with_file_name(&name), dir.path().join(&name)).unwrap();
    }
    let e = EngineBuilder::open(dir.path().join("v3_noaux-q8_0-00001-of-00003.gguf")).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("split 3 of 3") && e.contains("is missing"), "{e}");
}

/// GGUF weights through the machinery a big model needs: hybrid placement (every routed expert
/// on the CPU backend, the rest on lavapipe) and batched decoding of several sequences on the
/// CPU backend from a Q8_0 file, each against the golden logits or the sequence alone.
#[test]
fn hybrid_placement_and_batched_decode_take_gguf_weights() {
    let g = golden(&fixture("v3_noaux"));
    let options = dsrun::plan::budget::GpuOptions { cpu_moe: usize::MAX, ..Default::default() };
    let builder = EngineBuilder::open(gguf("v3_noaux-f32")).unwrap().device(GpuChoice::Vulkan).gpu_options(options).context(Some(g.tokens.len()));
    let mut engine = builder.build().unwrap().engine;
    let logits = engine.forward(&g.tokens, Logits::All).unwrap();
    assert_logits_match("hybrid on a GGUF", &logits, &g.logits, g.vocab, 1e-3);

    let path = gguf("v3_noaux-q8_0");
    let open = |sequences: usize| EngineBuilder::open(&path).unwrap().device(GpuChoice::Cpu).sequences(sequences).context(Some(9 + BATCH_STEPS + 1)).build().unwrap().engine;
    let (mut batched, mut alone) = (open(BATCH_ORDER.len()), open(1));
    let mut reference = EngineBuilder::open(&path).unwrap().device(GpuChoice::Reference).context(Some(9 + BATCH_STEPS + 1)).build().unwrap().engine;
    // The CPU backend's batch takes the several-token kernels (rows decoded to f32 panels:
    // Σ (q d) x), alone the one-token dots (d Σ q x, a block's sum scaled once): f32 rounding
    // apart, measured 1.6e-5 relative; a wrong row or sequence would be ~1.
    batched_decode_near_alone("Q8_0 GGUF on the CPU backend", batched.as_mut(), alone.as_mut(), reference.as_mut(), 1e-4);
}

/// The Q4_K_M file (Q4_K, Q6_K and Q5_0 as stored) on wgpu: routed experts streamed through a
/// slot cache of 30% of them give the all-resident logits bit for bit (same kernel, same
/// order; slots hold whole blocks); split with the CPU backend (`--cpu-moe`) within 1e-3 of
/// the golden logits; batched decoding equal to each sequence alone.
#[test]
fn block_formats_stream_split_and_batch_on_wgpu() {
    use dsrun::plan::budget::{ExpertPlacement, GpuMem, GpuOptions};
    let path = gguf("kq-q4_k_m");
    let (tokens, want) = golden_of("kq-q4_k_m");
    let vocab = want.len() / tokens.len();
    let open = |options: GpuOptions, sequences: usize, ctx: usize| {
        EngineBuilder::open(&path).unwrap().device(GpuChoice::Vulkan).gpu_options(options).sequences(sequences).context(Some(ctx)).build().unwrap().engine
    };
    let resident = open(GpuOptions::default(), 1, tokens.len()).forward(&tokens, Logits::All).unwrap();
    assert_logits_match("Q4_K_M on wgpu", &resident, &want, vocab, 1e-3);
    let streaming = GpuOptions { gpu_mem: GpuMem::ExpertShare(0.3), placement: ExpertPlacement::Stream, ..Default::default() };
    let streamed = open(streaming, 1, tokens.len()).forward(&tokens, Logits::All).unwrap();
    if let Some(i) = streamed.iter().zip(&resident).position(|(a, b)| a.to_bits() != b.to_bits()) {
        panic!("Q4_K_M streamed: logit {i} is {} streamed, {} resident", streamed[i], resident[i]);
    }
    let split = open(GpuOptions { cpu_moe: usize::MAX, ..Default::default() }, 1, tokens.len()).forward(&tokens, Logits::All).unwrap();
    assert_logits_match("Q4_K_M with its routed experts on the CPU backend", &split, &want, vocab, 1e-3);
    let ctx = 9 + BATCH_STEPS + 1;
    let (mut batched, mut alone) = (open(GpuOptions::default(), BATCH_ORDER.len(), ctx), open(GpuOptions::default(), 1, ctx));
    let mut reference = EngineBuilder::open(&path).unwrap().device(GpuChoice::Reference).context(Some(ctx)).build().unwrap().engine;
    batched_decode_near_alone("Q4_K_M on wgpu", batched.as_mut(), alone.as_mut(), reference.as_mut(), 1e-3);
}

/// `dsrun quantize`'s quantisers (ggml's reference ones, ported) write llama-quantize's bytes:
/// `llama-quantize --pure` rows of Q8_0, Q4_K and Q6_K from the f32 rows beside them
/// (formats.safetensors, tools/make_gguf_fixtures.py).
#[test]
fn the_quantisers_write_llama_quantizes_bytes() {
    let bytes = std::fs::read(fixture("gguf").join("formats.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for ty in ["Q8_0", "Q4_K", "Q6_K"] {
        let source: Vec<f32> = st.tensor(&format!("{ty}.source")).unwrap().data().chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let want = st.tensor(&format!("{ty}.quantised")).unwrap().data().to_vec();
        let got = dsrun::quant::ggml_quantize::quantize(DType::from_ggml(ty).unwrap(), &source);
        assert_eq!(got.len(), want.len(), "{ty}");
        if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
            panic!("{ty}: byte {i} of {} is {:#04x}, llama-quantize wrote {:#04x}", want.len(), got[i], want[i]);
        }
    }
}

/// The metadata entries of a GGUF but `general.name` and `general.size_label` (what a file is
/// called), in order.
fn metadata_but_names(g: &Gguf) -> Vec<(String, Value)> {
    g.metadata.iter().filter(|(k, _)| k != "general.name" && k != "general.size_label").cloned().collect()
}

/// `dsrun quantize` Q8_0 of the converter's f32 file is llama-quantize's Q8_0 of it, tensor for
/// tensor (types, dimensions, bytes: Q8_0 where rows are whole 32s, F16 where not, F32 vectors
/// and router) and key for key but the file's name, so llama.cpp reads it as its own.
#[test]
fn quantize_writes_what_llama_quantize_writes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q8.gguf");
    let written = dsrun::quantize::quantize(&gguf("v3_noaux-f32"), &out, dsrun::quantize::FileType::Q8_0, &dsrun::util::Silent).unwrap();
    let (ours, theirs) = (std::fs::read(&out).unwrap(), std::fs::read(gguf("v3_noaux-q8_0")).unwrap());
    assert_eq!(written.bytes, ours.len() as u64);
    let (a, b) = (Gguf::parse(&ours).unwrap(), Gguf::parse(&theirs).unwrap());
    assert_eq!(metadata_but_names(&a), metadata_but_names(&b));
    assert_eq!(a.tensors.len(), b.tensors.len());
    for t in &b.tensors {
        let mine = a.tensors.iter().find(|m| m.name == t.name).unwrap_or_else(|| panic!("`{}` not written", t.name));
        assert_eq!((mine.ty, &mine.dims), (t.ty, &t.dims), "{}", t.name);
        let range = |t: &dsrun::gguf::TensorInfo| t.start as usize..(t.start + t.bytes) as usize;
        assert!(ours[range(mine)] == theirs[range(t)], "`{}`: bytes differ", t.name);
    }
}

/// A safetensors checkpoint (the bundled model: bf16, its tokenizer.json with GPT-2's split,
/// a chat template, an MTP layer) through `dsrun quantize`: as F32 the file's logits equal
/// the checkpoint's (every value kept); as Q8_0 and Q6_K no further from them than dsrun's own
/// int8 conversion at load (`--quant q8`, an f32 scale per 32) lands (measured on this text:
/// Q8_0 8.6e-2 of the largest logit, q8 1.2e-1; a wrong block or scale is order 1); the config
/// maps back to the checkpoint's (the MTP layer dropped, as llama.cpp's converter drops it),
/// the tokenizer gives the same ids and the chat template renders alike.
#[test]
fn quantize_writes_a_checkpoint_dsrun_reads_back() {
    use dsrun::quantize::{quantize, FileType};
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("weights");
    let original = EngineBuilder::open(&source).unwrap();
    let tokens: Vec<u32> = original.tokenizer().unwrap().encode("The quick brown fox jumps over the lazy dog.").unwrap();
    let reference = |builder: &EngineBuilder| builder.model().unwrap().forward(&mut builder.model().unwrap().new_cache(tokens.len()), &tokens, Logits::All).unwrap();
    let want = reference(&original);
    let q8 = dsrun::plan::budget::GpuOptions { quant: dsrun::quant::QuantTarget::Q8, ..Default::default() };
    let mut converted = EngineBuilder::open(&source).unwrap().device(GpuChoice::Cpu).gpu_options(q8).speculative(Some(dsrun::speculative::Speculative::Off)).build().unwrap().engine;
    let q8_error = relative_error(&converted.forward(&tokens, Logits::All).unwrap(), &want);
    let dir = tempfile::tempdir().unwrap();
    // Q6_K: the bundled model's rows (128, 96, 320 values) are no whole 256-blocks: its
    // matrices fall back to Q8_0 but for those of whole 256s (none here), so Q6_K and Q8_0
    // files hold the same formats; the Q6_K rule itself is held by the byte checks above.
    for (ty, tolerance) in [(FileType::F32, 0.0), (FileType::Q8_0, q8_error), (FileType::Q6_K, q8_error)] {
        let out = dir.path().join("model.gguf");
        quantize(&source, &out, ty, &dsrun::util::Silent).unwrap();
        let back = EngineBuilder::open(&out).unwrap();
        let mut config = original.config().clone();
        config.num_nextn_predict_layers = 0;
        assert_eq!(format!("{:?}", back.config()), format!("{config:?}"), "{ty:?}");
        let got = reference(&back);
        let err = relative_error(&got, &want);
        eprintln!("{ty:?}: relative error {err:e} (q8 at load: {q8_error:e})");
        assert!(err <= tolerance, "{ty:?}: relative error {err:e} over {tolerance:e}");
        let (a, b) = (original.tokenizer().unwrap(), back.tokenizer().unwrap());
        for text in ["Hello world", "  leading spaces\nand lines\n\n", "naïve café, 東京 and ünïcödé 12345"] {
            assert_eq!(a.encode(text).unwrap(), b.encode(text).unwrap(), "{ty:?}: {text:?}");
        }
        let chat = [dsrun::chat_template::Message::new("user", "Hi")];
        let render = |b: &EngineBuilder| b.chat_template().unwrap().expect("a chat template").render(&chat, true).unwrap();
        assert_eq!(render(&back), render(&original), "{ty:?}");
    }
}

/// `dsrun quantize` refuses what llama.cpp's layout cannot hold, and an output it cannot write,
/// by name, leaving no file behind.
#[test]
fn quantize_refuses_what_it_cannot_write() {
    use dsrun::quantize::{quantize, FileType};
    let dir = tempfile::tempdir().unwrap();
    let e = quantize(&fixture("v32"), &dir.path().join("v32.gguf"), FileType::Q8_0, &dsrun::util::Silent).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("V3.2") && e.contains("deepseek32"), "{e}");
    let missing = dir.path().join("no such folder").join("out.gguf");
    let e = quantize(&gguf("v3_noaux-f32"), &missing, FileType::Q8_0, &dsrun::util::Silent).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("no such folder"), "{e}");
    let e = quantize(&fixture("v3_noaux"), &dir.path().join("x.gguf"), FileType::Q8_0, &dsrun::util::Silent).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("no tokenizer.json or tiktoken.model"), "{e}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing left behind");
}

/// Kimi-K2's tokenizer (`tiktoken.model` with Moonshot's split, tests/fixtures/tiktoken) as
/// `dsrun quantize` writes it (`tokenizer.ggml.pre` = `kimi-k2`, llama.cpp's name) and as dsrun
/// reads such a file back: Python tiktoken's ids for every text of the fixture. (llama.cpp
/// splits `kimi-k2` in custom code; its ids on such a file are unverified here.)
#[test]
fn kimi_k2s_tokenizer_goes_through_gguf() {
    let dir = fixture("tiktoken");
    let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let ranks = expected["ranks"].as_u64().unwrap() as usize;
    let mut config = ModelConfig::from_file(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/config.json")).unwrap();
    config.vocab_size = ranks + 256;
    let metadata = dsrun::gguf::tokenizer::from_checkpoint(&dir, &config).unwrap();
    assert!(metadata.iter().any(|(k, v)| k == "tokenizer.ggml.pre" && v.as_str() == Some("kimi-k2")));
    let g = Gguf { version: 3, metadata, tensors: vec![], alignment: 32, data_start: 0 };
    let (tokenizer, _) = dsrun::gguf::tokenizer::load(&g).unwrap();
    for case in expected["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(tokenizer.encode(text, false).unwrap().get_ids(), want.as_slice(), "{text:?}");
    }
}
