//! One conformance harness for every backend (ggml's test-backend-ops is the model): plan ops
//! lowered by a backend through `runtime::Lab` and run on seeded random inputs, every weight
//! format, shapes that are multiples of no tile (rows 37 and 13, columns 300, 129 and 160,
//! 1 to 17 tokens), each against the CPU reference (`model`). `tests/gpu_kernels.rs`
//! instantiates it for wgpu, `tests/cuda.rs` for the CUDA emulator (and a device where there
//! is one); the attention layer's ops run through `attention_layer_matches_cpu` beside it.
//!
//! Tolerance: 1e-5 of each output's scale (1e-6 for the embedding and the combine, which sum
//! little or nothing). Both sides decode the weights exactly and sum in f32; only the order of
//! the sums differs (~1e-7 relative per term over a few hundred terms).
//! Ids (the router's, the argmax's) must be equal.

use super::{random, relative_error, router_cases};
use dsrun::backend::Backend;
use dsrun::model::math;
use dsrun::model::weights::Matrix;
use dsrun::plan::layout::CacheFormat;
use dsrun::plan::{ExpertMatrix, ExpertWeights, Op, Rows};
use dsrun::quant::DType;
use dsrun::runtime::Lab;
use dsrun::util::Choice;

pub const FORMATS: [DType; 6] = [DType::F32, DType::BF16, DType::F16, DType::F8E4M3, DType::Q8, DType::Q4];
/// GGUF's block formats (`block_formats`), as random blocks (`random_blocks`: every code
/// pattern): rows of whole blocks, so each shape's columns are rounded up to one.
pub const BLOCK_FORMATS: [DType; 19] = [
    DType::Q8_0,
    DType::Q4_0,
    DType::Q4_1,
    DType::Q5_0,
    DType::Q5_1,
    DType::Q2_K,
    DType::Q3_K,
    DType::Q4_K,
    DType::Q5_K,
    DType::Q6_K,
    DType::IQ4_NL,
    DType::IQ4_XS,
    DType::IQ2_XXS,
    DType::IQ2_XS,
    DType::IQ2_S,
    DType::IQ3_XXS,
    DType::IQ3_S,
    DType::IQ1_S,
    DType::IQ1_M,
];

/// `cols` as a matrix of `dtype` can have it: whole blocks for the block formats.
fn columns(dtype: DType, cols: usize) -> usize {
    match dtype.format().is_block() {
        true => cols.next_multiple_of(dtype.format().values as usize),
        false => cols,
    }
}

/// (rows, columns): rows not a multiple of 4 or of a 64-row tile; columns with a partial FP8
/// block and lane sweep (300), rows not word-aligned in 16-bit formats (129), rows of whole
/// 16-byte units (160), 16-byte loads per lane in every format with a partial sweep (512).
const SHAPES: [(usize, usize); 4] = [(37, 300), (13, 129), (37, 160), (37, 512)];
/// Token counts: decode, small batches (2, 3-4), prefill tiles and past them.
const TOKENS: [usize; 6] = [1, 2, 3, 5, 9, 17];

fn matrix(dtype: DType, rows: usize, cols: usize, seed: u64) -> Matrix {
    if dtype.format().is_block() {
        return super::random_blocks(&format!("w{seed}"), dtype, rows, cols, seed);
    }
    Matrix::from_values(&format!("w{seed}"), rows, cols, dtype, &random(seed, rows * cols), (128, 128))
}

fn close(what: &str, got: &[f32], want: &[f32]) {
    close_within(what, got, want, 1e-5);
}

/// Ops that sum a handful of terms (the combine) or none (the embedding's decode) are held to
/// 1e-6.
fn close_within(what: &str, got: &[f32], want: &[f32], tolerance: f32) {
    let err = relative_error(got, want);
    assert!(err <= tolerance, "{what}: relative error {err:e} over {tolerance:e}");
}

/// Runs `ops` as a step of `n` tokens.
fn run<B: Backend>(lab: &mut Lab<B>, ops: &[Op], n: usize) {
    let lowered = lab.lower(ops).unwrap();
    lab.run(&lowered, n as u32).unwrap();
}

/// Every op below, on `lab`'s backend; `what` names the backend in failures.
pub fn run_all<B: Backend>(lab: &mut Lab<B>, what: &str) {
    dense_and_moe(lab, what);
    attention(lab);
}

