//! Bad input gets a clear error naming the problem, never a panic or a wrong answer:
//! config problems, missing/mis-shaped/mis-typed tensors, corrupt safetensors, bad requests.

mod common;
use common::fixture;
use dsrun::model::{Logits, Model};
use safetensors::tensor::TensorView;
use std::path::{Path, PathBuf};

/// A writable copy of a fixture (config and weights only).
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap();
        if file != "golden.safetensors" {
            std::fs::copy(&path, dir.path().join(file)).unwrap();
        }
    }
    dir
}

fn load_err(dir: &Path) -> String {
    match Model::load(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

struct Owned {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// Rewrites `model.safetensors` in `dir` after `edit` changes its tensors.
fn rewrite(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Owned)>)) {
    rewrite_file(&dir.join("model.safetensors"), edit)
}

/// Rewrites the safetensors file at `path` after `edit` changes its tensors.
fn rewrite_file(path: &Path, edit: impl FnOnce(&mut Vec<(String, Owned)>)) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Owned)> = st.tensors().into_iter().map(|(n, v)| (n, Owned { dtype: v.dtype(), shape: v.shape().to_vec(), data: v.data().to_vec() })).collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors.iter().map(|(n, t)| (n.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap())).collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// A safetensors file from a literal JSON header and `data_len` zero bytes of data.
fn raw_safetensors(path: &Path, header: &str, data_len: usize) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, data_len));
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn missing_directory_or_config() {
    let e = load_err(Path::new("/nonexistent/dsrun-model"));
    assert!(e.contains("config.json") && e.contains("--model"), "{e}");
    let dir = copy_fixture("v3_noaux");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert!(load_err(dir.path()).contains("config.json"));
}

#[test]
fn malformed_config_and_unknown_model_type() {
    let dir = copy_fixture("v3_noaux");
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("config.json") && e.contains("malformed JSON"), "{e}");

    let text = std::fs::read_to_string(fixture("v3_noaux").join("config.json")).unwrap();
    std::fs::write(dir.path().join("config.json"), text.replace("deepseek_v3", "mixtral")).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model_type") && e.contains("mixtral"), "{e}");
}

#[test]
fn missing_weights_file() {
    let dir = copy_fixture("v3_noaux");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors") && e.contains("no weights"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_fixture("v3_noaux");
    let victim = "model.layers.1.mlp.experts.3.up_proj.weight";
    rewrite(dir.path(), |t| t.retain(|(n, _)| n != victim));
    let e = load_err(dir.path());
    assert!(e.contains(victim) && e.contains("missing"), "{e}");
}

#[test]
fn wrong_shape_names_tensor_expected_and_found() {
    let dir = copy_fixture("v3_noaux");
    let victim = "model.layers.0.self_attn.kv_b_proj.weight";
    rewrite(dir.path(), |t| {
        let entry = &mut t.iter_mut().find(|(n, _)| n == victim).unwrap().1;
        entry.shape.reverse();
    });
    let e = load_err(dir.path());
    // kv_b_proj is [heads * (nope + v), kv_lora] = [4 * 40, 32].
    assert!(e.contains(victim) && e.contains("[160, 32]") && e.contains("[32, 160]"), "{e}");
}

#[test]
fn wrong_dtype_is_named() {
    let dir = copy_fixture("v3_noaux");
    let victim = "model.layers.2.post_attention_layernorm.weight";
    rewrite(dir.path(), |t| {
        let entry = &mut t.iter_mut().find(|(n, _)| n == victim).unwrap().1;
        entry.dtype = safetensors::Dtype::I16; // same byte count as BF16
    });
    let e = load_err(dir.path());
    assert!(e.contains(victim) && e.contains("I16"), "{e}");

    let dir = copy_fixture("v3_noaux");
    let victim = "model.layers.0.mlp.up_proj.weight";
    rewrite(dir.path(), |t| {
        let entry = &mut t.iter_mut().find(|(n, _)| n == victim).unwrap().1;
        entry.dtype = safetensors::Dtype::U16;
    });
    let e = load_err(dir.path());
    assert!(e.contains(victim) && e.contains("U16"), "{e}");
}

#[test]
fn fp8_weight_without_its_scale() {
    let dir = copy_fixture("v3_fp8");
    let victim = "model.layers.1.self_attn.o_proj.weight_scale_inv";
    let index_path = dir.path().join("model.safetensors.index.json");
    let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let shard = index["weight_map"][victim].as_str().unwrap().to_string();
    index["weight_map"].as_object_mut().unwrap().remove(victim);
    std::fs::write(&index_path, index.to_string()).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains(victim) && e.contains("missing"), "{e} (was in {shard})");
}

