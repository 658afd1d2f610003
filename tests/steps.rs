//! The engine's one primitive, `Engine::step`, on the CPU reference, on wgpu (experts
//! resident and streamed) and on the CPU backend: steps of several sequences with spans of several rows, given out of
//! the order the engine last kept them, each kind of output (each span's last row or every row,
//! logits or ids), MTP catch-ups over some of a kept step's sequences (a GPU lays their rows out
//! as the kept step's, padding the rest), a chained draft, and the steps an engine must refuse.

mod common;
use common::*;
use dsrun::backend::wgpu::context;
use dsrun::device::GpuChoice;
use dsrun::engine::{CpuEngine, Engine, Pass, Span, Step, Want};
use dsrun::model::{Logits, Model};
use dsrun::plan::budget::{ExpertPlacement, GpuMem, GpuOptions};
use dsrun::runtime::GpuModel;

const SEQUENCES: usize = 3;
const CAPACITY: usize = 24;

/// Tokens of sequence `seq` (distinct per sequence, inside every fixture's vocabulary).
fn tokens(seq: usize, n: usize) -> Vec<u32> {
    (0..n).map(|i| ((7 * seq + 3 * i + 1) % 50) as u32).collect()
}

/// What a run of steps handed back, step by step: (what, logits, ids).
type Record = Vec<(String, Vec<f32>, Vec<u32>)>;

fn run(engine: &mut dyn Engine, record: &mut Record, what: &str, pass: Pass, spans: &[Span], want: Want) {
    let name = engine.device_name();
    let out = engine.step(&Step { pass, spans, want }).unwrap_or_else(|e| panic!("{what} on {name}: {e}"));
    record.push((what.to_string(), out.logits.to_vec(), out.ids.to_vec()));
}

fn span(seq: usize, position: usize, tokens: &[u32]) -> Span<'_> {
    Span { seq, position, tokens }
}

/// The scenario, on one engine; every step's output in order.
fn scenario(engine: &mut dyn Engine) -> Record {
    let mut r = Record::new();
    let (t0, t1, t2) = (tokens(0, 12), tokens(1, 12), tokens(2, 12));

    // Prompts of two sequences in one kept step, sequence 1 first: each one's last row.
    run(engine, &mut r, "kept prompts, last rows", Pass::MainKeepingHidden, &[span(1, 0, &t1[..3]), span(0, 0, &t0[..5])], Want::Logits(Logits::Last));
    // Both catch up, in the other order (next tokens: each prompt shifted by one).
    run(engine, &mut r, "catch-up of both, reordered", Pass::Draft, &[span(0, 0, &t0[1..6]), span(1, 0, &t1[1..4])], Want::Logits(Logits::Last));
    assert_eq!((engine.mtp_len(0), engine.mtp_len(1)), (Some(5), Some(3)));
    // A verify-like step of three sequences: every row.
    run(engine, &mut r, "kept step of three, every row", Pass::MainKeepingHidden, &[span(0, 5, &t0[5..7]), span(1, 3, &t1[3..5]), span(2, 0, &t2[..1])], Want::Logits(Logits::All));
    // Sequence 0 rejects its second row; sequences 0 and 2 catch up, sequence 1 does not (a GPU
    // pads its rows between them).
    engine.truncate(0, 6);
    run(engine, &mut r, "catch-up of the first and last of three", Pass::Draft, &[span(2, 0, &t2[1..2]), span(0, 5, &t0[6..7])], Want::Logits(Logits::Last));
    assert_eq!((engine.mtp_len(0), engine.mtp_len(1), engine.mtp_len(2)), (Some(6), Some(3), Some(1)));
    // Sequence 1's hidden states are gone: a kept step of it is refused, a plain one runs.
    let refused = engine.step(&Step { pass: Pass::MainKeepingHidden, spans: &[span(1, 5, &t1[5..6])], want: Want::Nothing });
    assert!(refused.is_err(), "{}: a kept step of a sequence whose MTP layer is behind", engine.device_name());
    run(engine, &mut r, "plain step, ids of each last row", Pass::Main, &[span(1, 5, &t1[5..8]), span(2, 1, &t2[1..3])], Want::Ids(Logits::Last));
    run(engine, &mut r, "plain step, ids of every row", Pass::Main, &[span(2, 3, &t2[3..5]), span(1, 8, &t1[8..9])], Want::Ids(Logits::All));
    // One sequence: a kept step, its catch-up (one span, so a chained draft may follow), two
    // chained drafts.
    run(engine, &mut r, "kept step of one", Pass::MainKeepingHidden, &[span(0, 6, &t0[6..9])], Want::Logits(Logits::Last));
    run(engine, &mut r, "catch-up of one", Pass::Draft, &[span(0, 6, &t0[7..10])], Want::Logits(Logits::Last));
    run(engine, &mut r, "chained draft", Pass::Draft, &[span(0, 9, &t0[10..11])], Want::Logits(Logits::Last));
    run(engine, &mut r, "second chained draft", Pass::Draft, &[span(0, 10, &t0[11..12])], Want::Logits(Logits::Last));
    // After a draft of two sequences, no chained draft (sequence 2 goes back to where its MTP
    // layer is).
    engine.truncate(0, 9);
    engine.truncate(2, 1);
    run(engine, &mut r, "kept step of two", Pass::MainKeepingHidden, &[span(0, 9, &t0[9..10]), span(2, 1, &t2[1..3])], Want::Nothing);
    run(engine, &mut r, "catch-up of two", Pass::Draft, &[span(0, 9, &t0[10..11]), span(2, 1, &t2[2..4])], Want::Logits(Logits::Last));
    let chained = engine.step(&Step { pass: Pass::Draft, spans: &[span(0, 10, &t0[11..12])], want: Want::Logits(Logits::Last) });
    assert!(chained.is_err(), "{}: a chained draft after a draft of two sequences", engine.device_name());
    r
}

