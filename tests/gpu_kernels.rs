//! The wgpu kernels: every plan op through the conformance harness (tests/common/conformance.rs)
//! in three adapter settings, and what only wgpu has: its kernel variants (16-byte loads, the
//! f16-arithmetic matmul, the tiled prefill GEMM, fixed and listed slots, the one-subgroup
//! attention), expert slot pools, matrices split at the binding limit, its attention split.
//! Seeded random inputs, shapes that are not multiples of the workgroup (64), row block (4),
//! token tile (8) or FP8 block (128). Runs on whatever adapter wgpu finds (CI: lavapipe); none
//! is a failure.
//!
//! Tolerance: 1e-5 of the output's scale. Both sides decode weights exactly and sum in f32; only
//! the summation order differs (~1e-7 relative per term over a few hundred terms).

mod common;
use common::random;
use dsrun::backend::wgpu::kernels::Kernel;
use dsrun::backend::wgpu::lower::{listed_grid, matmul_tiles, Builder, ExpertMatrix, MatmulShape};
use dsrun::backend::wgpu::runner::OpRunner;
use dsrun::backend::wgpu::{
    context,
    tensors::{GpuMatrix, SlotMatrix},
};
use dsrun::device::GpuChoice;
use dsrun::model::math;
use dsrun::model::weights::Matrix;
use dsrun::quant::DType;
use wgpu::util::DeviceExt;

const FORMATS: [DType; 6] = [DType::F32, DType::BF16, DType::F16, DType::F8E4M3, DType::Q8, DType::Q4];

fn runner() -> OpRunner {
    let ctx = context::open(GpuChoice::Auto).expect("a wgpu adapter (on Debian: apt-get install mesa-vulkan-drivers)");
    OpRunner::new(ctx).unwrap()
}

fn matrix(dtype: DType, rows: usize, cols: usize, seed: u64) -> Matrix {
    Matrix::from_values(&format!("w{seed}"), rows, cols, dtype, &random(seed, rows * cols), (128, 128))
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    let err = common::relative_error(got, want);
    assert!(err <= 1e-5, "{what}: relative error {err:e}");
}

/// GPU shapes read 16 bytes per lane where a row is whole 16-byte units (every format but q4,
/// whose rows the harness makes 160 and 512 columns wide); CPU shapes never do. The harness
/// (`conformance_of_every_op_on_wgpu`) runs both paths' numbers.
#[test]
fn sixteen_byte_loads_where_rows_are_whole_units() {
    let ctx = context::open(GpuChoice::Auto).expect("a wgpu adapter");
    for cpu_shapes in [true, false] {
        let r = OpRunner::new(dsrun::backend::wgpu::context::GpuContext { cpu_shapes, prefill_gemm: false, ..ctx.clone() }).unwrap();
        for dtype in FORMATS {
            for (rows, cols) in [(37, 300), (13, 129), (37, 160), (37, 512)] {
                let gm = GpuMatrix::upload(r.ctx(), &[&matrix(dtype, rows, cols, 1)]).unwrap();
                let wide = !cpu_shapes && dtype != DType::Q4 && dtype.format().bytes(cols).is_multiple_of(16);
                assert_eq!(r.builder().wide_loads(&gm), wide, "{dtype:?} {rows}x{cols}, CPU shapes {cpu_shapes}: 16-byte loads");
            }
        }
    }
}

