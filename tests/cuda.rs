//! The native CUDA backend (`--features cuda`): every plan op against the CPU reference through
//! the conformance harness (tests/common/conformance.rs), what only CUDA has (NVRTC builds, the
//! attention's forced splits, common.cuh's structs), and the whole model against transformers'
//! logits, on each CUDA runtime this machine has: an NVIDIA
//! device through the driver, and the CPU emulator of CUDA's execution model (needs a C++
//! compiler), which runs the same kernel sources and host code. A runtime that is missing is
//! reported on stderr with "NOT RUN"; the emulator's absence fails the suite (CI installs g++).
//!
//! Tolerances: kernels 1e-5 of the output's scale (exact weight decoding, f32 sums in another
//! order); whole-model logits 1e-3 of the largest reference logit, as tests/fixtures.rs.
#![cfg(feature = "cuda")]

mod common;
use dsrun::backend::cuda::nvrtc::compile;
use dsrun::backend::cuda::ops::AttentionSplit;
use dsrun::backend::cuda::{self, sources, CudaBackend, Device};
use dsrun::engine::{Engine, Steps};
use dsrun::model::{Logits, Model};
use dsrun::quant::QuantTarget;
use dsrun::runtime::CudaModel;
use dsrun::util::Choice;
use std::sync::Arc;

/// The devices to test on, named; missing ones are reported.
fn runtimes() -> Vec<Arc<Device>> {
    let mut found = vec![Arc::new(Device::emulator().expect("the CUDA emulator needs a C++ compiler (apt-get install g++)"))];
    match cuda::open(0) {
        Ok(rt) => found.push(Arc::new(rt)),
        Err(e) => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| common::skip("cuda (every runtime)", &format!("on an NVIDIA device (the emulator only): {e}"), true));
        }
    }
    found
}

#[test]
fn opening_a_device_names_it_or_says_why_not() {
    match cuda::open(0) {
        Ok(rt) => eprintln!("CUDA device: {}", rt.describe()),
        Err(e) => {
            let message = e.to_string();
            common::skip("opening_a_device_names_it_or_says_why_not", &message, true);
            assert!(message.contains("--gpu cuda") && (message.contains("driver") || message.contains("device")), "{message}");
        }
    }
}

#[test]
fn kernels_compile_with_nvrtc_for_hopper_and_older_gpus() {
    let common = dsrun::backend::cuda::device::COMMON_SOURCE;
    if !cuda::nvrtc_present() {
        common::skip("kernels_compile_with_nvrtc_for_hopper_and_older_gpus", "libnvrtc not found (pip install nvidia-cuda-nvrtc-cu12; put its lib folder on LD_LIBRARY_PATH)", false);
        let err = compile(sources::MATMUL, &[], "compute_90").expect_err("compiling without NVRTC fails").to_string();
        assert!(err.contains("NVRTC"), "{err}");
        return;
    }
    let router = [("EXPERTS", 256), ("TOP_K", 8), ("N_GROUP", 8), ("TOPK_GROUP", 4), ("SOFTMAX", 0), ("METHOD", 2), ("NORMALIZE", 1), ("HAS_BIAS", 1)];
    for arch in ["compute_80", "compute_90"] {
        for (source, names) in sources::ALL {
            for format in 0..dsrun::format::FORMATS.len() as u32 {
                // The latent cache's three formats ride along the weight formats.
                let mut defines = vec![("FORMAT", format), ("TILE", 8), ("LORA", 512), ("ROPE", 64), ("CACHE", format % 3)];
                defines.extend(router);
                let ptx = compile(&format!("{common}\n{source}"), &defines, arch).unwrap_or_else(|e| panic!("{names:?} {arch} format {format}: {e}")).to_src();
                for n in names {
                    assert!(ptx.contains(&format!(".entry {n}")), "{arch}: no {n} entry");
                }
                if *names == ["matmul", "embed"] {
                    // FP8 uses the hardware converter on sm_89+ only.
                    assert_eq!(ptx.contains("cvt.rn.f16x2.e4m3x2"), format == 3 && arch == "compute_90", "{arch} format {format}");
                }
            }
        }
    }
}