/// Every op but attention's: the matmul in every format, the embedding, norms, SwiGLU, the
/// combine, argmax, the router and the expert matmuls.
pub fn dense_and_moe<B: Backend>(lab: &mut Lab<B>, what: &str) {
    matmul(lab, what, &FORMATS);
    fp8_codes(lab, what);
    embed(lab, what, &FORMATS);
    rms_norm(lab, what);
    silu_mul(lab, what);
    moe_combine(lab, what);
    argmax(lab, what);
    router(lab, what);
    experts(lab, what, &FORMATS);
}

/// The weight ops (matmul, embedding, expert matmuls) in GGUF's block formats, for a backend
/// that runs them.
pub fn block_formats<B: Backend>(lab: &mut Lab<B>, what: &str) {
    matmul(lab, what, &BLOCK_FORMATS);
    embed(lab, what, &BLOCK_FORMATS);
    experts(lab, what, &BLOCK_FORMATS);
}

/// The attention layer of every fixture family (V3.2's with its indexer and sparse attention)
/// in every cache format, with the scratch the backend states in its target: a 70-token
/// prefill (past a tile and a lane sweep; the backend's most tokens per step where that is
/// fewer), single tokens and a short chunk; then, for three families, a context of 600
/// positions in steps that end mid-split and mid-tile.
pub fn attention<B: Backend>(lab: &mut Lab<B>) {
    attention_of(lab, &["v3_noaux", "v2_lite", "v3_fp8", "v3_yarn", "v32"]);
}

/// [`attention`] for some of the fixture families (a backend whose indexer is still to come
/// leaves out `v32`).
pub fn attention_of<B: Backend>(lab: &mut Lab<B>, families: &[&str]) {
    for &(cache, ..) in CacheFormat::ALL {
        for &family in families {
            let config = dsrun::config::ModelConfig::from_file(&super::fixture(family).join("config.json")).unwrap();
            let target = lab.target(&config, 80).unwrap();
            let steps = [70, 1, 1, 5].map(|n: usize| n.min(target.max_chunk));
            attention_layer_matches_cpu(lab, family, 80, &steps, |_, _| target.attention_scratch, cache);
        }
    }
    for family in ["v3_noaux", "v2_lite", "v32"].into_iter().filter(|f| families.contains(f)) {
        let config = dsrun::config::ModelConfig::from_file(&super::fixture(family).join("config.json")).unwrap();
        let target = lab.target(&config, 600).unwrap();
        let steps: Vec<usize> = [203, 1, 250, 1, 3, 1].iter().map(|&n| n.min(target.max_chunk)).collect();
        attention_layer_matches_cpu(lab, family, 600, &steps, |_, _| target.attention_scratch, CacheFormat::F32);
    }
}

/// The attention layer's tolerance with a `cache` latent cache, relative to the output's scale.
/// The reference stores its cache rounded as the kernels do (to nearest even), so an f32 cache
/// and most 16-bit values agree to the order of sums (1e-5, as every kernel); but a value that
/// lands within f32 noise of a rounding boundary can be stored one unit apart (f16 2^-11, bf16
/// 2^-8 of itself). Allowed: a quarter of a unit (measured on lavapipe: f16 1.6e-5, bf16 1.4e-4);
/// a kernel that rounds otherwise (always up, or not at all) moves most values and fails.
pub fn cache_tolerance(cache: CacheFormat) -> f32 {
    match cache {
        CacheFormat::F32 => 1e-5,
        CacheFormat::F16 => 2f32.powi(-11) / 4.0,
        CacheFormat::Bf16 => 2f32.powi(-8) / 4.0,
    }
}