/// The f16-arithmetic matmul (`DSRUN_F16_MATH`, SHADER_F16 adapters) in both shapes, for the
/// formats it takes (bf16, f16, FP8, q8), against the exact CPU result. Bound per output, from
/// arith_f16.wgsl's rounding: x to f16 (2^-11), each product and the step's partial sums
/// (2^-11 each, up to 4 terms): |err| <= 2^-8 sum_c |w_c x_c|, plus products below f16's
/// smallest normal (2^-14 in units of the step's code scale, <= max |w| or 1) flushed to zero.
/// f32 and q4 must stay on the exact kernel.
#[test]
fn f16_matmul_stays_within_its_rounding_bound() {
    let ctx = context::open(GpuChoice::Auto).expect("a wgpu adapter");
    if !ctx.shader_f16 {
        common::skip("f16_matmul_stays_within_its_rounding_bound", &format!("{} has no SHADER_F16", ctx.describe()), false);
        return;
    }
    for cpu_shapes in [true, false] {
        let mut ctx = ctx.clone();
        ctx.cpu_shapes = cpu_shapes;
        ctx.prefill_gemm = false;
        ctx.f16_math = true;
        let mut r = OpRunner::new(ctx).unwrap();
        for dtype in FORMATS {
            for (rows, cols, n) in [(37, 300, 1usize), (37, 300, 3), (37, 160, 1), (37, 160, 9), (13, 129, 2)] {
                let what = format!("{dtype:?} {rows}x{cols} n={n}, CPU shapes {cpu_shapes}");
                let m = matrix(dtype, rows, cols, 3);
                let gm = GpuMatrix::upload(r.ctx(), &[&m]).unwrap();
                let takes_f16 = !matches!(dtype, DType::F32 | DType::Q4);
                assert_eq!(r.builder().f16_math(&gm), takes_f16, "{what}");
                let x: Vec<f32> = random(4 + n as u64, n * cols).iter().map(|v| v * 4.0).collect();
                let (xb, yb) = (r.f32_buffer(&x), r.zeros(n * rows).unwrap());
                let d = r.builder().matmul(&gm, &xb, &yb, false);
                assert_eq!(d[0].kernel == Kernel::MatmulF16, takes_f16, "{what}: kernel");
                r.set_step(n as u32);
                r.run(&d, n as u32, 1).unwrap();
                let got = r.read_f32(&yb, n * rows).unwrap();
                let want = math::matmul(&m, &x, n);
                if !takes_f16 {
                    assert_close(&what, &got, &want);
                    continue;
                }
                let mut row = vec![0.0f32; cols];
                for o in 0..rows {
                    m.decode_row(o, &mut row);
                    let unit = row.iter().fold(1.0f32, |a, w| a.max(w.abs())) as f64;
                    for t in 0..n {
                        let magnitude: f64 = row.iter().zip(&x[t * cols..(t + 1) * cols]).map(|(w, x)| (w * x).abs() as f64).sum();
                        let bound = magnitude / 256.0 + cols as f64 * unit / 16384.0;
                        let err = (got[t * rows + o] as f64 - want[t * rows + o] as f64).abs();
                        assert!(err <= bound, "{what}: row {o} token {t}: {} vs {} (bound {bound:e})", got[t * rows + o], want[t * rows + o]);
                    }
                }
                // And it is not the exact kernel in disguise: f16 rounding shows somewhere.
                assert!(got != want, "{what}: bitwise the f32 result");
            }
        }
    }
}

/// The tiled prefill GEMM (the hardware-GPU default for dense prefill matmuls) against the CPU on
/// every format: 70 and 37 rows (one partial 64-row tile, or a tile and a part), 300 and 136
/// columns (partial 8-word chunks), token counts below, at and beyond a 16-token tile, and
/// accumulating into y. 129 columns (rows not word-aligned) take the register-tile path.
#[test]
fn prefill_gemm_every_format_and_tile_edge() {
    let mut ctx = context::open(GpuChoice::Auto).expect("a wgpu adapter");
    ctx.prefill_gemm = true;
    let mut r = OpRunner::new(ctx).unwrap();
    let cases = [(70, 300, 5usize), (70, 300, 16), (37, 136, 17), (37, 300, 40), (13, 129, 9)];
    for dtype in FORMATS {
        for (rows, cols, n) in cases {
            let m = matrix(dtype, rows, cols, 7);
            let gm = GpuMatrix::upload(r.ctx(), &[&m]).unwrap();
            let x = random(8 + n as u64, n * cols);
            for accumulate in [false, true] {
                let base = random(9, n * rows);
                let (xb, yb) = (r.f32_buffer(&x), r.f32_buffer(&base));
                let d = r.builder().matmul(&gm, &xb, &yb, accumulate);
                assert_eq!(d[0].kernel == Kernel::Gemm, gm.whole_words, "{dtype:?} {rows}x{cols}: the GEMM takes word-aligned rows");
                r.set_step(n as u32);
                r.run(&d, n as u32, 1).unwrap();
                let got = r.read_f32(&yb, n * rows).unwrap();
                let mut want = math::matmul(&m, &x, n);
                if accumulate {
                    want.iter_mut().zip(&base).for_each(|(w, b)| *w += b);
                }
                assert_close(&format!("{dtype:?} {rows}x{cols} n={n} accumulate={accumulate}"), &got, &want);
            }
        }
    }
}