#[test]
fn index_naming_an_absent_shard() {
    let dir = copy_fixture("v3_fp8");
    let index_path = dir.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index_path).unwrap();
    std::fs::write(&index_path, text.replacen("model-00002-of-00003.safetensors", "model-00009-of-00003.safetensors", 1)).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model-00009-of-00003.safetensors"), "{e}");
}

#[test]
fn truncated_safetensors() {
    let dir = copy_fixture("v3_noaux");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("corrupt safetensors") && e.contains("past the") && e.contains("truncated"), "{e}");

    std::fs::write(&path, &bytes[..5]).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("corrupt safetensors") && e.contains("shorter than the 8-byte header"), "{e}");
}

#[test]
fn header_length_past_the_end_of_the_file() {
    let dir = copy_fixture("v3_noaux");
    let path = dir.path().join("model.safetensors");
    let mut bytes = 1_000_000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&path, bytes).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("header length 1000000") && e.contains("past the end"), "{e}");
}

#[test]
fn offsets_out_of_range_and_overlapping_tensors() {
    let dir = copy_fixture("v3_noaux");
    let path: PathBuf = dir.path().join("model.safetensors");
    raw_safetensors(&path, r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, 8);
    let e = load_err(dir.path());
    assert!(e.contains("`a` ends at data byte 16") && e.contains("8 data bytes"), "{e}");

    raw_safetensors(&path, r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#, 24);
    let e = load_err(dir.path());
    assert!(e.contains("overlap"), "{e}");

    raw_safetensors(&path, r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}"#, 12);
    let e = load_err(dir.path());
    assert!(e.contains("tensor `a` (F32 [4]) needs 16 bytes"), "{e}");

    raw_safetensors(&path, r#"{"a": oops}"#, 0);
    let e = load_err(dir.path());
    assert!(e.contains("not valid JSON"), "{e}");
}

#[test]
fn token_id_out_of_vocabulary() {
    let model = Model::load(&fixture("v3_noaux")).unwrap();
    let mut cache = model.new_cache(8);
    let e = model.forward(&mut cache, &[3, 320], Logits::All).unwrap_err().to_string();
    assert!(e.contains("token id 320") && e.contains("320 tokens"), "{e}");
    assert_eq!(cache.len(), 0, "a rejected request leaves the cache untouched");
}

#[test]
fn more_tokens_than_the_context() {
    let model = Model::load(&fixture("v3_noaux")).unwrap();
    let mut cache = model.new_cache(4);
    let e = model.forward(&mut cache, &[1, 2, 3, 4, 5], Logits::Last).unwrap_err().to_string();
    assert!(e.contains("context") && e.contains("--ctx"), "{e}");
    model.forward(&mut cache, &[1, 2, 3, 4], Logits::Last).unwrap();
    assert!(model.forward(&mut cache, &[5], Logits::Last).is_err(), "a full cache refuses more");
}

/// A config.json with `edit` applied to its JSON.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
}

/// Sizes that would hang a loop over layers or overflow a shape are refused before anything
/// depends on them (the test would time out, not fail, if they hung: each runs in a thread
/// with a deadline).
#[test]
fn absurd_sizes_are_refused_at_once() {
    let cases: [(&str, serde_json::Value, &str); 4] = [
        ("num_hidden_layers", serde_json::json!(1_000_000_000_000_000_000u64), "num_hidden_layers"),
        ("moe_layer_freq", serde_json::json!(1_000_000_000_000_000_000u64), "moe_layer_freq"),
        ("num_attention_heads", serde_json::json!(1u64 << 62), "num_attention_heads"),
        ("vocab_size", serde_json::json!(u64::MAX), "vocab_size"),
    ];
    for (key, value, named) in cases {
        let dir = copy_fixture("v3_noaux");
        edit_config(dir.path(), |c| {
            c[key] = value.clone();
            c["first_k_dense_replace"] = serde_json::json!(0);
        });
        let path = dir.path().to_path_buf();
        let (send, receive) = std::sync::mpsc::channel();
        std::thread::spawn(move || send.send(load_err(&path)).unwrap());
        let err = receive.recv_timeout(std::time::Duration::from_secs(20)).unwrap_or_else(|_| panic!("{key} = {value}: loading hangs"));
        assert!(err.contains(named) && err.contains("corrupt"), "{key}: {err}");
    }
}

/// Config values that cannot give finite logits are refused with the key named.
#[test]
fn values_that_cannot_give_finite_results_are_refused() {
    let cases: [(&str, &str, serde_json::Value); 4] = [
        ("routed_scaling_factor", "routed_scaling_factor", serde_json::json!(1e308)),
        ("rope_scaling", "beta_fast", serde_json::json!({"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256, "beta_fast": 0, "beta_slow": 1})),
        ("rope_scaling", "mscale_all_dim", serde_json::json!({"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256, "mscale_all_dim": 1e300})),
        ("rms_norm_eps", "rms_norm_eps", serde_json::json!(1e300)),
    ];
    for (key, named, value) in cases {
        let dir = copy_fixture("v3_noaux");
        edit_config(dir.path(), |c| c[key] = value.clone());
        let err = load_err(dir.path());
        assert!(err.contains(named), "{key} = {value}: {err}");
    }
}

/// The bf16 bits of a NaN.
const BF16_NAN: [u8; 2] = [0xc0, 0x7f];

/// Non-finite weights: a norm or a router bias is refused at load naming the tensor; a NaN in
/// a matrix (the embedding row of a prompt token) makes the logits non-finite, which every
/// backend reports as an error naming the position instead of emitting a token.
#[test]
fn non_finite_weights_are_errors_not_tokens() {
    let dir = copy_fixture("v3_noaux");
    rewrite(dir.path(), |t| {
        let norm = t.iter_mut().find(|(n, _)| n == "model.layers.1.post_attention_layernorm.weight").unwrap();
        norm.1.data[4..6].copy_from_slice(&BF16_NAN);
    });
    let err = load_err(dir.path());
    assert!(err.contains("model.layers.1.post_attention_layernorm.weight") && err.contains("non-finite"), "{err}");

    let dir = copy_fixture("v3_noaux");
    rewrite(dir.path(), |t| {
        let bias = t.iter_mut().find(|(n, _)| n == "model.layers.2.mlp.gate.e_score_correction_bias").unwrap();
        bias.1.data[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let err = load_err(dir.path());
    assert!(err.contains("e_score_correction_bias") && err.contains("non-finite"), "{err}");

    // Token 7's embedding row gets a NaN: the prompt [3, 7, 5] runs finitely until position 1.
    let dir = copy_fixture("v3_noaux");
    let hidden = 64;
    rewrite(dir.path(), |t| {
        let embed = t.iter_mut().find(|(n, _)| n == "model.embed_tokens.weight").unwrap();
        let at = (7 * hidden + 3) * 2;
        embed.1.data[at..at + 2].copy_from_slice(&BF16_NAN);
    });
    let model = Model::load(dir.path()).unwrap();
    let tokens = [3u32, 7, 5];
    let mut cache = model.new_cache(8);
    let err = model.forward(&mut cache, &tokens, Logits::All).unwrap_err().to_string();
    assert!(err.contains("position 1") && err.contains("not finite") && err.contains("dsrun check"), "CPU: {err}");
    let ctx = dsrun::backend::wgpu::context::open(dsrun::device::GpuChoice::Auto).expect("a wgpu adapter");
    let mut gpu = dsrun::runtime::GpuModel::new(ctx, &model, 8, Default::default()).unwrap();
    use dsrun::engine::Steps;
    let err = gpu.forward(&tokens, Logits::All).unwrap_err().to_string();
    assert!(err.contains("position 1") && err.contains("not finite"), "wgpu logits: {err}");
    gpu.reset();
    // Greedy: the argmax kernel flags the row; the NaN reaches the last position through attention.
    let err = gpu.forward_greedy(&tokens).unwrap_err().to_string();
    assert!(err.contains("position 2") && err.contains("not finite"), "wgpu greedy: {err}");
}

/// `dsrun check` names every tensor holding a non-finite value (an FP8 NaN code in one shard,
/// a bf16 infinity in another) and exits non-zero; a clean checkpoint passes.
#[test]
fn check_names_the_tensors_with_non_finite_values() {
    let dsrun = |dir: &Path| std::process::Command::new(env!("CARGO_BIN_EXE_dsrun")).args(["check", "--model", dir.to_str().unwrap()]).output().unwrap();
    let dir = copy_fixture("v3_fp8");
    let clean = dsrun(dir.path());
    assert!(clean.status.success() && String::from_utf8_lossy(&clean.stdout).contains("every value is finite"), "{clean:?}");
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("model.safetensors.index.json")).unwrap()).unwrap();
    let shard = |name: &str| dir.path().join(index["weight_map"][name].as_str().unwrap());
    let fp8 = "model.layers.2.mlp.experts.3.up_proj.weight";
    let bf16 = "model.norm.weight";
    rewrite_file(&shard(fp8), |t| t.iter_mut().find(|(n, _)| n == fp8).unwrap().1.data[10] = 0x7f);
    rewrite_file(&shard(bf16), |t| t.iter_mut().find(|(n, _)| n == bf16).unwrap().1.data[2..4].copy_from_slice(&[0x80, 0x7f]));
    let out = dsrun(dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains(&format!("{fp8}: 1 non-finite value(s), the first NaN at element 10")), "{stdout}");
    assert!(stdout.contains(&format!("{bf16}: 1 non-finite value(s), the first inf at element 1")), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 tensor(s) hold non-finite values"), "{out:?}");
}

/// `logits` writes through a temporary file renamed into place: when the write fails (here
/// the target is a directory) the error names the path and nothing half-written is left.
#[test]
fn a_failed_logits_write_leaves_no_partial_file() {
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("taken");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("keep"), b"x").unwrap();
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_dsrun"))
        .args(["logits", "--model", fixture("v3_noaux").to_str().unwrap(), "--tokens", "1,2", "--out", target.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && stderr.contains("taken"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(out.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["taken"], "a partial file was left: {left:?}");
}

/// Messages that name what is wrong: a tensor a shard holds but the index omits; a weights
/// path that is a directory or a symlink loop; a tensor whose byte range does not fit its
/// dtype and shape; a tokenizer whose ids the model has no embedding for.
#[test]
fn unclear_cases_are_named() {
    let dir = copy_fixture("v3_fp8");
    let index_path = dir.path().join("model.safetensors.index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let shard = index["weight_map"]["model.norm.weight"].as_str().unwrap().to_string();
    index["weight_map"].as_object_mut().unwrap().remove("model.norm.weight");
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model.norm.weight") && err.contains(&shard) && err.contains("the index does not name it"), "{err}");

    let dir = copy_fixture("v3_noaux");
    let weights = dir.path().join("model.safetensors");
    std::fs::remove_file(&weights).unwrap();
    std::fs::create_dir(&weights).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model.safetensors") && err.contains("not a file"), "{err}");
    std::fs::remove_dir(&weights).unwrap();
    std::os::unix::fs::symlink(&weights, &weights).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model.safetensors") && err.to_lowercase().contains("symbolic link"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("v3_noaux").join("config.json"), dir.path().join("config.json")).unwrap();
    raw_safetensors(&dir.path().join("model.safetensors"), r#"{"ok":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"bad":{"dtype":"F32","shape":[4],"data_offsets":[8,16]}}"#, 16);
    let err = load_err(dir.path());
    assert!(err.contains("tensor `bad`") && err.contains("needs 16 bytes"), "{err}");

    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(bundled.join("config.json")).unwrap()).unwrap();
    config["vocab_size"] = serde_json::json!(100);
    let config = dsrun::config::ModelConfig::from_json(&config).unwrap();
    let tokenizer = dsrun::tokenizer::Tokenizer::load(&bundled, &config).unwrap();
    let ids = tokenizer.encode("Return the value of the attribute").unwrap();
    let err = dsrun::model::check_request(&config, 0, 64, &ids).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json") && err.contains("vocab_size") && err.contains("disagree"), "{err}");
}

/// A checkpoint truncated while a run reads it (memory-mapped): a message naming the
/// checkpoint and exit status 1, not a bare SIGBUS.
#[cfg(unix)]
#[test]
fn a_checkpoint_truncated_under_a_running_process_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights");
    for entry in std::fs::read_dir(&bundled).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    // Seconds of CPU work: perplexity over a long text, window after window.
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "Return the value of the attribute named by the string. ".repeat(4000)).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_dsrun"))
        .args(["perplexity", "--gpu", "cpu", "--model", dir.path().to_str().unwrap(), "--file", text.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let weights = std::fs::OpenOptions::new().write(true).open(dir.path().join("model.safetensors")).unwrap();
    weights.set_len(1 << 20).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("SIGBUS") && stderr.contains(dir.path().to_str().unwrap()), "{stderr}");
}

/// Config errors are typed: the key at fault and why, so a program (a server, a loader UI)
/// can name the key without parsing the message.
#[test]
fn config_errors_name_their_key() {
    let cases: [(&str, serde_json::Value, &str); 5] = [
        ("scoring_func", serde_json::json!("relu"), "scoring_func"),
        ("num_experts_per_tok", serde_json::json!(1000), "num_experts_per_tok"),
        ("rms_norm_eps", serde_json::json!(-1.0), "rms_norm_eps"),
        ("hidden_size", serde_json::json!("wide"), "hidden_size"),
        ("rope_scaling", serde_json::json!({"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 256}), "rope_scaling.factor"),
    ];
    for (key, value, named) in cases {
        let dir = copy_fixture("v3_noaux");
        edit_config(dir.path(), |c| c[key] = value.clone());
        match dsrun::config::ModelConfig::from_file(&dir.path().join("config.json")) {
            Err(dsrun::error::Error::Config { key: got, why }) => assert_eq!(got, named, "{key} = {value}: {why}"),
            other => panic!("{key} = {value}: {:?}", other.map(|_| "loaded")),
        }
    }
}