/// `Matmul` in every format, shape and token count, plain, accumulating, and for the last row.
pub fn matmul<B: Backend>(lab: &mut Lab<B>, what: &str, formats: &[DType]) {
    for &dtype in formats {
        for (rows, cols) in SHAPES {
            let cols = columns(dtype, cols);
            let m = matrix(dtype, rows, cols, 1);
            let w = lab.matrix(&[&m], true).unwrap();
            for n in TOKENS {
                let x = random(2 + n as u64, n * cols);
                let base = random(3 + n as u64, n * rows);
                let xb = lab.input(&x).unwrap();
                for accumulate in [false, true] {
                    let y = lab.input(&base).unwrap();
                    run(lab, &[Op::Matmul { w, x: xb, y, rows: Rows::All, accumulate }], n);
                    let mut want = math::matmul(&m, &x, n);
                    if accumulate {
                        math::add_in_place(&mut want, &base);
                    }
                    close(&format!("{what}: matmul {dtype:?} {rows}x{cols} n={n} accumulate={accumulate}"), &lab.read_f32(y, n * rows).unwrap(), &want);
                }
                // The last position's row (a one-row input, as the head's RmsNorm leaves it).
                let y = lab.zeros(rows).unwrap();
                run(lab, &[Op::Matmul { w, x: xb, y, rows: Rows::Last, accumulate: false }], n);
                close(&format!("{what}: matmul {dtype:?} {rows}x{cols} last row of {n}"), &lab.read_f32(y, rows).unwrap(), &math::matmul(&m, &x[..cols], 1));
            }
        }
    }
}

/// FP8 e4m3: every code decodes exactly (subnormals, the largest values, both signs, NaN).
/// Row r holds code r in each of its four columns; with x = (1, 0, 0, 0) and (0, 0, 0, 1) the
/// outputs are the decoded values, through the first and last byte of a word.
pub fn fp8_codes<B: Backend>(lab: &mut Lab<B>, what: &str) {
    let (rows, cols) = (256, 4);
    let codes: Vec<u8> = (0..rows).flat_map(|c| [c as u8; 4]).collect();
    let scales = dsrun::model::weights::BlockScales { block_rows: 128, block_cols: 128, grid_cols: 1, values: vec![1.0, 1.0] };
    let m = Matrix { name: "fp8 codes".into(), rows, cols, dtype: DType::F8E4M3, data: dsrun::checkpoint::TensorBytes::from_vec(codes), scales: Some(scales) };
    let w = lab.matrix(&[&m], true).unwrap();
    for lane in [0usize, 3] {
        let mut x = vec![0f32; cols];
        x[lane] = 1.0;
        let (xb, y) = (lab.input(&x).unwrap(), lab.zeros(rows).unwrap());
        run(lab, &[Op::Matmul { w, x: xb, y, rows: Rows::All, accumulate: false }], 1);
        for (code, g) in lab.read_f32(y, rows).unwrap().into_iter().enumerate() {
            let want = dsrun::quant::fp8_e4m3_to_f32(code as u8);
            assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()) || (g == 0.0 && want == 0.0), "{what}: FP8 code {code:#04x} in byte {lane}: {g} vs {want}");
        }
    }
}

/// `Embed`: rows of a table in every format for the step's tokens (repeats, the last row).
pub fn embed<B: Backend>(lab: &mut Lab<B>, what: &str, formats: &[DType]) {
    for &dtype in formats {
        let (vocab, dim) = (37, columns(dtype, 160));
        let table = matrix(dtype, vocab, dim, 5);
        let w = lab.matrix(&[&table], true).unwrap();
        let tokens: Vec<u32> = vec![36, 0, 5, 5, 17];
        let tb = lab.zeros(tokens.len()).unwrap();
        lab.write_u32(tb, &tokens).unwrap();
        let out = lab.zeros(tokens.len() * dim).unwrap();
        run(lab, &[Op::Embed { table: w, tokens: tb, out }], tokens.len());
        close_within(&format!("{what}: embed {dtype:?}"), &lab.read_f32(out, tokens.len() * dim).unwrap(), &math::embed(&table, &tokens), 1e-6);
    }
}

/// `RmsNorm` of every row, and of the last row into row 0.
pub fn rms_norm<B: Backend>(lab: &mut Lab<B>, what: &str) {
    for (dim, n) in [(300, 5), (129, 1), (7168 / 16, 3)] {
        let x: Vec<f32> = random(7, n * dim).iter().map(|v| v * 3.0).collect();
        let weight = random(8, dim);
        let (xb, wb) = (lab.input(&x).unwrap(), lab.input(&weight).unwrap());
        let out = lab.zeros(n * dim).unwrap();
        run(lab, &[Op::RmsNorm { dim, eps: 1e-6, x: xb, weight: wb, out, rows: Rows::All }], n);
        let mut want = x.clone();
        math::rms_norm(&mut want, &weight, 1e-6);
        close(&format!("{what}: rmsnorm dim {dim} n={n}"), &lab.read_f32(out, n * dim).unwrap(), &want);
        let last = lab.zeros(dim).unwrap();
        run(lab, &[Op::RmsNorm { dim, eps: 1e-6, x: xb, weight: wb, out: last, rows: Rows::Last }], n);
        close(&format!("{what}: rmsnorm dim {dim}, last of {n}"), &lab.read_f32(last, dim).unwrap(), &want[(n - 1) * dim..]);
    }
}