#[test]
fn matmul_accumulates_and_computes_fixed_slots() {
    let mut r = runner();
    let (rows, cols, n) = (21, 70, 5);
    let m = matrix(DType::BF16, rows, cols, 3);
    let gm = GpuMatrix::upload(r.ctx(), &[&m]).unwrap();
    let x = random(4, n * cols);
    let base = random(5, n * rows);
    let (xb, yb) = (r.f32_buffer(&x), r.f32_buffer(&base));
    r.set_step(n as u32);
    r.run(&r.builder().matmul(&gm, &xb, &yb, true), n as u32, 1).unwrap();
    let mut want = math::matmul(&m, &x, n);
    math::add_in_place(&mut want, &base);
    assert_close("accumulate", &r.read_f32(&yb, n * rows).unwrap(), &want);

    // Only the first slot (the last position's logits are computed from a one-row input).
    let yb = r.zeros(rows).unwrap();
    let last = MatmulShape { fixed_slots: Some(1), ..MatmulShape::PLAIN };
    r.run(&r.builder().matmul_shaped(&gm, last, &xb, &yb, None), n as u32, 1).unwrap();
    assert_close("fixed slot", &r.read_f32(&yb, rows).unwrap(), &math::matmul(&m, &x[..cols], 1));
}

/// Routed experts grouped by expert across a step's tokens: the same bits as one slot per
/// workgroup, for groups smaller than a tile, larger than a tile (one expert taking 11 of the
/// step's slots), experts no slot chose, in the gate/up (x_div = k) and down (x_div = 1) forms;
/// a single-token step takes the per-slot path.
#[test]
fn grouped_expert_matmul_gives_the_per_slot_bits() {
    // Both tile shapes: CPU adapters' (4 rows x 4 slots) and GPUs' (16 x 2).
    for cpu_shapes in [true, false] {
        let mut ctx = context::open(GpuChoice::Auto).expect("a wgpu adapter");
        ctx.cpu_shapes = cpu_shapes;
        grouped_expert_matmul_with(&mut OpRunner::new(ctx).unwrap());
    }
}

fn grouped_expert_matmul_with(r: &mut OpRunner) {
    // 160 columns: 16-byte loads with GPU shapes (all formats but q4).
    for cols in [150, 160] {
        for dtype in FORMATS {
            let (experts, rows, k, n) = (6, 21, 3, 7);
            let stack: Vec<Matrix> = (0..experts).map(|e| matrix(dtype, rows, cols, 60 + e as u64)).collect();
            let Ok(gm) = GpuMatrix::upload(r.ctx(), &stack.iter().collect::<Vec<_>>()) else { continue };
            // Expert 4 takes 11 slots (more than a tile); expert 5 none.
            let ids: Vec<u32> = (0..n * k).map(|s| if s % 2 == 0 { 4 } else { (s % 4) as u32 }).collect();
            for x_div in [k, 1] {
                let x = random(61 + x_div as u64, n * cols * if x_div == 1 { k } else { 1 });
                let (xb, ib) = (r.f32_buffer(&x), r.u32_buffer(&ids));
                let groups = Builder::expert_groups(r.ctx(), n * k).unwrap();
                let which = if x_div == 1 { ExpertMatrix::Down } else { ExpertMatrix::GateUp };
                let (per_slot, grouped) = (r.zeros(n * k * rows).unwrap(), r.zeros(n * k * rows).unwrap());
                // 3 tokens: fewer than two slots per expert, per slot with CPU shapes.
                for steps in [n, 3, 1] {
                    r.set_step(steps as u32);
                    r.run(&r.builder().expert_matmul(&gm, k as u32, x_div as u32, &xb, &per_slot, &ib), steps as u32, 1).unwrap();
                    let ops = [
                        r.builder().group_experts(k as u32, experts as u32, [rows, rows], &ib, &groups),
                        r.builder().grouped_expert_matmul(&gm, which, k as u32, experts as u32, x_div as u32, &xb, &grouped, &ib, &groups),
                    ];
                    r.run(&ops, steps as u32, 1).unwrap();
                    let (want, got) = (r.read_f32(&per_slot, steps * k * rows).unwrap(), r.read_f32(&grouped, steps * k * rows).unwrap());
                    let same = want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{dtype:?} {cols} columns, x_div {x_div}, {steps} token(s): grouped experts differ from per-slot");
                }
            }
        }
    }
}

