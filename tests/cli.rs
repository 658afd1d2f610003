//! The `dsrun` binary as a user runs it: output on stdout, stats on stderr, clear errors with a
//! non-zero exit status and never a panic.

mod common;
use common::{assert_logits_match, fixture, golden};
use std::process::{Command, Output};

fn dsrun(args: &[&str]) -> Output {
    // Run from an empty directory so the default model is found the way a user's would be.
    let cwd = tempfile::tempdir().unwrap();
    // Expert counts (hybrid placement) go to this run's own cache directory, not the user's.
    Command::new(env!("CARGO_BIN_EXE_dsrun")).args(args).current_dir(cwd.path()).env("XDG_CACHE_HOME", cwd.path()).output().unwrap()
}

/// `dsrun args` running in an empty directory, its stdin, stdout and stderr piped.
fn spawn(args: &[&str], cwd: &std::path::Path) -> std::process::Child {
    use std::process::Stdio;
    Command::new(env!("CARGO_BIN_EXE_dsrun")).args(args).current_dir(cwd).env("XDG_CACHE_HOME", cwd).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// The address `dsrun serve` says it listens on (read from its stderr), and the rest of it.
fn listening_address(stderr: std::process::ChildStderr) -> (String, std::io::BufReader<std::process::ChildStderr>) {
    use std::io::BufRead;
    let mut stderr = std::io::BufReader::new(stderr);
    let mut line = String::new();
    loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "serve exited before listening");
        if let Some(rest) = line.split("listening on http://").nth(1) {
            return (rest.split_whitespace().next().unwrap().to_string(), stderr);
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts a clean failure: non-zero exit, a message containing `needle`, no panic.
fn assert_fails(args: &[&str], needle: &str) {
    let out = dsrun(args);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(stderr.contains(needle), "{args:?}: expected {needle:?} in stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
}

#[test]
fn default_run_generates_from_the_bundled_model() {
    let out = dsrun(&["-n", "16", "--seed", "3"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.starts_with("This module provides"), "{stdout}");
    assert!(stdout.trim_end().len() > "This module provides".len(), "nothing generated: {stdout:?}");
    assert!(stderr.contains("load") && stderr.contains("prompt") && stderr.contains("tok/s"), "{stderr}");
}

#[test]
fn greedy_generation_is_reproducible_and_seeds_are_honoured() {
    let a = dsrun(&["-n", "12", "--temperature", "0", "--prompt", "The file"]);
    let b = dsrun(&["-n", "12", "--temperature", "0", "--prompt", "The file"]);
    assert!(a.status.success() && b.status.success());
    assert_eq!(a.stdout, b.stdout);
    let c = dsrun(&["-n", "12", "--seed", "9", "--prompt", "The file"]);
    let d = dsrun(&["-n", "12", "--seed", "9", "--prompt", "The file"]);
    assert_eq!(c.stdout, d.stdout);
}

#[test]
fn logits_subcommand_writes_npy_matching_transformers() {
    let dir = fixture("v3_fp8");
    let g = golden(&dir);
    let tokens: Vec<String> = g.tokens.iter().map(u32::to_string).collect();
    let out_dir = tempfile::tempdir().unwrap();
    let npy = out_dir.path().join("logits.npy");
    let out = dsrun(&["logits", "--model", dir.to_str().unwrap(), "--tokens", &tokens.join(","), "--out", npy.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let bytes = std::fs::read(&npy).unwrap();
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(header.contains(&format!("'shape': ({}, {})", g.tokens.len(), g.vocab)), "{header}");
    let logits: Vec<f32> = bytes[10 + header_len..].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_logits_match("dsrun logits", &logits, &g.logits, g.vocab, 1e-3);
}

#[test]
fn cpu_and_gpu_generate_the_same_greedy_text() {
    // Plain decoding (the bundled model would otherwise draft with its MTP layer).
    let args = ["-n", "12", "--temperature", "0", "--prompt", "The file", "-v", "--speculative", "off"];
    let reference = dsrun(&[&args[..], &["--gpu", "reference"]].concat());
    let cpu = dsrun(&[&args[..], &["--gpu", "cpu", "--threads", "1"]].concat());
    let gpu = dsrun(&[&args[..], &["--gpu", "vulkan"]].concat());
    assert!(reference.status.success() && cpu.status.success() && gpu.status.success(), "{}{}", text(&cpu.stderr), text(&gpu.stderr));
    assert!(text(&cpu.stderr).contains(", 1 threads)"), "{}", text(&cpu.stderr));
    assert_eq!(text(&reference.stdout), text(&gpu.stdout));
    assert_eq!(text(&cpu.stdout), text(&gpu.stdout));
    let stderr = text(&gpu.stderr);
    // One submit per step and only the 4-byte token id read back when decoding greedily.
    assert!(stderr.contains("1.00 submits") && stderr.contains(" 4 bytes read back per step"), "{stderr}");
    // `--math fast` (int8 activations for q8 weights) runs and says so; its text is held to
    // quality floors elsewhere (tests/quant_quality.rs), not to the exact text.
    let fast = dsrun(&[&args[..], &["--gpu", "cpu", "--quant", "q8", "--math", "fast"]].concat());
    assert!(fast.status.success() && text(&fast.stderr).contains("fast math"), "{}", text(&fast.stderr));
    assert!(!text(&fast.stdout).trim().is_empty());
}

/// Hybrid placement from the command line: `--cpu-moe`, `--n-cpu-moe 1` and a budget under
/// `--expert-placement auto` give the all-GPU text, and `-v` says what the host did.
#[test]
fn cpu_moe_generates_the_all_gpu_text() {
    let args = ["-n", "12", "--temperature", "0", "--prompt", "The file", "-v", "--speculative", "off", "--gpu", "vulkan"];
    let all_gpu = dsrun(&args);
    assert!(all_gpu.status.success(), "{}", text(&all_gpu.stderr));
    for extra in [&["--cpu-moe"][..], &["--n-cpu-moe", "1"], &["--gpu-mem", "25%"], &["--expert-placement", "cpu"]] {
        let hybrid = dsrun(&[&args[..], extra].concat());
        let stderr = text(&hybrid.stderr);
        assert!(hybrid.status.success(), "{extra:?}: {stderr}");
        assert_eq!(text(&hybrid.stdout), text(&all_gpu.stdout), "{extra:?}");
        assert!(stderr.contains("host experts:") && stderr.contains("GB/s of expert weights"), "{extra:?}: {stderr}");
    }
    // On the CPU backend every expert is on the CPU already: said, and the same text.
    let cpu = dsrun(&["-n", "12", "--temperature", "0", "--prompt", "The file", "--speculative", "off", "--gpu", "cpu", "--cpu-moe"]);
    let stderr = text(&cpu.stderr);
    assert!(cpu.status.success() && stderr.contains("computes every expert on the CPU already"), "{stderr}");
    assert_eq!(text(&cpu.stdout), text(&all_gpu.stdout));
}

/// The router's counts under hybrid placement: written under the cache directory after a run,
/// added to by the next, and a corrupt file ignored with a warning and rewritten.
#[test]
fn expert_counts_are_kept_across_runs() {
    let cache = tempfile::tempdir().unwrap();
    let run = || {
        let args = ["-n", "6", "--temperature", "0", "--prompt", "The file", "--speculative", "off", "--gpu", "vulkan", "--gpu-mem", "30%"];
        let out = Command::new(env!("CARGO_BIN_EXE_dsrun")).args(args).current_dir(cache.path()).env("XDG_CACHE_HOME", cache.path()).output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        out
    };
    let file = || {
        let dir = cache.path().join("dsrun/expert-counts");
        let files: Vec<_> = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).map(|e| e.unwrap().path()).collect();
        assert_eq!(files.len(), 1, "{files:?}");
        files[0].clone()
    };
    let tokens = |path: &std::path::Path| -> u64 {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        v["layers"].as_array().unwrap().iter().map(|l| l["tokens"].as_u64().unwrap()).sum()
    };
    let first = run();
    let path = file();
    let after_one = tokens(&path);
    assert!(after_one > 0, "{}", std::fs::read_to_string(&path).unwrap());
    let second = run();
    assert_eq!(text(&second.stdout), text(&first.stdout));
    assert_eq!(tokens(&path), 2 * after_one, "the second run's counts are added");
    std::fs::write(&path, "{ corrupt").unwrap();
    let third = run();
    let stderr = text(&third.stderr);
    assert!(stderr.contains("expert counts:") && stderr.contains("not an expert-count file"), "{stderr}");
    assert_eq!(text(&third.stdout), text(&first.stdout));
    assert_eq!(tokens(&path), after_one, "rewritten from this run's counts");
}

#[test]
fn a_small_gpu_budget_streams_experts_and_generates_the_same_text() {
    // Plain decoding: prefetch guesses are made in single-token steps.
    let args = ["-n", "12", "--temperature", "0", "--prompt", "The file", "-v", "--speculative", "off"];
    let resident = dsrun(&args);
    let streamed = dsrun(&[&args[..], &["--gpu-mem", "25%", "--expert-placement", "stream", "--prefetch", "on"]].concat());
    assert!(resident.status.success() && streamed.status.success(), "{}", text(&streamed.stderr));
    assert_eq!(text(&resident.stdout), text(&streamed.stdout));
    let stderr = text(&streamed.stderr);
    assert!(stderr.contains("expert cache:") && stderr.contains("hit rate") && stderr.contains("uploaded per token"), "{stderr}");
    assert!(stderr.contains("prefetch:") && stderr.contains("guesses right"), "{stderr}");
}

#[test]
fn synth_then_bench_reports_tokens_per_second() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("synth");
    let out = out.to_str().unwrap();
    let made = dsrun(&["synth", "--out", out, "--layers", "2", "--experts", "16", "--hidden", "128", "--dtype", "fp8"]);
    assert!(made.status.success(), "{}", text(&made.stderr));
    assert!(text(&made.stdout).contains("wrote"), "{}", text(&made.stdout));
    let bench = dsrun(&["bench", "--model", out, "-p", "8", "-n", "4", "-r", "2", "--json", "--gpu-mem", "50%"]);
    assert!(bench.status.success(), "{}", text(&bench.stderr));
    let report: serde_json::Value = serde_json::from_slice(&bench.stdout).expect("bench --json prints JSON");
    let tests = report["tests"].as_array().unwrap();
    assert_eq!(tests.iter().map(|t| t["name"].as_str().unwrap()).collect::<Vec<_>>(), ["pp8", "tg4"]);
    for t in tests {
        assert_eq!(t["samples"].as_array().unwrap().len(), 2);
        assert!(t["tok_per_s_mean"].as_f64().unwrap() > 0.0);
    }
    // Half the experts' room: the first MoE layer's computed on the host (hybrid placement).
    let counters = report["counters"].as_str().unwrap();
    assert!(counters.contains("host experts:") && counters.contains("GB/s of expert weights from host memory"), "{report}");
    let table = dsrun(&["bench", "--model", out, "-p", "4", "-n", "0", "-r", "1"]);
    let stdout = text(&table.stdout);
    assert!(table.status.success() && stdout.contains("pp4") && stdout.contains("tok/s") && !stdout.contains("tg0"), "{stdout}");
    // On the CPU backend, decode against the host's measured read bandwidth.
    let cpu = dsrun(&["bench", "--model", out, "--gpu", "cpu", "-p", "0", "-n", "4", "-r", "1", "--speculative", "off"]);
    let stdout = text(&cpu.stdout);
    assert!(cpu.status.success() && stdout.contains("tg4: ") && stdout.contains("of the host's measured read bandwidth"), "{stdout}{}", text(&cpu.stderr));
}

/// `--speculative mtp` on a synth checkpoint with an MTP layer: the same greedy text as
/// `--speculative off`, with the acceptance in the stats line; streamed experts too; bench
/// reports the speculative test beside the plain one; a checkpoint without the layer refuses
/// `--speculative mtp` by name.
#[test]
fn speculative_decoding_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("synth");
    let out = out.to_str().unwrap();
    let made = dsrun(&["synth", "--out", out, "--layers", "2", "--experts", "16", "--hidden", "128", "--mtp"]);
    assert!(made.status.success(), "{}", text(&made.stderr));
    let run = |extra: &[&str]| {
        // 64 tokens: enough rounds (the random MTP layer's drafts are all rejected) for the
        // four plain probes a rate needs.
        let mut args = vec!["--model", out, "--prompt", "Speculation", "-n", "64", "--ignore-eos", "--temperature", "0"];
        args.extend_from_slice(extra);
        let o = dsrun(&args);
        assert!(o.status.success(), "{extra:?}: {}", text(&o.stderr));
        (text(&o.stdout), text(&o.stderr))
    };
    let (plain, plain_err) = run(&["--speculative", "off"]);
    assert!(!plain_err.contains("MTP draft"), "{plain_err}");
    for extra in [&["--speculative", "mtp"][..], &["--draft", "2"], &["--speculative", "mtp", "--gpu-mem", "50%"], &["--gpu", "cpu"]] {
        let (got, stderr) = run(extra);
        assert_eq!(got, plain, "{extra:?}: greedy text differs from --speculative off");
        assert!(stderr.contains("MTP draft acceptance"), "{extra:?}: {stderr}");
        // Both rates measured: the plain one on the round that drafts nothing, one in 16.
        assert!(stderr.contains(" tok/s with speculation, ") && !stderr.contains("unmeasured") && !stderr.contains("(0 plain steps)"), "{extra:?}: {stderr}");
    }
    let bench = dsrun(&["bench", "--model", out, "-p", "0", "-n", "8", "-r", "1", "--json", "--draft", "2"]);
    assert!(bench.status.success(), "{}", text(&bench.stderr));
    let report: serde_json::Value = serde_json::from_slice(&bench.stdout).unwrap();
    let tests = report["tests"].as_array().unwrap();
    assert_eq!(tests.iter().map(|t| t["name"].as_str().unwrap()).collect::<Vec<_>>(), ["tg8", "tg8 mtp"]);
    assert_eq!(tests[1]["speculative"]["draft"], 2, "{report}");
    assert!(tests[1]["speculative"]["acceptance"].as_f64().is_some(), "{report}");
    let refused = dsrun(&["bench", "--model", fixture("v2_lite").to_str().unwrap(), "-p", "0", "-n", "1", "--speculative", "mtp"]);
    assert!(!refused.status.success() && text(&refused.stderr).contains("--speculative mtp: this checkpoint has no MTP layer"), "{}", text(&refused.stderr));
}

#[test]
fn devices_lists_adapters() {
    let out = dsrun(&["devices"]);
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    assert!(stdout.contains("max binding") && stdout.contains("workgroup storage"), "{stdout}");
    // The CPU, with its kernels' level and a measured bandwidth (a positive figure).
    let cpu = stdout.lines().find(|l| l.starts_with("cpu: ")).unwrap_or_else(|| panic!("{stdout}"));
    let gbs: f64 = cpu.split("read bandwidth ").nth(1).and_then(|s| s.split(' ').next()).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{cpu}"));
    assert!(cpu.contains(" kernels, ") && gbs > 0.0, "{cpu}");
}

/// A GGUF file: `inspect` prints its tables, `check` scans its values, running it says dsrun
/// does not yet, and a truncated one is refused naming the truncation.
#[test]
fn inspect_reads_any_gguf_and_running_a_broken_one_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    // GGUF v3: one metadata entry (general.architecture = "deepseek2"), one F32 tensor of 32.
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    let key = "general.architecture";
    b.extend((key.len() as u64).to_le_bytes());
    b.extend(key.as_bytes());
    b.extend(8u32.to_le_bytes());
    b.extend(9u64.to_le_bytes());
    b.extend(b"deepseek2");
    b.extend(1u64.to_le_bytes());
    b.extend(b"t");
    b.extend(1u32.to_le_bytes());
    b.extend(32u64.to_le_bytes());
    b.extend(0u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.resize(b.len().next_multiple_of(32) + 128, 0);
    std::fs::write(&path, &b).unwrap();
    let file = path.to_str().unwrap();
    let out = dsrun(&["inspect", "--model", file]);
    let stdout = text(&out.stdout);
    assert!(out.status.success() && stdout.contains("GGUF v3, architecture deepseek2, 1 tensors") && stdout.contains("F32 128 B"), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("dsrun cannot run this file") && stdout.contains("deepseek2.rope.dimension_count` is missing"), "{stdout}");
    let run = dsrun(&["--model", file, "-n", "2"]);
    assert!(!run.status.success() && text(&run.stderr).contains("is missing: not a file llama.cpp's DeepSeek converter wrote"), "{}", text(&run.stderr));
    // `check` scans it: finite, then a NaN in the tensor named.
    let check = dsrun(&["check", "--model", file]);
    assert!(check.status.success() && text(&check.stdout).contains("every value is finite"), "{}{}", text(&check.stdout), text(&check.stderr));
    let mut nan = b.clone();
    let at = nan.len() - 128 + 4 * 5;
    nan[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, &nan).unwrap();
    let check = dsrun(&["check", "--model", file]);
    assert!(!check.status.success() && text(&check.stdout).contains("t: 1 non-finite value(s), the first NaN at element 5"), "{}", text(&check.stdout));
    std::fs::write(&path, &b[..b.len() - 1]).unwrap();
    let cut = dsrun(&["inspect", "--model", file]);
    assert!(!cut.status.success() && text(&cut.stderr).contains("truncated or corrupt"), "{}", text(&cut.stderr));
}

#[test]
fn inspect_describes_the_checkpoint() {
    let out = dsrun(&["inspect", "--model", fixture("v3_noaux").to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for needle in ["deepseek_v3", "MLA", "16 routed + 1 shared", "total", "active per token", "BF16", "multi-token prediction layer 3 (MoE), used", "its own head", "ignored    nothing"] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    let out = dsrun(&["inspect", "--model", fixture("v3_fp8").to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("F8_E4M3") && stdout.contains("FP8 e4m3 with 128x128 block scales"), "{stdout}");
}

#[test]
fn inspect_prints_the_forward_plan() {
    let v3 = fixture("v3_noaux");
    let out = dsrun(&["inspect", "--model", v3.to_str().unwrap(), "--plan", "--ctx", "32", "--gpu-mem", "25%", "--expert-placement", "stream", "--prefetch", "on"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for needle in ["device ", "context 32 tokens", "experts    streamed:", "next layer guessed", "routed_experts", "head, every token (2 ops)"] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    // The last layer's latent cache: 32 positions of kv_lora_rank + qk_rope_head_dim = 40 values,
    // two per word in the default 16-bit cache, one with --kv-cache f32.
    assert!(stdout.lines().any(|l| l.contains("latent cache 2 (f16)") && l.trim_end().ends_with(" 640")), "{stdout}");
    let out = dsrun(&["inspect", "--model", v3.to_str().unwrap(), "--plan", "--ctx", "32", "--kv-cache", "f32"]);
    let stdout = text(&out.stdout);
    assert!(stdout.lines().any(|l| l.contains("latent cache 2 (f32)") && l.trim_end().ends_with(" 1280")), "{stdout}");
    assert_fails(&["--gpu", "reference", "--kv-cache", "f16"], "CPU reference keeps an f32 cache");
    assert_fails(&["--gpu", "cpu", "--threads", "0"], "--threads 0: give at least 1");
    assert_fails(&["inspect", "--model", v3.to_str().unwrap(), "--plan", "--gpu", "reference"], "without a plan");
}

#[test]
fn bad_requests_fail_cleanly() {
    let v3 = fixture("v3_noaux");
    let v3 = v3.to_str().unwrap();
    assert_fails(&["--model", "/nonexistent/model"], "config.json");
    assert_fails(&["logits", "--model", v3, "--tokens", "0,999", "--out", "/tmp/dsrun-never.npy"], "token id 999");
    assert_fails(&["--ctx", "3", "--prompt", "a prompt that is much longer than three tokens"], "longer than the context");
    // Without the feature: how to rebuild; with it on a machine without NVIDIA's driver: no driver.
    let cuda_reason = if cfg!(feature = "cuda") { "--gpu cuda:" } else { "built without CUDA" };
    assert_fails(&["--gpu", "cuda"], cuda_reason);
    // Metal exists only on Apple systems; elsewhere asking for it is a clear error.
    if !cfg!(target_os = "macos") {
        assert_fails(&["logits", "--gpu", "metal", "--model", v3, "--tokens", "1", "--out", "/tmp/dsrun-never.npy"], "Metal exists only on macOS");
    }
    assert_fails(&["--gpu", "tpu"], "invalid value 'tpu'");
    assert_fails(&["--gpu-mem", "lots"], "--gpu-mem");
    assert_fails(&["--gpu-mem", "0"], "at least one byte");
    assert_fails(&["--gpu-mem", "150%"], "(0, 100]%");
    assert_fails(&["--gpu-mem", "1M", "--expert-placement", "stream"], "below this model's minimum of");
    assert_fails(&["--gpu-mem", "1M"], "below what stays on the GPU");
    assert_fails(&["--cpu-moe", "--n-cpu-moe", "2"], "cannot be used with");
    assert_fails(&["--gpu", "reference", "--gpu-mem", "8G"], "--gpu-mem applies to GPU backends");
    assert_fails(&["--gpu", "reference", "--math", "fast"], "--math fast applies to the backends");
    assert_fails(&["--math", "sloppy"], "invalid value 'sloppy'");
    assert_fails(&["--expert-eviction", "random"], "invalid value 'random'");
    assert_fails(&["synth", "--out", "/tmp/dsrun-never", "--experts", "20"], "expert groups");
    assert_fails(&["synth", "--out", "/tmp/dsrun-never", "--layers", "0"], "--layers");
    assert_fails(&["synth", "--out", "/proc/dsrun-never", "--layers", "1", "--hidden", "64"], "/proc/dsrun-never");
    assert_fails(&["bench", "--model", "/nonexistent/model"], "config.json");
    assert_fails(&["bench", "-r", "0"], "--repetitions");
    assert_fails(&["--temperature", "-1"], "--temperature");
    assert_fails(&["--top-p", "1.5"], "--top-p");
    assert_fails(&["--ctx", "0"], "--ctx");
    assert_fails(&["-n", "many"], "invalid value 'many'");
    assert_fails(&["--model", v3], "no tokenizer.json");
    assert_fails(&["logits", "--model", v3, "--tokens", "1", "--out", "/nonexistent-dir/x.npy"], "/nonexistent-dir/x.npy");
}

#[test]
fn corrupt_checkpoint_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("v3_noaux").join("config.json"), dir.path().join("config.json")).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    assert_fails(&["inspect", "--model", dir.path().to_str().unwrap()], "corrupt safetensors");
}

/// `--gpu cuda` end to end on the CUDA emulator (the same kernels and host code as on a GPU):
/// greedy text equals the CPU reference's, and the stats name the runtime.
#[cfg(feature = "cuda")]
#[test]
fn cuda_backend_generates_the_reference_text() {
    let args = ["-n", "10", "--temperature", "0", "--prompt", "The file", "-v"];
    let cwd = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dsrun")).args(args).args(["--gpu", "cuda"]).env("DSRUN_CUDA_EMULATOR", "1").current_dir(cwd.path()).output().unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("CUDA emulator") && stderr.contains("launches"), "{stderr}");
    let cpu = dsrun(&[&args[..], &["--gpu", "cpu"]].concat());
    assert_eq!(text(&out.stdout), text(&cpu.stdout));
}

#[test]
fn generation_reports_why_it_stopped_and_honours_stop_strings() {
    let out = dsrun(&["-n", "24", "--temperature", "0", "--ignore-eos"]);
    let full = text(&out.stdout);
    let words: Vec<&str> = full.split_whitespace().collect();
    let stop = format!(" {}", words[5]);
    let out = dsrun(&["-n", "24", "--temperature", "0", "--ignore-eos", "--stop", &stop]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.trim_end(), &full[..full.find(&stop).unwrap()], "{stderr}");
    assert!(stderr.contains(&format!("stopped at stop string {stop:?}")), "{stderr}");
    assert_fails(&["--logit-bias", "5:1"], "ID=BIAS");
    assert_fails(&["--logit-bias", "999999=1"], "--logit-bias");
    assert_fails(&["--min-p", "2"], "--min-p");
    assert_fails(&["--repeat-penalty", "0"], "--repeat-penalty");
}

#[test]
fn chat_reads_turns_and_commands_from_a_pipe() {
    use std::io::Write;
    let cwd = tempfile::tempdir().unwrap();
    let mut child = spawn(&["chat", "--temperature", "0", "-n", "8", "--ignore-eos", "--stats"], cwd.path());
    child.stdin.take().unwrap().write_all(b"Hello there\n/reset\nHello there\n/system Be terse.\nAnd again\n/bogus\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("(system message set)") && stderr.contains("(new conversation)") && stderr.contains("unknown command /bogus"), "{stderr}");
    // Three replies with stats; the turn after /reset found its prompt in the cache.
    assert_eq!(stderr.matches("generated 8 tok").count(), 3, "{stderr}");
    assert!(stderr.lines().filter(|l| l.contains("prompt tokens reused")).any(|l| !l.contains("| 0 prompt tokens reused")), "{stderr}");
    // The same first turn after /reset gives the same greedy reply.
    let replies: Vec<&str> = stdout.lines().map(|l| l.trim_start_matches(">>> ")).filter(|l| !l.is_empty()).collect();
    assert_eq!(replies.len(), 3, "{stdout:?}");
    assert_eq!(replies[0], replies[1], "{stdout:?}");
}

#[test]
fn serve_answers_over_http_and_drains_on_sigterm() {
    use std::io::{Read, Write};
    let cwd = tempfile::tempdir().unwrap();
    let mut child = spawn(&["serve", "--port", "0", "--parallel", "2", "--ctx", "128"], cwd.path());
    let (addr, mut stderr) = listening_address(child.stderr.take().unwrap());
    // A plain HTTP/1.1 request over TCP, as any client sends it.
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    let body = r#"{"prompt": "This module", "max_tokens": 4, "temperature": 0}"#;
    write!(stream, "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("\"text_completion\""), "{response}");
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success(), "{rest}");
    assert!(rest.contains("drained"), "{rest}");
}

#[test]
fn perplexity_scores_a_file_the_same_on_cpu_and_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("text.txt");
    let sample = "This module provides functions for reading and writing files. It returns the value of the file. ".repeat(6);
    std::fs::write(&file, &sample).unwrap();
    let file = file.to_str().unwrap();
    let mut numbers = Vec::new();
    for gpu in ["cpu", "vulkan"] {
        let out = dsrun(&["perplexity", "--file", file, "--ctx", "48", "--gpu", gpu]);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let value = |key: &str| -> f64 { stdout.split(key).nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap() };
        numbers.push((value("perplexity "), value("bits per byte ")));
        assert!(stdout.contains("windows of 48"), "{stdout}");
    }
    let ((ppl_cpu, bpb_cpu), (ppl_gpu, bpb_gpu)) = (numbers[0], numbers[1]);
    // The bundled model has seen text like this: far better than uniform over 2048 tokens.
    assert!(ppl_cpu > 1.0 && ppl_cpu < 200.0, "{ppl_cpu}");
    assert!(((ppl_gpu - ppl_cpu) / ppl_cpu).abs() < 1e-3 && ((bpb_gpu - bpb_cpu) / bpb_cpu).abs() < 1e-3, "{numbers:?}");
    assert_fails(&["perplexity", "--file", "/nonexistent.txt"], "/nonexistent.txt");
}

#[test]
fn ctrl_c_stops_a_chat_reply_and_the_chat_goes_on() {
    use std::io::{BufRead, BufReader, Read, Write};
    let cwd = tempfile::tempdir().unwrap();
    let mut child = spawn(&["chat", "--temperature", "0", "-n", "1000", "--ignore-eos", "--ctx", "1024"], cwd.path());
    let mut stdin = child.stdin.take().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("dsrun chat on") {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "chat exited early");
    }
    let mut stdout = child.stdout.take().unwrap();
    stdin.write_all(b"Tell me everything\n").unwrap();
    // Interrupt once the reply is streaming: on the CPU backend the bundled model writes all
    // 1000 tokens in a fraction of a second, so a fixed wait could miss it.
    let (mut seen, mut buf) = (0, [0u8; 64]);
    while seen < 32 {
        let read = stdout.read(&mut buf).unwrap();
        assert!(read > 0, "chat closed its output before replying");
        seen += read;
    }
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let drain = std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    assert!(status.success());
    std::thread::sleep(std::time::Duration::from_millis(300));
    stdin.write_all(b"/exit\n").unwrap();
    drop(stdin);
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success(), "{rest}");
    drain.join().unwrap().unwrap();
    assert!(rest.contains("cancelled after"), "the reply was not stopped: {rest}");
}

#[test]
fn bench_measures_at_a_depth_and_in_batches() {
    let out = dsrun(&["bench", "-p", "4", "-n", "3", "-r", "1", "-d", "20", "--parallel", "1,3", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = report["tests"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    // The bundled model has an MTP layer: the speculative test runs beside the plain one.
    assert_eq!(names, ["pp4 @ d20", "tg3 @ d20", "tg3 mtp @ d20", "tg3x3 @ d20"]);
    assert!(report["tests"].as_array().unwrap().iter().all(|t| t["tok_per_s_mean"].as_f64().unwrap() > 0.0));
    assert_fails(&["bench", "-p", "hello"], "prompt length in tokens");
}

/// A failed write is an error, never a success: logits to a full device, generated text and
/// reports into a full stdout. The device stays a device (an atomic rename over it would have
/// replaced it with a file).
#[test]
fn failed_writes_fail() {
    use std::os::unix::fs::FileTypeExt;
    let full = std::path::Path::new("/dev/full");
    assert!(std::fs::metadata(full).is_ok_and(|m| m.file_type().is_char_device()), "the test needs /dev/full (Linux)");
    let out = dsrun(&["logits", "--tokens", "1,2,3", "--out", "/dev/full"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success() && stderr.contains("/dev/full") && !stderr.contains("wrote"), "{stderr}");
    assert!(std::fs::metadata(full).unwrap().file_type().is_char_device(), "/dev/full was replaced");
    for args in [&["-n", "4"][..], &["inspect"][..], &["devices"][..]] {
        let cwd = tempfile::tempdir().unwrap();
        let stdout = std::fs::OpenOptions::new().write(true).open(full).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_dsrun")).args(args).current_dir(cwd.path()).stdout(stdout).output().unwrap();
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} into a full stdout exited 0: {stderr}");
        assert!(stderr.contains("stdout") && !stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// A GGUF from llama.cpp's converter and llama-quantize (tests/fixtures/gguf) is all a user needs: `dsrun`,
/// `dsrun chat` (the file's chat template) and `dsrun serve` run it with no other file, and
/// `inspect` shows both its tables and what dsrun maps them to.
#[test]
fn a_gguf_runs_in_generate_chat_and_serve() {
    use std::io::{Read, Write};
    // llama.cpp's converter and llama-quantize's Q4_K_M (Q4_K, Q6_K, Q5_0 blocks as stored), on
    // the CPU backend and wgpu.
    let quantised = fixture("gguf").join("kq-q4_k_m.gguf");
    let file = quantised.to_str().unwrap();
    for gpu in ["cpu", "vulkan"] {
        let out = dsrun(&["--model", file, "--gpu", gpu, "--prompt", "Hello world", "-n", "6", "--temperature", "0", "--ignore-eos"]);
        assert!(out.status.success() && text(&out.stdout).starts_with("Hello world"), "{gpu}: {}{}", text(&out.stdout), text(&out.stderr));
        assert!(text(&out.stderr).contains("generated 6 tok"), "{gpu}: {}", text(&out.stderr));
    }

    let converted = fixture("gguf").join("v3_noaux-f32.gguf");
    let inspect = text(&dsrun(&["inspect", "--model", converted.to_str().unwrap()]).stdout);
    assert!(inspect.contains("architecture deepseek2") && inspect.contains("experts    16 routed + 1 shared"), "{inspect}");
    assert!(inspect.contains("-> model.layers.1.mlp.experts.{0..15}.gate_proj.weight") && inspect.contains("(W_UK half, joined)"), "{inspect}");

    let cwd = tempfile::tempdir().unwrap();
    let mut chat = spawn(&["chat", "--model", file, "--gpu", "cpu", "--temperature", "0", "-n", "4", "--ignore-eos", "--stats"], cwd.path());
    chat.stdin.take().unwrap().write_all(b"Hi\n").unwrap();
    let out = chat.wait_with_output().unwrap();
    assert!(out.status.success() && text(&out.stderr).contains("generated 4 tok"), "{}", text(&out.stderr));

    let mut serve = spawn(&["serve", "--model", file, "--gpu", "vulkan", "--port", "0", "--ctx", "64"], cwd.path());
    // Its stderr is kept open (and read to the end): a closed pipe would fail its last words.
    let (addr, mut stderr) = listening_address(serve.stderr.take().unwrap());
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    let body = r#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}"#;
    write!(stream, "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200") && response.contains("\"chat.completion\""), "{response}");
    Command::new("kill").args(["-TERM", &serve.id().to_string()]).status().unwrap();
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert!(serve.wait().unwrap().success(), "{rest}");
}

/// `dsrun quantize` writes a GGUF that `dsrun` then runs alone; a type it does not write and an
/// output it cannot create are refused with the reason and a non-zero exit.
#[test]
fn quantize_writes_a_gguf_that_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("bundled-q8_0.gguf");
    let out = out_path.to_str().unwrap();
    let written = dsrun(&["quantize", out, "Q8_0"]);
    assert!(written.status.success() && text(&written.stderr).contains("wrote") && text(&written.stderr).contains("Q8_0"), "{}", text(&written.stderr));
    let run = dsrun(&["--model", out, "--gpu", "cpu", "--prompt", "Hello world", "-n", "4", "--temperature", "0", "--ignore-eos"]);
    assert!(run.status.success() && text(&run.stdout).starts_with("Hello world"), "{}{}", text(&run.stdout), text(&run.stderr));

    let bad_type = dsrun(&["quantize", out, "Q3_K_S"]);
    assert!(!bad_type.status.success() && text(&bad_type.stderr).contains("Q4_K_M"), "{}", text(&bad_type.stderr));
    let nowhere = dir.path().join("missing").join("x.gguf");
    let failed = dsrun(&["quantize", nowhere.to_str().unwrap(), "Q8_0"]);
    assert!(!failed.status.success() && text(&failed.stderr).contains("missing"), "{}", text(&failed.stderr));
}

/// A free TCP port on 127.0.0.1 for a job's MASTER_PORT.
fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string()
}

/// `dsrun args` as rank `rank` of a `world`-rank job at 127.0.0.1:`port` (torchrun's variables).
fn spawn_rank(args: &[&str], cwd: &std::path::Path, rank: usize, world: usize, port: &str) -> std::process::Child {
    use std::process::Stdio;
    Command::new(env!("CARGO_BIN_EXE_dsrun"))
        .args(args)
        .current_dir(cwd)
        .env("XDG_CACHE_HOME", cwd)
        .envs([("RANK", rank.to_string()), ("LOCAL_RANK", rank.to_string()), ("WORLD_SIZE", world.to_string()), ("MASTER_ADDR", "127.0.0.1".into()), ("MASTER_PORT", port.into())])
        .env("DSRUN_COMM_TIMEOUT", "30")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Several devices and several processes: `--devices 0,0,0` in one process, and a job of two
/// processes joined over 127.0.0.1 (rank 0 generates, rank 1 follows and exits 0 when it ends),
/// both give one device's greedy text.
#[test]
fn divided_among_devices_and_processes_generates_the_one_device_text() {
    let args = ["--gpu", "vulkan", "-n", "24", "--temperature", "0", "--prompt", "The file", "--speculative", "off"];
    let one = dsrun(&args);
    assert!(one.status.success(), "{}", text(&one.stderr));
    let want = text(&one.stdout);
    let three = dsrun(&[&args[..], &["--devices", "0,0,0"]].concat());
    assert!(three.status.success(), "{}", text(&three.stderr));
    assert_eq!(text(&three.stdout), want);
    assert!(text(&three.stderr).contains("rank 0 of 3"), "{}", text(&three.stderr));

    let cwd = tempfile::tempdir().unwrap();
    let port = free_port();
    let ranks = [&args[..], &["--devices", "0,0"]].concat();
    let follower = spawn_rank(&ranks, cwd.path(), 1, 2, &port);
    let leader = spawn_rank(&ranks, cwd.path(), 0, 2, &port).wait_with_output().unwrap();
    let follower = follower.wait_with_output().unwrap();
    assert!(leader.status.success(), "rank 0: {}", text(&leader.stderr));
    assert!(follower.status.success(), "rank 1: {}", text(&follower.stderr));
    assert_eq!(text(&leader.stdout), want);
    assert!(text(&leader.stderr).contains("rank 0 of 2, TCP"), "{}", text(&leader.stderr));
    assert_eq!(text(&follower.stdout), "", "rank 1 prints nothing");

    // A job of one rank through the TCP communicator: the whole distributed path, one device.
    let single = Command::new(env!("CARGO_BIN_EXE_dsrun")).args(args).current_dir(cwd.path()).envs([("WORLD_SIZE", "1"), ("DSRUN_COMM", "tcp")]).output().unwrap();
    assert!(single.status.success(), "{}", text(&single.stderr));
    assert_eq!(text(&single.stdout), want);
}

/// A rank killed mid-generation ends rank 0 with an error naming it, at once (its sockets
/// close); a server whose rank is killed answers 503 from then on, naming the rank.
#[test]
fn a_killed_rank_ends_the_job_and_the_server_answers_503() {
    use std::io::{Read, Write};
    let cwd = tempfile::tempdir().unwrap();
    let port = free_port();
    let args = ["--gpu", "vulkan", "--devices", "0,0", "-n", "1000", "--temperature", "0", "--ignore-eos", "--speculative", "off"];
    let mut follower = spawn_rank(&args, cwd.path(), 1, 2, &port);
    let mut leader = spawn_rank(&args, cwd.path(), 0, 2, &port);
    // Once rank 0 streams text, the job is in its decode loop.
    let mut first = [0u8; 16];
    leader.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    follower.kill().unwrap();
    let killed = std::time::Instant::now();
    let out = leader.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("rank 1 of 2") && stderr.contains("closed its connection"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(killed.elapsed() < std::time::Duration::from_secs(20), "{:?}", killed.elapsed());
    follower.wait().unwrap();

    let port = free_port();
    let serve = ["serve", "--port", "0", "--ctx", "64", "--gpu", "vulkan", "--devices", "0,0", "--speculative", "off"];
    let mut follower = spawn_rank(&serve, cwd.path(), 1, 2, &port);
    let mut leader = spawn_rank(&serve, cwd.path(), 0, 2, &port);
    let (addr, mut stderr) = listening_address(leader.stderr.take().unwrap());
    let post = || {
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        let body = r#"{"prompt": "This module", "max_tokens": 4, "temperature": 0}"#;
        write!(stream, "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    };
    let ok = post();
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    follower.kill().unwrap();
    follower.wait().unwrap();
    for _ in 0..2 {
        let down = post();
        assert!(down.starts_with("HTTP/1.1 503"), "{down}");
        assert!(down.contains("rank 1 of 2") && down.contains("engine_unavailable"), "{down}");
    }
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    write!(stream, "GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut health = String::new();
    stream.read_to_string(&mut health).unwrap();
    assert!(health.starts_with("HTTP/1.1 503") && health.contains("\"unavailable\"") && health.contains("rank 1 of 2"), "{health}");
    let status = Command::new("kill").args(["-TERM", &leader.id().to_string()]).status().unwrap();
    assert!(status.success());
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    leader.wait().unwrap();
    assert!(!rest.contains("panicked"), "{rest}");
}

/// A rank that cannot load its share (here: no adapter 7) ends the job on every rank, naming
/// itself and why, however long the others took to load.
#[test]
fn a_rank_that_fails_to_load_is_named_on_rank_0() {
    let cwd = tempfile::tempdir().unwrap();
    let port = free_port();
    let args = ["--gpu", "vulkan", "--devices", "0,7", "-n", "4"];
    let follower = spawn_rank(&args, cwd.path(), 1, 2, &port);
    let leader = spawn_rank(&args, cwd.path(), 0, 2, &port).wait_with_output().unwrap();
    let follower = follower.wait_with_output().unwrap();
    let (stderr, theirs) = (text(&leader.stderr), text(&follower.stderr));
    assert!(!leader.status.success() && !follower.status.success(), "{stderr}\n{theirs}");
    assert!(stderr.contains("rank 1 of 2") && stderr.contains("--devices 7"), "rank 0: {stderr}");
    assert!(theirs.contains("--devices 7") && !theirs.contains("panicked"), "rank 1: {theirs}");
}

#[test]
fn bad_parallel_settings_fail_cleanly() {
    assert_fails(&["--gpu", "vulkan", "--devices", "0,9", "-n", "2"], "--devices 9");
    assert_fails(&["--gpu", "vulkan", "--devices", "0,0", "--tensor-split", "1", "-n", "2"], "--tensor-split has 1 weights for 2 --devices");
    assert_fails(&["--gpu", "vulkan", "--devices", "0,0", "--tensor-split", "1,-1", "-n", "2"], "one positive weight per device");
    assert_fails(&["--gpu", "cpu", "--devices", "0,0", "-n", "2"], "--gpu cpu runs on the host");
    assert_fails(&["--gpu", "vulkan", "--devices", "0,0", "--gpu-mem", "1M", "-n", "2"], "this device's share");
    let world = Command::new(env!("CARGO_BIN_EXE_dsrun")).args(["-n", "2"]).env("WORLD_SIZE", "2").env("MASTER_ADDR", "127.0.0.1").env("MASTER_PORT", "1").output().unwrap();
    assert!(!world.status.success() && text(&world.stderr).contains("RANK is not set"), "{}", text(&world.stderr));
}