/// Steps every engine refuses, naming the problem.
fn refuses_bad_steps(engine: &mut dyn Engine) {
    let t = tokens(0, 4);
    let name = engine.device_name();
    let bad: [(&str, Vec<Span>, &str); 5] = [
        ("no spans", vec![], "no rows"),
        ("an empty span", vec![Span { seq: 0, position: 0, tokens: &[] }], "no tokens"),
        ("a sequence twice", vec![Span { seq: 0, position: 0, tokens: &t[..1] }, Span { seq: 0, position: 0, tokens: &t[1..2] }], "twice"),
        ("a position past the cache", vec![Span { seq: 0, position: 2, tokens: &t }], "position 2"),
        ("a sequence the engine lacks", vec![Span { seq: SEQUENCES, position: 0, tokens: &t }], "sequence"),
    ];
    for (what, spans, says) in bad {
        match engine.step(&Step { pass: Pass::Main, spans: &spans, want: Want::Nothing }) {
            Ok(_) => panic!("{name}: {what} was run"),
            Err(e) => assert!(e.to_string().contains(says), "{name}: {what}: \"{e}\" does not say \"{says}\""),
        }
    }
    assert_eq!(engine.seq_len(0), 0, "{name}: a refused step ran");
}

/// The CPU reference's outputs of the scenario, and the engines to hold to them.
fn check_against_cpu(family: &str, engines: Vec<(&str, Box<dyn Engine>)>) {
    let dir = fixture(family);
    let vocab = Model::load(&dir).unwrap().config.vocab_size;
    let mut cpu = CpuEngine::with_sequences(Model::load(&dir).unwrap(), CAPACITY, SEQUENCES).with_mtp().unwrap();
    refuses_bad_steps(&mut cpu);
    let want = scenario(&mut cpu);
    for (name, mut engine) in engines {
        refuses_bad_steps(engine.as_mut());
        let got = scenario(engine.as_mut());
        for ((what, logits, ids), (_, want_logits, want_ids)) in got.iter().zip(&want) {
            let what = format!("{family} on {name}: {what}");
            assert_eq!(logits.len(), want_logits.len(), "{what}: logits");
            if !want_logits.is_empty() {
                assert_logits_match(&what, logits, want_logits, vocab, 1e-3);
            }
            assert_eq!(ids, want_ids, "{what}: ids");
        }
    }
}