#[test]
fn expert_slots_compute_the_same_bits_as_the_stack_for_listed_slots_only() {
    let mut r = runner();
    for dtype in FORMATS {
        // Odd shapes so q4/FP8 slots need padding to whole words.
        let (experts, rows, cols, k, n) = (4, 9, 37, 2, 3);
        let stack: Vec<Matrix> = (0..experts).map(|e| matrix(dtype, rows, cols, 40 + e as u64)).collect();
        let ids: Vec<u32> = vec![2, 0, 3, 2, 1, 3];
        let x = random(41, n * cols);
        let xb = r.f32_buffer(&x);
        r.set_step(n as u32);
        let resident = GpuMatrix::upload(r.ctx(), &stack.iter().collect::<Vec<_>>());
        let want = match resident {
            Ok(gm) => {
                let (yb, ib) = (r.zeros(n * k * rows).unwrap(), r.u32_buffer(&ids));
                r.run(&r.builder().expert_matmul(&gm, k as u32, k as u32, &xb, &yb, &ib), n as u32, 1).unwrap();
                r.read_f32(&yb, n * k * rows).unwrap()
            }
            // q4 stacks need even element counts; compare with the CPU then.
            Err(_) => (0..n * k).flat_map(|s| math::matmul(&stack[ids[s] as usize], &x[(s / k) * cols..][..cols], 1)).collect(),
        };
        // Expert e sits in slot 3 - e; the list names the step slots to compute (not 1 and 4).
        let pool = SlotMatrix::new(r.ctx(), &stack[0], experts).unwrap();
        for (e, m) in stack.iter().enumerate() {
            pool.write(&r.ctx().queue, experts - 1 - e, m);
        }
        let skip = [false, true, false, false, true, false];
        let list: Vec<u32> = (0..n * k).filter(|&s| !skip[s]).flat_map(|s| [s as u32, (experts - 1) as u32 - ids[s]]).collect();
        let sentinel = vec![7.5f32; n * k * rows];
        let (yb, lb) = (r.f32_buffer(&sentinel), r.u32_buffer(&list));
        let args = r.ctx().device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(&listed_grid(matmul_tiles(r.ctx()).decode, rows, (list.len() / 2) as u32)),
            usage: wgpu::BufferUsages::INDIRECT,
        });
        let d = r.builder().listed_expert_matmul(&pool.matrix, k as u32, k as u32, &xb, &yb, &lb, (&args, 0));
        r.run(&[d], n as u32, 1).unwrap();
        let got = r.read_f32(&yb, n * k * rows).unwrap();
        for s in 0..n * k {
            let (g, w) = (&got[s * rows..][..rows], &want[s * rows..][..rows]);
            if skip[s] {
                assert!(g.iter().all(|&v| v == 7.5), "{dtype:?}: skipped slot {s} was written");
            } else if GpuMatrix::upload(r.ctx(), &stack.iter().collect::<Vec<_>>()).is_ok() {
                assert_eq!(g, w, "{dtype:?}: slot {s} differs from the resident stack");
            } else {
                assert_close(&format!("{dtype:?} slot {s}"), g, w);
            }
        }
    }
}

#[test]
fn matrices_split_into_row_chunks_give_the_same_result() {
    let mut ctx = context::open(GpuChoice::Auto).expect("a wgpu adapter");
    // Force chunks far below any real binding limit: every matrix here becomes several chunks.
    ctx.chunk_bytes = Some(4096);
    let mut r = OpRunner::new(ctx).unwrap();
    for dtype in FORMATS {
        let (rows, cols, n) = (300, 96, 3);
        let m = matrix(dtype, rows, cols, 60);
        let gm = GpuMatrix::upload_chunked(r.ctx(), &m).unwrap();
        assert!(gm.chunks.len() >= 2, "{dtype:?}: expected several chunks, got {}", gm.chunks.len());
        let x = random(61, n * cols);
        let (xb, yb) = (r.f32_buffer(&x), r.zeros(n * rows).unwrap());
        r.set_step(n as u32);
        r.run(&r.builder().matmul(&gm, &xb, &yb, false), n as u32, 1).unwrap();
        assert_close(&format!("{dtype:?} chunked"), &r.read_f32(&yb, n * rows).unwrap(), &math::matmul(&m, &x, n));

        // The embedding gather reads the same chunks by token id.
        let tokens = [0u32, 299, 128, 17];
        let (tb, ob) = (r.u32_buffer(&tokens), r.zeros(tokens.len() * cols).unwrap());
        r.set_step(tokens.len() as u32);
        r.run(&r.builder().embed(&gm, &tb, &ob), tokens.len() as u32, 1).unwrap();
        assert_close(&format!("{dtype:?} chunked embed"), &r.read_f32(&ob, tokens.len() * cols).unwrap(), &math::embed(&m, &tokens));
    }
}