/// One MLA attention layer against the CPU reference over several steps (prefill, single
/// tokens, a short chunk), with the cache split into 24-position chunks so several splits are
/// live and merged.
/// The conformance harness (tests/common/conformance.rs) on each CUDA runtime.
#[test]
fn conformance_of_every_op_on_cuda() {
    for rt in runtimes() {
        let what = rt.describe();
        let mut lab = dsrun::runtime::Lab::<CudaBackend>::new(rt).unwrap();
        common::conformance::run_all(&mut lab, &what);
        common::conformance::block_formats(&mut lab, &what);
    }
}

#[test]
fn mla_attention_layer_matches_cpu_across_splits() {
    for rt in runtimes() {
        let mut lab = dsrun::runtime::Lab::<CudaBackend>::new(rt).unwrap();
        let split = AttentionSplit { chunk: 24, splits: 5 };
        lab.backend.attention_split = Some((split, split));
        for family in ["v3_noaux", "v2_lite", "v3_fp8", "v3_yarn", "v32"] {
            common::conformance::attention_layer_matches_cpu(&mut lab, family, 100, &[70, 1, 1, 20], |s, n| split.partial_floats(n, s.heads, s.lora), dsrun::plan::layout::CacheFormat::F32);
        }
    }
}

/// Every fixture family: prefill logits and token-by-token decode (a CUDA graph per step on a
/// device) against transformers, and the greedy id against the logits' argmax.
#[test]
fn whole_model_matches_transformers_on_every_family() {
    for rt_index in 0..runtimes().len() {
        for family in common::FAMILIES {
            let rt = runtimes().swap_remove(rt_index);
            let name = rt.describe();
            let dir = common::fixture(family);
            let g = common::golden(&dir);
            let model = Model::load(&dir).unwrap();
            let mut engine = CudaModel::new(rt, &model, g.tokens.len() + 1, QuantTarget::Keep).unwrap();
            let logits = engine.forward(&g.tokens, Logits::All).unwrap();
            eprintln!("{name}: {family}: relative error {:e}", common::relative_error(&logits, &g.logits));
            common::assert_logits_match(&format!("{name} {family} prefill"), &logits, &g.logits, g.vocab, 1e-3);

            engine.reset();
            let mut decoded = engine.forward(&g.tokens[..5], Logits::All).unwrap();
            for &t in &g.tokens[5..] {
                decoded.extend(engine.forward(&[t], Logits::All).unwrap());
            }
            common::assert_logits_match(&format!("{name} {family} decode"), &decoded, &g.logits, g.vocab, 1e-3);

            engine.reset();
            let greedy = engine.forward_greedy(&g.tokens).unwrap();
            let last = &g.logits[(g.tokens.len() - 1) * g.vocab..];
            assert_eq!(greedy as usize, common::argmax(last), "{name} {family}: greedy id");
        }
    }
}

/// The 16-bit latent caches on CUDA (and V3.2's index key caches, in the same format):
/// logits against transformers' within the rounding a 16-bit cache adds (f16 2e-3, bf16 2e-2
/// of the logits' scale, measured ~3-10x below), and the greedy choice unchanged at every
/// position.
#[test]
fn sixteen_bit_latent_caches_stay_close_to_transformers() {
    use dsrun::plan::layout::CacheFormat;
    for (rt_index, family) in (0..runtimes().len()).flat_map(|i| [(i, "v3_noaux"), (i, "v32")]) {
        let dir = common::fixture(family);
        let g = common::golden(&dir);
        let model = Model::load(&dir).unwrap();
        for (cache, tolerance) in [(CacheFormat::F16, 2e-3), (CacheFormat::Bf16, 2e-2)] {
            let options = dsrun::plan::budget::GpuOptions { kv_cache: cache, ..Default::default() };
            let mut engine = CudaModel::with_options(runtimes().swap_remove(rt_index), &model, g.tokens.len(), &options).unwrap();
            let mut logits = engine.forward(&g.tokens[..5], Logits::All).unwrap();
            for &t in &g.tokens[5..] {
                logits.extend(engine.forward(&[t], Logits::All).unwrap());
            }
            let err = common::relative_error(&logits, &g.logits);
            eprintln!("{} {family} --kv-cache {}: relative error {err:e}", engine.device_name(), cache.name());
            assert!(err <= tolerance, "--kv-cache {}: relative error {err:e}", cache.name());
            let argmaxes = |l: &[f32]| l.chunks(g.vocab).map(common::argmax).collect::<Vec<_>>();
            assert_eq!(argmaxes(&logits), argmaxes(&g.logits), "--kv-cache {}: greedy choices", cache.name());
        }
    }
}

