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
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Owned)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, Owned { dtype: v.dtype(), shape: v.shape().to_vec(), data: v.data().to_vec() }))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, t)| (n.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap())).collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// A safetensors file from a literal JSON header and `data_len` zero bytes of data.
fn raw_safetensors(path: &Path, header: &str, data_len: usize) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat(0u8).take(data_len));
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

    raw_safetensors(
        &path,
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
        24,
    );
    let e = load_err(dir.path());
    assert!(e.contains("overlap"), "{e}");

    raw_safetensors(&path, r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}"#, 12);
    let e = load_err(dir.path());
    assert!(e.contains("does not match its dtype and shape"), "{e}");

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
