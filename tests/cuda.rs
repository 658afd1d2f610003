//! The native CUDA backend (`--features cuda`): every kernel against the CPU reference, and the
//! whole model against transformers' logits, on each CUDA runtime this machine has: an NVIDIA
//! device through the driver, and the CPU emulator of CUDA's execution model (needs a C++
//! compiler), which runs the same kernel sources and host code. A runtime that is missing is
//! reported on stderr with "NOT RUN"; the emulator's absence fails the suite (CI installs g++).
//!
//! Tolerances: kernels 1e-5 of the output's scale (exact weight decoding, f32 sums in another
//! order); whole-model logits 1e-3 of the largest reference logit, as tests/fixtures.rs.
#![cfg(feature = "cuda")]

mod common;
use common::random;

use dsrun::backend::cuda::ops::{AttentionSplit, CudaMatrix, Ops};
use dsrun::backend::cuda::{self, compile, sources, Buffer, CudaBackend, Device};
use dsrun::engine::{Engine, Steps};
use dsrun::model::math;
use dsrun::model::weights::Matrix;
use dsrun::model::{Logits, Model};
use dsrun::plan::layout::MatmulShape;
use dsrun::quant::{DType, QuantTarget};
use dsrun::runtime::CudaModel;
use dsrun::util::Choice;
use std::sync::Arc;

const FORMATS: [DType; 6] = [DType::F32, DType::BF16, DType::F16, DType::F8E4M3, DType::Q8, DType::Q4];

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

fn matrix(dtype: DType, rows: usize, cols: usize, seed: u64) -> Matrix {
    Matrix::from_values(&format!("w{seed}"), rows, cols, dtype, &random(seed, rows * cols), (128, 128))
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tolerance: f32) {
    let err = common::relative_error(got, want);
    assert!(err <= tolerance, "{what}: relative error {err:e}");
}

struct Harness {
    ops: Ops,
}