/// Continuous batching on CUDA: sequences decoded together give each one's logits alone (see
/// common::batched_decode_matches_alone). Bitwise at the test's short context, where one
/// attention split covers the cache; beyond 256 positions a multi-token step splits the cache
/// more coarsely than a single-token one, and the merge rounds differently (within 1e-3).
#[test]
fn batched_decode_matches_each_sequence_alone() {
    for rt_index in 0..runtimes().len() {
        for family in ["v3_noaux", "v2_lite"] {
            let model = Model::load(&common::fixture(family)).unwrap();
            let capacity = 9 + common::BATCH_STEPS + 1;
            let options = dsrun::plan::budget::GpuOptions { sequences: common::BATCH_ORDER.len(), ..Default::default() };
            let mut batched = CudaModel::with_options(runtimes().swap_remove(rt_index), &model, capacity, &options).unwrap();
            let mut alone = CudaModel::new(runtimes().swap_remove(rt_index), &model, capacity, QuantTarget::Keep).unwrap();
            let mut cpu = dsrun::engine::CpuEngine::new(Model::load(&common::fixture(family)).unwrap(), capacity);
            let what = format!("{} {family}", batched.device_name());
            common::batched_decode_matches_alone(&what, &mut batched, &mut alone, &mut cpu);
        }
    }
}

/// Expert streaming (`--gpu-mem`) on CUDA: with routed experts in a device slot cache smaller
/// than the model, logits equal the all-resident path's bit for bit (the same kernel reads the
/// same weights from a slot instead of the stack; see tests/expert_streaming.rs). Prefill of
/// half the tokens, then decode one by one, twice (cold and warm cache).
#[test]
fn streamed_experts_give_the_all_resident_logits() {
    use dsrun::plan::budget::Eviction;
    use dsrun::plan::budget::{ExpertPlacement, GpuMem, GpuOptions, Prefetch};
    for rt_index in 0..runtimes().len() {
        for family in ["v2_lite", "v3_fp8"] {
            let dir = common::fixture(family);
            let g = common::golden(&dir);
            let model = Model::load(&dir).unwrap();
            let mut resident = CudaModel::new(runtimes().swap_remove(rt_index), &model, g.tokens.len(), QuantTarget::Keep).unwrap();
            assert_eq!(resident.expert_slots(), None);
            let want = common::prefill_then_decode_twice(&mut resident, &g.tokens);
            let plan = resident.memory_plan();
            let budgets = [("25%", GpuMem::ExpertShare(0.25), Eviction::Lru, Prefetch::On), ("minimum", GpuMem::Bytes(plan.minimum()), Eviction::Lfu, Prefetch::Off)];
            for (name, gpu_mem, eviction, prefetch) in budgets {
                let options = GpuOptions { gpu_mem, eviction, prefetch, placement: ExpertPlacement::Stream, ..Default::default() };
                let mut streamed = CudaModel::with_options(runtimes().swap_remove(rt_index), &model, g.tokens.len(), &options).unwrap();
                let slots = streamed.expert_slots().expect("a budget below all-resident streams");
                let got = common::prefill_then_decode_twice(&mut streamed, &g.tokens);
                let what = format!("{}: {family} at {name} ({slots} slots)", streamed.device_name());
                assert_eq!(got.len(), want.len());
                if let Some(i) = got.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits()) {
                    panic!("{what}: logit {i} is {} streamed, {} all-resident", got[i], want[i]);
                }
                let c = streamed.stream_counters().unwrap();
                assert!(c.misses > 0 && c.hits > 0, "{what}: {c:?}");
                if name == "minimum" {
                    assert_eq!(slots as u64, plan.top_k);
                    assert!(c.rounds > c.syncs, "{what}: prefill ran in one round per layer: {c:?}");
                }
                assert_eq!(c.predicted > 0, prefetch == Prefetch::On, "{what}: guesses made: {c:?}");
            }
        }
    }
}