fn options() -> GpuOptions {
    GpuOptions { mtp: true, sequences: SEQUENCES, ..Default::default() }
}

/// Experts under a budget for 30% of them: the steps stop at each MoE layer for the router.
fn streamed() -> GpuOptions {
    GpuOptions { gpu_mem: GpuMem::ExpertShare(0.3), placement: ExpertPlacement::Stream, ..options() }
}

/// Routed experts on the host (hybrid placement): every MoE layer's, the MTP layer's among
/// them (`--cpu-moe`), or the first layer's only (`--n-cpu-moe 1`).
fn hybrid(cpu_moe: usize) -> GpuOptions {
    GpuOptions { cpu_moe, ..options() }
}

#[test]
fn steps_agree_on_wgpu_and_the_cpu_backend() {
    let ctx = || context::open(GpuChoice::Auto).expect("a wgpu adapter (on Debian: apt-get install mesa-vulkan-drivers)");
    for family in MTP_FAMILIES {
        let model = Model::load(&fixture(family)).unwrap();
        let resident = GpuModel::with_options(ctx(), &model, CAPACITY, &options()).unwrap();
        let streamed = GpuModel::with_options(ctx(), &model, CAPACITY, &streamed()).unwrap();
        assert!(streamed.expert_slots().is_some(), "{family}: experts stream under a budget for 30% of them");
        let cpu_backend = dsrun::runtime::Runtime::with_options(dsrun::backend::cpu::CpuBackend::new(), &model, CAPACITY, &options()).unwrap();
        let cpu_moe = GpuModel::with_options(ctx(), &model, CAPACITY, &hybrid(usize::MAX)).unwrap();
        let first = GpuModel::with_options(ctx(), &model, CAPACITY, &hybrid(1)).unwrap();
        assert_eq!(cpu_moe.host_layers(), Some(model.weights.routed_layers(true).len()), "{family}: the MTP layer's experts on the host too");
        assert_eq!(first.host_layers(), Some(1));
        check_against_cpu(
            family,
            vec![
                ("wgpu", Box::new(resident)),
                ("wgpu, experts streamed", Box::new(streamed)),
                ("the CPU backend", Box::new(cpu_backend)),
                ("wgpu + the host, --cpu-moe", Box::new(cpu_moe)),
                ("wgpu + the host, --n-cpu-moe 1", Box::new(first)),
            ],
        );
    }
}

/// The same runtime code over the CUDA backend, on its emulator (`.ci/run` runs it with the
/// cuda feature).
#[cfg(feature = "cuda")]
#[test]
fn steps_agree_on_the_cuda_emulator() {
    use dsrun::backend::cuda::Device;
    use dsrun::runtime::CudaModel;
    let device = || Device::emulator().expect("the CUDA emulator needs a C++ compiler");
    let model = Model::load(&fixture(MTP_FAMILIES[0])).unwrap();
    let resident = CudaModel::with_options(device(), &model, CAPACITY, &options()).unwrap();
    let streamed = CudaModel::with_options(device(), &model, CAPACITY, &streamed()).unwrap();
    let cpu_moe = CudaModel::with_options(device(), &model, CAPACITY, &hybrid(usize::MAX)).unwrap();
    assert!(cpu_moe.host_layers().is_some());
    check_against_cpu(
        MTP_FAMILIES[0],
        vec![("the CUDA emulator", Box::new(resident)), ("the CUDA emulator, experts streamed", Box::new(streamed)), ("the CUDA emulator + the host, --cpu-moe", Box::new(cpu_moe))],
    );
}