/// The attention split wgpu chooses: a 600-position context splits in three for single-token
/// steps (the conformance harness runs such a context in both kernel shapes).
#[test]
fn long_contexts_split_attention_in_chunks() {
    use dsrun::backend::wgpu::lower::AttentionSplit;
    let ctx = context::open(GpuChoice::Auto).expect("a wgpu adapter (on Debian: apt-get install mesa-vulkan-drivers)");
    let probe = dsrun::plan::MlaShape { heads: 4, nope: 16, rope: 16, v: 16, lora: 32, ctx: 600, scale: 0.1, rope_scale: 1.0, cache: Default::default() };
    assert_eq!(AttentionSplit::for_shape(&probe, ctx.max_binding()).0, AttentionSplit { chunk: 200, splits: 3 });
}

/// The one-subgroup attention is what CPU shapes on this adapter run (lavapipe: subgroups of 8),
/// so the conformance harness's CPU-shapes setting covers it.
#[test]
fn cpu_shapes_take_the_one_subgroup_attention_on_lavapipe() {
    use dsrun::backend::wgpu::lower::{Builder, MlaShape};
    let ctx = context::open(GpuChoice::Auto).expect("a wgpu adapter");
    if ctx.info.device_type != wgpu::DeviceType::Cpu || !ctx.subgroups || ctx.info.subgroup_min_size != ctx.info.subgroup_max_size {
        common::skip("cpu_shapes_take_the_one_subgroup_attention_on_lavapipe", &format!("{} is not a CPU adapter with one subgroup size", ctx.describe()), false);
        return;
    }
    let r = OpRunner::new(ctx).unwrap();
    let s = MlaShape { heads: 8, nope: 64, rope: 32, v: 64, lora: 128, ctx: 300, scale: 0.1, rope_scale: 1.0, cache: Default::default() };
    let b = |n| r.zeros(n).unwrap();
    let (q, q_lat, positions, cache, o_lat) = (b(8 * 96), b(8 * 128), b(2), b(300 * 160), b(8 * 128));
    let scratch = b(Builder::attention_scratch(&s, 1, r.ctx().max_binding()));
    let d = r.builder().mla_attention(&s, [&q, &q_lat, &positions, &cache, &scratch, &o_lat], None);
    assert_eq!(d[0].kernel, Kernel::AttentionPartialSubgroup);
}

/// The conformance harness (tests/common/conformance.rs) on wgpu, in both kernel shapes, with
/// and without subgroups, with and without grouped experts and the tiled GEMM.
#[test]
fn conformance_of_every_op_on_wgpu() {
    use dsrun::backend::wgpu::WgpuBackend;
    let base = context::open(GpuChoice::Auto).expect("a wgpu adapter (on Debian: apt-get install mesa-vulkan-drivers)");
    // CPU shapes; GPU shapes with one workgroup per row (the matvec for every token count);
    // GPU shapes with subgroups, grouped experts and the tiled prefill GEMM.
    let settings = [(true, base.subgroups, true, false), (false, false, false, false), (false, base.subgroups, true, true)];
    for (cpu_shapes, subgroups, group_experts, prefill_gemm) in settings {
        let ctx = context::GpuContext { cpu_shapes, subgroups, group_experts, prefill_gemm, ..base.clone() };
        let what = format!("wgpu {} (CPU shapes {cpu_shapes}, subgroups {subgroups}, grouped {group_experts}, GEMM {prefill_gemm})", ctx.describe());
        let mut lab = dsrun::runtime::Lab::<WgpuBackend>::new(ctx).unwrap();
        common::conformance::run_all(&mut lab, &what);
        common::conformance::block_formats(&mut lab, &what);
    }
}