/// Hybrid placement on CUDA: routed experts of every MoE layer (`--cpu-moe`), or the first
/// one's (`--n-cpu-moe 1`), computed by the CPU backend on the host, the rest on the device;
/// or, under a budget for half a layer's experts, the last layer split between the device's
/// slot pools and the host; or a prompt chunk's most used experts uploaded to staging slots;
/// logits within 1e-3 of transformers', as every backend's.
#[test]
fn hybrid_placement_matches_transformers() {
    use dsrun::plan::budget::{GpuMem, GpuOptions};
    for rt_index in 0..runtimes().len() {
        for family in common::FAMILIES {
            let dir = common::fixture(family);
            let g = common::golden(&dir);
            let model = Model::load(&dir).unwrap();
            let half_a_layer = GpuMem::ExpertShare(0.5 / model.weights.moe_layers().len() as f64);
            let placements = [
                ("--cpu-moe", GpuOptions { cpu_moe: usize::MAX, ..Default::default() }),
                ("--n-cpu-moe 1", GpuOptions { cpu_moe: 1, ..Default::default() }),
                ("split", GpuOptions { gpu_mem: half_a_layer, ..Default::default() }),
                ("prompt uploads", GpuOptions { cpu_moe: usize::MAX, prompt_uploads: dsrun::plan::budget::PromptUploads::On, ..Default::default() }),
            ];
            for (name, options) in placements {
                let mut hybrid = CudaModel::with_options(runtimes().swap_remove(rt_index), &model, g.tokens.len(), &options).unwrap();
                assert!(hybrid.host_layers().is_some());
                assert_eq!(hybrid.split_experts().is_some(), name == "split");
                let what = format!("{}: {family}, {name}", hybrid.device_name());
                let got = common::prefill_then_decode_twice(&mut hybrid, &g.tokens);
                common::assert_logits_match(&what, &got[..g.logits.len()], &g.logits, g.vocab, 1e-3);
                assert_eq!(hybrid.host_counters().unwrap().uploads > 0, name == "prompt uploads", "{what}");
            }
        }
    }
}

/// The MTP layer on CUDA: draft logits against the torch reference, and greedy speculative
/// decoding (2 drafts per step) token for token equal to plain greedy decoding.
#[test]
fn mtp_drafts_match_the_reference_and_keep_greedy_output() {
    for rt_index in 0..runtimes().len() {
        for family in common::MTP_FAMILIES {
            let rt = runtimes().swap_remove(rt_index);
            let name = rt.describe();
            let dir = common::fixture(family);
            let g = common::golden_mtp(&dir).unwrap();
            let model = Model::load(&dir).unwrap();
            let n = g.tokens.len();
            let options = dsrun::plan::budget::GpuOptions { mtp: true, ..Default::default() };
            let mut engine = CudaModel::with_options(rt.clone(), &model, n + 24, &options).unwrap();
            let mut drafts = Vec::new();
            engine.forward_keep(0, &g.tokens[..1], Logits::Last).unwrap();
            for i in 0..n - 1 {
                drafts.extend(engine.draft(0, &g.tokens[i + 1..i + 2]).unwrap());
                if i + 2 < n {
                    engine.forward_keep(0, &g.tokens[i + 1..i + 2], Logits::Last).unwrap();
                }
            }
            common::assert_logits_match(&format!("{name} {family} MTP drafts"), &drafts, &g.logits, model.config.vocab_size, 1e-3);

            engine.reset();
            let prompt = &g.tokens[..6];
            let mut plain = vec![engine.forward_greedy(prompt).unwrap()];
            while plain.len() < 24 {
                let last = *plain.last().unwrap();
                plain.push(engine.forward_greedy(&[last]).unwrap());
            }
            engine.reset();
            let first = engine.forward_keep(0, prompt, Logits::Last).unwrap();
            let mut got = vec![common::argmax(&first) as u32];
            let mut history = prompt.to_vec();
            history.push(got[0]);
            let mut stats = dsrun::speculative::SpecStats::default();
            got.extend(dsrun::speculative::greedy(&mut engine, 0, &mut history, 0, plain.len() - 1, 2, &mut stats).unwrap());
            assert_eq!(got, plain, "{name} {family}: speculative greedy differs from plain greedy");
        }
    }
}