impl Harness {
    fn new(rt: &Arc<Device>) -> Harness {
        Harness { ops: Ops::new(rt.clone()).unwrap() }
    }
    fn rt(&self) -> &Device {
        &self.ops.rt
    }
    fn f32s(&self, values: &[f32]) -> Buffer {
        self.rt().upload(values).unwrap()
    }
    fn zeros(&self, n: usize) -> Buffer {
        self.rt().alloc(n * 4).unwrap()
    }
    fn set_step(&self, n: u32) {
        self.rt().write(&self.ops.step, 0, bytemuck::cast_slice(&[n, n - 1, 0, 0])).unwrap();
    }
    fn run(&self, ops: &[dsrun::backend::cuda::ops::Op], n: u32) {
        for op in ops {
            self.rt().launch(&op.launch(n)).unwrap();
        }
    }
    fn read(&self, b: &Buffer, n: usize) -> Vec<f32> {
        self.rt().read_f32(b, n).unwrap()
    }
    fn read_u32(&self, b: &Buffer, n: usize) -> Vec<u32> {
        let mut bytes = vec![0u8; n * 4];
        self.rt().read(b, 0, &mut bytes).unwrap();
        bytemuck::pod_collect_to_vec(&bytes)
    }
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
            for format in 0..6u32 {
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

#[test]
fn matmul_every_format_and_token_count() {
    // 37 rows: not a multiple of the 8 rows per block; 512 columns: 16-byte loads per lane
    // (every format) with a partial lane sweep for most; 300 columns: four at a time, partial
    // FP8 blocks; 129 columns: the element-at-a-time path.
    let cases = [(37, 512, 1usize), (37, 512, 9), (37, 300, 1), (37, 300, 3), (37, 300, 8), (37, 300, 13), (13, 129, 1), (13, 129, 9)];
    for rt in runtimes() {
        let h = Harness::new(&rt);
        for dtype in FORMATS {
            for (rows, cols, n) in cases {
                let m = matrix(dtype, rows, cols, 1);
                let w = CudaMatrix::upload(&rt, &[&m]).unwrap();
                let x = random(2, n * cols);
                let (xb, yb) = (h.f32s(&x), h.zeros(n * rows));
                h.set_step(n as u32);
                h.run(&[h.ops.matmul(&w, &xb, &yb, false).unwrap()], n as u32);
                let what = format!("{}: {dtype:?} {rows}x{cols}, {n} tokens", rt.describe());
                assert_close(&what, &h.read(&yb, n * rows), &math::matmul(&m, &x, n), 1e-5);

                // Accumulating into y, and the last position only.
                h.run(&[h.ops.matmul(&w, &xb, &yb, true).unwrap()], n as u32);
                let twice: Vec<f32> = math::matmul(&m, &x, n).iter().map(|v| 2.0 * v).collect();
                assert_close(&format!("{what}, accumulated"), &h.read(&yb, n * rows), &twice, 1e-5);
                let last = MatmulShape { fixed_slots: Some(1), ..MatmulShape::PLAIN };
                let (lx, ly) = (h.f32s(&x[(n - 1) * cols..]), h.zeros(rows));
                h.run(&[h.ops.matmul_shaped(&w, last, &lx, &ly, None).unwrap()], n as u32);
                assert_close(&format!("{what}, last row"), &h.read(&ly, rows), &math::matmul(&m, &x[(n - 1) * cols..], 1), 1e-5);
            }
        }
    }
}

/// Routed experts read their ids on the device: one slot per block for a single token, and
/// slots grouped by expert (tiles of up to 8 slots of one expert, an expert's slots split over
/// several tiles when it has more) for several.
#[test]
fn expert_matmul_reads_expert_ids_on_the_device() {
    use dsrun::backend::cuda::ops::ExpertGroups;
    for rt in runtimes() {
        let h = Harness::new(&rt);
        let (experts, rows, cols, k) = (5, 24, 256, 2);
        let groups = ExpertGroups::new(&rt, k, experts, 13).unwrap();
        for dtype in FORMATS {
            let ms: Vec<Matrix> = (0..experts).map(|e| matrix(dtype, rows, cols, 10 + e as u64)).collect();
            let w = CudaMatrix::upload(&rt, &ms.iter().collect::<Vec<_>>()).unwrap();
            for n in [1usize, 3, 13] {
                // Expert 2 takes 11 of 26 slots at 13 tokens: two tiles of one expert.
                let ids: Vec<u32> = (0..n * k).map(|s| if s % 5 < 2 { 2 } else { (s * 7 % experts) as u32 }).collect();
                let x = random(3, n * cols);
                let (xb, yb, ib) = (h.f32s(&x), h.zeros(n * k * rows), rt.upload(&ids).unwrap());
                h.set_step(n as u32);
                h.run(&[h.ops.group_by_expert(&ib, &groups).unwrap(), h.ops.expert_matmul(&w, k as u32, k as u32, &xb, &yb, &ib, Some(&groups)).unwrap()], n as u32);
                let got = h.read(&yb, n * k * rows);
                for (s, &e) in ids.iter().enumerate() {
                    let want = math::matmul(&ms[e as usize], &x[(s / k) * cols..][..cols], 1);
                    assert_close(&format!("{}: {dtype:?} {n} tokens, slot {s}", rt.describe()), &got[s * rows..][..rows], &want, 1e-5);
                }
            }
        }
    }
}

#[test]
fn norms_elementwise_ops_and_embedding() {
    for rt in runtimes() {
        let h = Harness::new(&rt);
        let (n, dim) = (3, 300);
        let x = random(20, n * dim);
        let w = random(21, dim);
        let (xb, wb, yb) = (h.f32s(&x), h.f32s(&w), h.zeros(n * dim));
        h.set_step(n as u32);
        h.run(&[h.ops.rmsnorm(dim, 1e-6, &xb, &wb, &yb, false).unwrap()], n as u32);
        let mut want = x.clone();
        want.chunks_mut(dim).for_each(|row| math::rms_norm(row, &w, 1e-6));
        assert_close("rmsnorm", &h.read(&yb, n * dim), &want, 1e-5);

        let up = random(22, n * dim);
        let ub = h.f32s(&up);
        h.run(&[h.ops.silu_mul(dim, &xb, &ub).unwrap()], n as u32);
        let mut want = x.clone();
        math::silu_mul(&mut want, &up);
        assert_close("silu_mul", &h.read(&xb, n * dim), &want, 1e-5);

        for dtype in FORMATS {
            let table = matrix(dtype, 50, 40, 23);
            let t = CudaMatrix::upload(&rt, &[&table]).unwrap();
            let tokens = [0u32, 49, 17];
            let (tb, ob) = (rt.upload(&tokens).unwrap(), h.zeros(3 * 40));
            h.run(&[h.ops.embed(&t, &tb, &ob).unwrap()], 3);
            assert_close(&format!("{dtype:?} embed"), &h.read(&ob, 3 * 40), &math::embed(&table, &tokens), 1e-6);
        }

        // argmax over rows with ties (the first wins) and moe_combine with a shared expert.
        let mut logits = random(24, 2 * 1000);
        logits[1000 + 7] = 9.0;
        logits[1000 + 900] = 9.0;
        let (lb, ib) = (h.f32s(&logits), h.zeros(2));
        h.run(&[h.ops.argmax(1000, &lb, &ib).unwrap()], 2);
        assert_eq!(h.read_u32(&ib, 2), vec![common::argmax(&logits[..1000]) as u32, 7]);
        // A row holding a NaN or an infinity is flagged, not given an index.
        logits[333] = f32::NAN;
        logits[1000 + 5] = f32::NEG_INFINITY;
        let lb = h.f32s(&logits);
        h.run(&[h.ops.argmax(1000, &lb, &ib).unwrap()], 2);
        assert_eq!(h.read_u32(&ib, 2), vec![dsrun::model::NON_FINITE_ID; 2]);
        let (k, d) = (2, 40);
        let (eo, rw, sh, hh) = (random(25, n * k * d), random(26, n * k), random(27, n * d), random(28, n * d));
        let hb = h.f32s(&hh);
        h.run(&[h.ops.moe_combine(d, k, &h.f32s(&eo), &h.f32s(&rw), Some(&h.f32s(&sh)), &hb).unwrap()], n as u32);
        let want: Vec<f32> = (0..n * d)
            .map(|i| {
                let (t, c) = (i / d, i % d);
                hh[i] + (0..k).map(|j| rw[t * k + j] * eo[(t * k + j) * d + c]).sum::<f32>() + sh[i]
            })
            .collect();
        assert_close("moe_combine", &h.read(&hb, n * d), &want, 1e-6);
    }
}

#[test]
fn router_matches_the_cpu_rules() {
    for rt in runtimes() {
        let h = Harness::new(&rt);
        for (i, case) in common::router_cases().iter().enumerate() {
            let (n, top_k) = (case.tokens, case.params.top_k);
            let lb = h.f32s(&case.logits);
            let bb = case.bias.as_ref().map(|b| h.f32s(b));
            let (ib, wb) = (h.zeros(n * top_k), h.zeros(n * top_k));
            h.set_step(n as u32);
            h.run(&[h.ops.router(&case.params, case.experts, &lb, bb.as_ref(), &ib, &wb, false).unwrap()], n as u32);
            case.check(&format!("{}: config {i}", rt.describe()), &h.read_u32(&ib, n * top_k), &h.read(&wb, n * top_k));
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
    use dsrun::plan::budget::{GpuMem, GpuOptions, Prefetch};
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
                let options = GpuOptions { gpu_mem, eviction, prefetch, ..Default::default() };
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