/// `SiluMul` over a width that is no multiple of a workgroup.
pub fn silu_mul<B: Backend>(lab: &mut Lab<B>, what: &str) {
    let (width, n) = (333, 3);
    let (gate, up) = (random(9, n * width), random(10, n * width));
    let (gb, ub) = (lab.input(&gate).unwrap(), lab.input(&up).unwrap());
    run(lab, &[Op::SiluMul { width, gate: gb, up: ub }], n);
    let mut want = gate.clone();
    math::silu_mul(&mut want, &up);
    close(&format!("{what}: silu_mul"), &lab.read_f32(gb, n * width).unwrap(), &want);
}

/// `MoeCombine`: the routed outputs weighted, the shared expert's added, into the residual.
pub fn moe_combine<B: Backend>(lab: &mut Lab<B>, what: &str) {
    let (dim, k, n) = (130, 3, 4);
    let (outs, weights, shared, h) = (random(11, n * k * dim), random(12, n * k), random(13, n * dim), random(14, n * dim));
    for with_shared in [true, false] {
        let (ob, wb, sb, hb) = (lab.input(&outs).unwrap(), lab.input(&weights).unwrap(), lab.input(&shared).unwrap(), lab.input(&h).unwrap());
        run(lab, &[Op::MoeCombine { dim, k, expert_out: ob, weights: wb, shared: with_shared.then_some(sb), h: hb }], n);
        let mut want = h.clone();
        for t in 0..n {
            for i in 0..k {
                math::axpy(weights[t * k + i], &outs[(t * k + i) * dim..][..dim], &mut want[t * dim..][..dim]);
            }
            if with_shared {
                math::add_in_place(&mut want[t * dim..][..dim], &shared[t * dim..][..dim]);
            }
        }
        close_within(&format!("{what}: moe_combine shared={with_shared}"), &lab.read_f32(hb, n * dim).unwrap(), &want, 1e-6);
    }
}

/// `Argmax` of each row, ties to the lower index.
pub fn argmax<B: Backend>(lab: &mut Lab<B>, what: &str) {
    let (vocab, n) = (2049, 3);
    let mut logits = random(15, n * vocab);
    logits[vocab + 7] = 5.0;
    logits[vocab + 900] = 5.0;
    let lb = lab.input(&logits).unwrap();
    let ids = lab.zeros(n).unwrap();
    run(lab, &[Op::Argmax { vocab, logits: lb, ids }], n);
    let want: Vec<u32> = logits.chunks(vocab).map(|r| math::argmax(r) as u32).collect();
    assert_eq!(lab.read_u32(ids, n).unwrap(), want, "{what}: argmax");
    assert_eq!(want[1], 7, "the first of two maxima");
    // A row holding a NaN or an infinity is flagged, not given an index (the host names its
    // position).
    logits[vocab + 3] = f32::NAN;
    logits[2 * vocab + vocab - 1] = f32::INFINITY;
    lab.write(lb, &logits).unwrap();
    run(lab, &[Op::Argmax { vocab, logits: lb, ids }], n);
    assert_eq!(lab.read_u32(ids, n).unwrap(), vec![want[0], dsrun::model::NON_FINITE_ID, dsrun::model::NON_FINITE_ID], "{what}: argmax of non-finite rows");
}

/// `Router`: every scoring function and top-k method, with and without the correction bias,
/// a token whose logits all tie.
pub fn router<B: Backend>(lab: &mut Lab<B>, what: &str) {
    for case in router_cases() {
        let k = case.params.top_k;
        let lb = lab.input(&case.logits).unwrap();
        let bias = case.bias.as_ref().map(|b| lab.input(b).unwrap());
        let (ids, weights) = (lab.zeros(case.tokens * k).unwrap(), lab.zeros(case.tokens * k).unwrap());
        let op = Op::Router { params: case.params.clone(), experts: case.experts, logits: lb, bias, ids, weights, rows: Rows::All };
        run(lab, &[op], case.tokens);
        let (got_ids, got_weights) = (lab.read_u32(ids, case.tokens * k).unwrap(), lab.read_f32(weights, case.tokens * k).unwrap());
        case.check(&format!("{what}: router {:?}/{:?}", case.params.scoring, case.params.method), &got_ids, &got_weights);
    }
}