/// common.cuh's `Step` and `WeightLayout` as the CUDA compiler lays them out (sizes and field
/// offsets read back from a kernel, on the emulator and on a device where there is one) are the
/// host's `StepValues` and `WeightLayout`, which the runtime writes byte for byte.
#[test]
fn host_structs_match_common_cuh() {
    use dsrun::backend::StepValues;
    use dsrun::plan::layout::WeightLayout;
    use std::mem::{offset_of, size_of};
    const PROBE: &str = r#"
#define OFFSET(s, f) ((u32)__builtin_offsetof(s, f))
extern "C" __global__ void layout_probe(u32* out) {
    u32 v[] = {
        (u32)sizeof(Step), OFFSET(Step, n_tokens), OFFSET(Step, logits_row0),
        (u32)sizeof(WeightLayout), OFFSET(WeightLayout, rows), OFFSET(WeightLayout, cols), OFFSET(WeightLayout, expert_stride),
        OFFSET(WeightLayout, scale_expert_stride), OFFSET(WeightLayout, grid_cols), OFFSET(WeightLayout, block_rows),
        OFFSET(WeightLayout, block_cols), OFFSET(WeightLayout, row0), OFFSET(WeightLayout, total_rows),
    };
    for (u32 i = 0; i < sizeof(v) / sizeof(v[0]); i++) out[i] = v[i];
}
"#;
    let host = [
        size_of::<StepValues>(),
        offset_of!(StepValues, n_tokens),
        offset_of!(StepValues, logits_row0),
        size_of::<WeightLayout>(),
        offset_of!(WeightLayout, rows),
        offset_of!(WeightLayout, cols),
        offset_of!(WeightLayout, expert_stride),
        offset_of!(WeightLayout, scale_expert_stride),
        offset_of!(WeightLayout, grid_cols),
        offset_of!(WeightLayout, block_rows),
        offset_of!(WeightLayout, block_cols),
        offset_of!(WeightLayout, row0),
        offset_of!(WeightLayout, total_rows),
    ]
    .map(|x| x as u32);
    for rt in runtimes() {
        let probe = rt.kernels(PROBE, &[], &["layout_probe"]).unwrap().remove(0);
        let out = rt.alloc(host.len() * 4).unwrap();
        rt.launch_args(&probe, [1, 1, 1], [1, 1, 1], &[out.into()]).unwrap();
        rt.synchronize().unwrap();
        let mut bytes = vec![0u8; host.len() * 4];
        rt.read(&out, 0, &mut bytes).unwrap();
        let device: Vec<u32> = bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        assert_eq!(device, host, "{}: [sizeof(Step), its offsets, sizeof(WeightLayout), its offsets] in common.cuh vs the host's", rt.describe());
    }
}

/// GGUF files from llama.cpp's converter (tests/gguf.rs has the rest): both MLA layouts, on
/// each CUDA runtime, against the families' transformers logits; llama-quantize's Q8_0, Q4_K_M
/// and IQ2_XXS files (their blocks decoded in the kernels) against transformers on gguf-py's
/// dequantisation of them.
#[test]
fn gguf_models_match_transformers() {
    for rt_index in 0..runtimes().len() {
        for (file, family) in [("v3_noaux-f32", "v3_noaux"), ("v3_noaux-kvb-f32", "v3_noaux"), ("v2_lite-f32", "v2_lite")] {
            let rt = runtimes().swap_remove(rt_index);
            let name = rt.describe();
            let g = common::golden(&common::fixture(family));
            let model = dsrun::builder::EngineBuilder::open(common::fixture("gguf").join(format!("{file}.gguf"))).unwrap().model().unwrap();
            let mut engine = CudaModel::new(rt, &model, g.tokens.len(), QuantTarget::Keep).unwrap();
            let logits = engine.forward(&g.tokens, Logits::All).unwrap();
            common::assert_logits_match(&format!("{name} {file}"), &logits, &g.logits, g.vocab, 1e-3);
        }
        for file in ["v3_noaux-q8_0", "kq-q4_k_m", "kq-iq2_xxs"] {
            let rt = runtimes().swap_remove(rt_index);
            let name = rt.describe();
            let (tokens, want) = common::golden_of(file);
            let model = dsrun::builder::EngineBuilder::open(common::fixture("gguf").join(format!("{file}.gguf"))).unwrap().model().unwrap();
            let mut engine = CudaModel::new(rt, &model, tokens.len(), QuantTarget::Keep).unwrap();
            let logits = engine.forward(&tokens, Logits::All).unwrap();
            common::assert_logits_match(&format!("{name} {file}"), &logits, &want, want.len() / tokens.len(), 1e-3);
        }
    }
}