/// `GroupExperts` and `ExpertMatmul` over stacked experts in every format, per slot and
/// grouped, gate/up (k slots per token reading the token's row) and down (each slot its own).
pub fn experts<B: Backend>(lab: &mut Lab<B>, what: &str, formats: &[DType]) {
    // The grouping's buffers are the backend's, made with its target for a model's routing.
    let model = dsrun::model::Model::load(&super::fixture("v3_noaux")).unwrap();
    let c = &model.config;
    let target = lab.target(c, 32).unwrap();
    let (experts, k) = (c.n_routed_experts, c.num_experts_per_tok);
    for &dtype in formats {
        let (rows, cols) = (19, columns(dtype, 150));
        let stack: Vec<Matrix> = (0..experts).map(|e| matrix(dtype, rows, cols, 20 + e as u64)).collect();
        let w = lab.matrix(&stack.iter().collect::<Vec<_>>(), false).unwrap();
        for n in [1usize, 3, 9, 13] {
            // At 13 tokens expert 2 takes 11 of 26 slots: its group spans several tiles.
            let ids: Vec<u32> = match n {
                13 => (0..n * k).map(|s| if s % 5 < 2 { 2 } else { (s * 7 % experts) as u32 }).collect(),
                _ => (0..n * k).map(|s| ((s * 5 + 3) % experts) as u32).collect(),
            };
            let ib = lab.zeros(n * k).unwrap();
            lab.write_u32(ib, &ids).unwrap();
            for (matrix_kind, x_rows) in [(ExpertMatrix::Gate, n), (ExpertMatrix::Down, n * k)] {
                let x = random(30 + n as u64, x_rows * cols);
                let xb = lab.input(&x).unwrap();
                let want: Vec<f32> = (0..n * k)
                    .flat_map(|s| {
                        let row = s / matrix_kind.x_div(k);
                        math::matmul(&stack[ids[s] as usize], &x[row * cols..][..cols], 1)
                    })
                    .collect();
                for grouped in [false, true].into_iter().filter(|&g| !g || target.group_experts) {
                    let y = lab.zeros(n * k * rows).unwrap();
                    let mut ops = Vec::new();
                    if grouped {
                        ops.push(Op::GroupExperts { k, experts, rows: [rows, rows], ids: ib });
                    }
                    ops.push(Op::ExpertMatmul { matrix: matrix_kind, weights: ExpertWeights::Stack(w), k, x: xb, y, ids: ib, grouped });
                    run(lab, &ops, n);
                    close(&format!("{what}: expert matmul {dtype:?} {matrix_kind:?} n={n} grouped={grouped}"), &lab.read_f32(y, n * k * rows).unwrap(), &want);
                }
            }
        }
    }
}

/// One MLA attention layer (projections, latent store with norm and RoPE, absorbed attention,
/// output projection), as the plan writes it and `lab`'s backend lowers it, against the CPU
/// reference over `steps` (token counts) so the cache offsets and positions advance.
/// `scratch`: the words the backend's attention works in for a number of tokens; `cache`: the
/// latent cache's format (and the indexer's key cache's), which the reference rounds to as the
/// kernels do. Tolerance: [`cache_tolerance`].
pub fn attention_layer_matches_cpu<B: Backend>(lab: &mut Lab<B>, family: &str, capacity: usize, steps: &[usize], scratch: impl Fn(&dsrun::plan::MlaShape, usize) -> usize, cache: CacheFormat) {
    use super::{fixture, random};
    use dsrun::model::attention::{forward, AttentionCtx};
    use dsrun::model::rope::Rope;
    use dsrun::model::weights::QueryProjection;
    use dsrun::model::{AttentionMode, Model};
    use dsrun::plan::{AttentionBuffers, AttentionWeights, MlaShape, QueryWeights};

    let model = Model::load(&fixture(family)).unwrap();
    let c = &model.config;
    let w = &model.weights.layers[0].attention;
    let (d, heads) = (c.hidden_size, c.num_attention_heads);
    let max_n = steps.iter().copied().max().unwrap();
    let rope = Rope::new(c);
    let shape = MlaShape { cache, ..MlaShape::new(c, capacity, &rope) };
    let q = match &w.q {
        QueryProjection::LowRank { a, norm, b } => QueryWeights::LowRank { a: lab.matrix(&[a], true).unwrap(), norm: lab.input(norm).unwrap(), b: lab.matrix(&[b], true).unwrap(), rank: a.rows },
        QueryProjection::Direct(q) => QueryWeights::Direct(lab.matrix(&[q], true).unwrap()),
    };
    let weights = AttentionWeights {
        q,
        kv_a: lab.matrix(&[&w.kv_a], true).unwrap(),
        kv_norm: lab.input(&w.kv_norm).unwrap(),
        kv_b: lab.matrix(&[&w.kv_b], false).unwrap(),
        o: lab.matrix(&[&w.o], true).unwrap(),
        cache: lab.zeros(capacity * c.latent_dim()).unwrap(),
        indexer: w.indexer.as_ref().map(|ix| dsrun::plan::IndexerWeights {
            wq_b: lab.matrix(&[&ix.wq_b], true).unwrap(),
            wk: lab.matrix(&[&ix.wk], true).unwrap(),
            k_norm: lab.input(&ix.k_norm).unwrap(),
            k_norm_bias: lab.input(&ix.k_norm_bias).unwrap(),
            weights_proj: lab.matrix(&[&ix.weights_proj], true).unwrap(),
            cache: lab.zeros(capacity * ix.wk.rows).unwrap(),
        }),
    };
    let inv_freq = lab.input(&rope.inv_freq).unwrap();
    let mut zeros = |n: usize| lab.zeros(n).unwrap();
    let bufs = AttentionBuffers {
        x: zeros(max_n * d),
        q_lora: c.q_lora_rank.map(|r| (zeros(max_n * r), zeros(max_n * r))),
        q: zeros(max_n * heads * c.qk_head_dim()),
        kv: zeros(max_n * c.latent_dim()),
        q_lat: zeros(max_n * heads * c.kv_lora_rank),
        scratch: zeros(scratch(&shape, max_n)),
        o_lat: zeros(max_n * heads * c.kv_lora_rank),
        o: zeros(max_n * heads * c.v_head_dim),
        out: zeros(max_n * d),
        positions: zeros(2 * max_n),
        inv_freq,
        indexer: c.indexer.map(|ix| dsrun::plan::IndexerBuffers {
            keys: zeros(max_n * ix.head_dim),
            queries: zeros(max_n * ix.heads * ix.head_dim),
            weights: zeros(max_n * ix.heads),
            scores: zeros(max_n * capacity),
            selected: zeros(max_n * ix.topk),
            shape: dsrun::plan::IndexerShape { heads: ix.heads, dim: ix.head_dim, rope: c.qk_rope_head_dim, topk: ix.topk, ctx: capacity, rope_scale: rope.scale, cache },
        }),
    };
    let ops = lab.lower(&dsrun::plan::attention(&shape, &weights, &bufs)).unwrap();

    let ctx = AttentionCtx { config: c, rope: &rope, softmax_scale: c.softmax_scale() as f32, mode: AttentionMode::Absorbed, cache };
    let mut cpu_cache = Vec::new();
    let mut start = 0;
    for (step, &n) in steps.iter().enumerate() {
        let input = random(70 + step as u64, n * d);
        lab.write(bufs.x, &input).unwrap();
        lab.write(bufs.out, &vec![0f32; n * d]).unwrap();
        // One sequence, from cache row 0.
        let positions: Vec<u32> = (start..start + n).flat_map(|p| [p as u32, 0]).collect();
        lab.write_u32(bufs.positions, &positions).unwrap();
        lab.run(&ops, n as u32).unwrap();
        let got = lab.read_f32(bufs.out, n * d).unwrap();
        let want = forward(&ctx, w, &input, n, start, &mut cpu_cache);
        let err = relative_error(&got, &want);
        let what = format!("{}: {family} attention, {cache:?} cache, step {step} at position {start}", lab.backend.describe());
        let tolerance = cache_tolerance(cache);
        assert!(err <= tolerance, "{what}: relative error {err:e} over {tolerance:e}");
        start += n;
    }
}