/// Expert parallelism over 4 CUDA devices of one process (4 emulators; on a machine with an
/// NVIDIA GPU, 4 contexts of device 0 too), the partial sums all-reduced in host memory: logits
/// within 1e-5 of one device's (the routed sum regrouped by rank), within 1e-3 of transformers',
/// greedy output token for token.
#[test]
fn expert_parallel_over_four_devices() {
    use dsrun::plan::budget::GpuOptions;
    use dsrun::runtime::comm::Communicator;
    use dsrun::runtime::Leader;
    const WORLD: usize = 4;
    let kinds: Vec<(&str, fn() -> dsrun::Result<Device>)> = {
        let mut kinds: Vec<(&str, fn() -> dsrun::Result<Device>)> = vec![("emulator", Device::emulator)];
        if cuda::open(0).is_ok() {
            kinds.push(("device 0", || cuda::open(0)));
        }
        kinds
    };
    for (kind, open) in kinds {
        for family in ["v3_noaux", "v2_lite", "v3_fp8"] {
            let dir = common::fixture(family);
            let g = common::golden(&dir);
            let model = Model::load(&dir).unwrap();
            let capacity = g.tokens.len() + 16;
            let mut one = CudaModel::new(Arc::new(open().unwrap()), &model, capacity, QuantTarget::Keep).unwrap();
            let want = common::prefill_then_decode_twice(&mut one, &g.tokens);
            let experts: Vec<usize> = model.weights.routed_layers(false).iter().map(|m| m.experts.len()).collect();
            let shards = dsrun::plan::shard::shard_experts(&experts, &[1.0; WORLD], None).unwrap();
            let mut divided = Leader::in_process(WORLD, |rank, comm: Arc<dyn Communicator>| {
                let options = GpuOptions { shard: Some(Arc::new(shards[rank].clone())), ..Default::default() };
                CudaModel::load_rank(Arc::new(open()?), &model, capacity, &options, comm, &dsrun::util::Silent)
            })
            .unwrap();
            let what = format!("{kind}: {family} over {WORLD} devices");
            let got = common::prefill_then_decode_twice(&mut divided, &g.tokens);
            let err = common::relative_error(&got, &want);
            assert!(err <= 1e-5, "{what}: {err:e} from one device");
            common::assert_logits_match(&what, &got[..g.logits.len()], &g.logits, g.vocab, 1e-3);
            let greedy = |engine: &mut dyn Engine| {
                engine.reset();
                common::greedy_tokens(engine, &g.tokens[..4], 12)
            };
            assert_eq!(greedy(&mut divided), greedy(&mut one), "{what}: greedy output");
        }
    }
}

/// NCCL: loaded where it is installed and refused by name where it is not (or where there is no
/// NVIDIA driver); with a GPU, a one-rank job's all-reduce through it returns its input.
#[test]
fn nccl_loads_or_says_what_is_missing() {
    use dsrun::runtime::comm::{Communicator, Launch, Nccl};
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let launch = Launch { rank: 0, world: 1, local_rank: 0, master: format!("127.0.0.1:{port}") };
    match Nccl::connect(&launch) {
        Ok(nccl) => {
            let mut values = vec![1.5f32, -2.0, 3.25];
            nccl.all_reduce_sum(&mut values).unwrap();
            assert_eq!(values, [1.5, -2.0, 3.25], "a one-rank all-reduce");
            eprintln!("NCCL: {}", nccl.describe());
        }
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("libnccl") || e.contains("NVIDIA driver") || e.contains("NCCL rank 0"), "an unclear refusal: {e}");
            common::skip("nccl_loads_or_says_what_is_missing", &format!("NCCL's all-reduce (not loadable here: {e})"), true);
        }
    }
}
