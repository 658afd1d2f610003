//! llama.cpp's `deepseek2` GGUF layout (what its converter writes for DeepSeek-V2, V2-Lite,
//! V2.5, V3, R1, V3.1, Moonlight and Kimi-K2) presented as dsrun's own: the metadata as the
//! Hugging Face `config.json` it was converted from (then parsed and checked by the same code),
//! the tensors under the names the weights loader looks up, each a range of the mapped file.
//!
//! Where the layouts differ:
//! - Routed experts are stacked (`blk.N.ffn_{gate,up,down}_exps`, experts outermost): each
//!   expert is a contiguous slice of the stack.
//! - Attention's up-projection: files from mid-2025 on split `kv_b_proj` into `attn_k_b` (per
//!   head, W_UK transposed: `[heads, kv_lora, nope]`) and `attn_v_b` (`[heads, v, kv_lora]`);
//!   older files keep `attn_kv_b`. The split one is joined back into `kv_b_proj`'s layout at
//!   load (a transpose: exact, and small beside the experts).
//! - RoPE: the converter writes the query and key weights unpermuted and llama.cpp rotates
//!   adjacent pairs, which is DeepSeek's own rule: nothing to map.
//! - YaRN: `rope.scaling.yarn_log_multiplier` is 0.1 x `mscale_all_dim` (the converter's rule);
//!   `mscale` is not stored, and llama.cpp computes as if it equalled `mscale_all_dim`, as it
//!   does in every published DeepSeek config.
//! - The router: `expert_gating_func` 1 is softmax, 2 sigmoid; the correction bias
//!   (`exp_probs_b`) is what marks noaux_tc routing; several expert groups without it are
//!   group-limited greedy (DeepSeek-V2), one is greedy.
//! - The MTP layer: the `deepseek2` converter drops it; a file that has one (`nextn_predict_layers`)
//!   runs without it.

use super::{Gguf, TensorInfo as GgufTensor, Value};
use crate::checkpoint::{Checkpoint, ShardBytes, TensorInfo};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::quant::DType;
use serde_json::{json, Map, Value as Json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The architecture name llama.cpp gives the DeepSeek family.
pub const ARCHITECTURE: &str = "deepseek2";

/// A GGUF file's model: its config and its tensors under dsrun's names.
pub struct GgufModel {
    pub config: ModelConfig,
    pub checkpoint: Checkpoint,
    pub gguf: Gguf,
}

/// Opens `path` (a whole file, or the first of split files `NAME-00001-of-0000N.gguf`: the
/// others are opened beside it), maps its metadata to a config and its tensors to dsrun's
/// names.
pub fn open(path: &Path) -> Result<GgufModel> {
    let files = open_splits(path)?;
    let config = config_of(&files).map_err(|e| in_file(path, e))?;
    let checkpoint = checkpoint(&files).map_err(|e| in_file(path, e))?;
    let gguf = files.into_iter().next().expect("the first file").1;
    Ok(GgufModel { config, checkpoint, gguf })
}

/// The files of a model: `path` alone, or with the rest of its splits (llama.cpp's
/// `gguf-split`: `split.count` files named `PREFIX-%05d-of-%05d.gguf`, each saying which it
/// is in `split.no`; the first holds the metadata).
fn open_splits(path: &Path) -> Result<Vec<(PathBuf, Gguf, ShardBytes)>> {
    let (first, map) = Gguf::open(path)?;
    let split = |g: &Gguf, key: &str| g.get(key).and_then(Value::as_u64);
    let count = split(&first, "split.count").unwrap_or(1);
    let mut files = vec![(path.to_path_buf(), first, Arc::new(map) as ShardBytes)];
    if count <= 1 {
        return Ok(files);
    }
    let no = split(&files[0].1, "split.no").unwrap_or(0);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let suffix = format!("-{:05}-of-{count:05}.gguf", no + 1);
    let prefix = match name.strip_suffix(&suffix) {
        Some(prefix) if no == 0 => prefix,
        _ => return Err(Error::Invalid(format!("{}: split {} of {count} of a model: open the first, named PREFIX-00001-of-{count:05}.gguf", path.display(), no + 1))),
    };
    for i in 1..count {
        let shard = path.with_file_name(format!("{prefix}-{:05}-of-{count:05}.gguf", i + 1));
        if !shard.is_file() {
            return Err(Error::Invalid(format!("{}: split {} of {count}, {}, is missing", path.display(), i + 1, shard.display())));
        }
        let (g, map) = Gguf::open(&shard)?;
        if split(&g, "split.no") != Some(i) || split(&g, "split.count") != Some(count) {
            return Err(Error::Invalid(format!("{}: its `split.no` / `split.count` do not say split {} of {count}: not a split of this model", shard.display(), i + 1)));
        }
        files.push((shard, g, Arc::new(map) as ShardBytes));
    }
    let tensors: usize = files.iter().map(|(_, g, _)| g.tensors.len()).sum();
    if let Some(want) = split(&files[0].1, "split.tensors.count").filter(|&n| n != tensors as u64) {
        return Err(Error::Invalid(format!("{}: the splits hold {tensors} tensors, the first says {want}", path.display())));
    }
    Ok(files)
}

/// Only the tables and the config (no tensor is touched): what `EngineBuilder::open` needs.
pub fn open_config(path: &Path) -> Result<(Gguf, ModelConfig)> {
    let files = open_splits(path)?;
    let config = config_of(&files).map_err(|e| in_file(path, e))?;
    Ok((files.into_iter().next().expect("the first file").1, config))
}

/// The config of a model's files: the first's metadata, every file's tensor names.
fn config_of(files: &[(PathBuf, Gguf, ShardBytes)]) -> Result<ModelConfig> {
    let names: Vec<&str> = files.iter().flat_map(|(_, g, _)| g.tensors.iter().map(|t| t.name.as_str())).collect();
    ModelConfig::from_json(&config_json(&files[0].1, &names)?)
}

fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::Invalid(why) => Error::Invalid(format!("{}: {why}", path.display())),
        Error::Config { key, why } => Error::Config { key, why: format!("{} (from the GGUF metadata of {})", why, path.display()) },
        e => e,
    }
}

/// A single file's metadata as the `config.json` it came from, parsed by
/// [`ModelConfig::from_json`].
pub fn config(g: &Gguf) -> Result<ModelConfig> {
    let names: Vec<&str> = g.tensors.iter().map(|t| t.name.as_str()).collect();
    ModelConfig::from_json(&config_json(g, &names)?)
}

/// `deepseek2.*` keys (and the tokenizer's special ids) under their `config.json` names;
/// `tensors`: the model's tensor names (of every split), which say whether the router has a
/// correction bias and the head its own weights.
pub fn config_json(g: &Gguf, tensors: &[&str]) -> Result<Json> {
    let arch = g.architecture().ok_or_else(|| Error::Invalid("no `general.architecture` in the metadata: not a model file llama.cpp wrote".into()))?;
    if arch != ARCHITECTURE {
        return Err(Error::Invalid(format!("architecture `{arch}`: dsrun runs DeepSeek-architecture models (llama.cpp's `{ARCHITECTURE}`)")));
    }
    let m = Meta { g, arch };
    let rope_dim = m.required("rope.dimension_count")?;
    // Files since mid-2025 give the MLA head sizes in `*_mla`; before, `key_length` and
    // `value_length` were them.
    let key_length = match m.uint("attention.key_length_mla")? {
        Some(k) => k,
        None => m.required("attention.key_length")?,
    };
    let v_head_dim = match m.uint("attention.value_length_mla")? {
        Some(v) => v,
        None => m.required("attention.value_length")?,
    };
    let qk_nope = key_length.checked_sub(rope_dim).ok_or_else(|| Error::Invalid(format!("`{arch}.attention.key_length_mla` ({key_length}) is smaller than the rotary dimension ({rope_dim})")))?;
    let scoring = match m.uint("expert_gating_func")? {
        None | Some(1) => "softmax",
        Some(2) => "sigmoid",
        Some(other) => return Err(Error::Invalid(format!("`{arch}.expert_gating_func` is {other}: dsrun knows 1 (softmax) and 2 (sigmoid)"))),
    };
    let groups = m.uint("expert_group_count")?.unwrap_or(1);
    let has_bias = tensors.iter().any(|t| t.ends_with(".exp_probs_b.bias"));
    let topk_method = match (has_bias, groups) {
        (true, _) => "noaux_tc",
        (false, 1) => "greedy",
        (false, _) => "group_limited_greedy",
    };
    let nextn = m.uint("nextn_predict_layers")?.unwrap_or(0);
    let blocks = m.required("block_count")?;
    let vocab = match m.uint("vocab_size")? {
        Some(v) => v,
        None => match g.get("tokenizer.ggml.tokens") {
            Some(Value::Array(tokens)) => tokens.len() as u64,
            _ => return Err(Error::Invalid(format!("neither `{arch}.vocab_size` nor `tokenizer.ggml.tokens` gives the vocabulary size"))),
        },
    };
    let mut c = Map::new();
    c.insert("model_type".into(), json!(if scoring == "sigmoid" { "deepseek_v3" } else { "deepseek_v2" }));
    c.insert("vocab_size".into(), json!(vocab));
    c.insert("hidden_size".into(), json!(m.required("embedding_length")?));
    c.insert("intermediate_size".into(), json!(m.required("feed_forward_length")?));
    c.insert("moe_intermediate_size".into(), json!(m.required("expert_feed_forward_length")?));
    c.insert("num_hidden_layers".into(), json!(blocks.checked_sub(nextn).ok_or_else(|| Error::Invalid(format!("`{arch}.nextn_predict_layers` ({nextn}) exceeds the block count ({blocks})")))?));
    c.insert("first_k_dense_replace".into(), json!(m.uint("leading_dense_block_count")?.unwrap_or(0)));
    c.insert("num_attention_heads".into(), json!(m.required("attention.head_count")?));
    c.insert("q_lora_rank".into(), json!(m.uint("attention.q_lora_rank")?));
    c.insert("kv_lora_rank".into(), json!(m.required("attention.kv_lora_rank")?));
    c.insert("qk_nope_head_dim".into(), json!(qk_nope));
    c.insert("qk_rope_head_dim".into(), json!(rope_dim));
    c.insert("v_head_dim".into(), json!(v_head_dim));
    c.insert("n_routed_experts".into(), json!(m.required("expert_count")?));
    c.insert("n_shared_experts".into(), json!(m.uint("expert_shared_count")?.unwrap_or(0)));
    c.insert("num_experts_per_tok".into(), json!(m.required("expert_used_count")?));
    c.insert("n_group".into(), json!(groups));
    c.insert("topk_group".into(), json!(m.uint("expert_group_used_count")?.unwrap_or(1)));
    c.insert("scoring_func".into(), json!(scoring));
    c.insert("topk_method".into(), json!(topk_method));
    c.insert("norm_topk_prob".into(), json!(m.bool("expert_weights_norm")?.unwrap_or(false)));
    c.insert("routed_scaling_factor".into(), json!(m.float("expert_weights_scale")?.unwrap_or(1.0)));
    c.insert("rms_norm_eps".into(), json!(m.required_float("attention.layer_norm_rms_epsilon")?));
    c.insert("rope_theta".into(), json!(m.float("rope.freq_base")?.unwrap_or(10000.0)));
    c.insert("max_position_embeddings".into(), json!(m.required("context_length")?));
    c.insert("num_nextn_predict_layers".into(), json!(0));
    c.insert("hidden_act".into(), json!("silu"));
    c.insert("tie_word_embeddings".into(), json!(!tensors.contains(&"output.weight")));
    match m.string("rope.scaling.type")?.as_deref() {
        None | Some("none") => {}
        Some("yarn") => {
            let mscale = m.float("rope.scaling.yarn_log_multiplier")?.unwrap_or(0.0) / 0.1;
            c.insert(
                "rope_scaling".into(),
                json!({
                    "type": "yarn",
                    "factor": m.required_float("rope.scaling.factor")?,
                    "original_max_position_embeddings": m.required("rope.scaling.original_context_length")?,
                    "beta_fast": m.float("rope.scaling.yarn_beta_fast")?.unwrap_or(32.0),
                    "beta_slow": m.float("rope.scaling.yarn_beta_slow")?.unwrap_or(1.0),
                    "mscale": mscale,
                    "mscale_all_dim": mscale,
                }),
            );
        }
        Some(other) => return Err(Error::Invalid(format!("`{arch}.rope.scaling.type` is `{other}`: DeepSeek models use none or yarn"))),
    }
    for (key, name) in [("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")] {
        if let Some(id) = Meta::uint_of(g, name)? {
            c.insert(key.into(), json!(id));
        }
    }
    Ok(Json::Object(c))
}

/// Typed reads of `{arch}.{key}`, each error naming the key.
struct Meta<'a> {
    g: &'a Gguf,
    arch: &'a str,
}

impl Meta<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    /// `key`'s value as `read` takes it (None: absent); a value `read` refuses is an error
    /// saying it is not `what`.
    fn typed_of<T>(g: &Gguf, key: &str, what: &str, read: impl Fn(&Value) -> Option<T>) -> Result<Option<T>> {
        match g.get(key) {
            None => Ok(None),
            Some(v) => read(v).map(Some).ok_or_else(|| Error::Invalid(format!("metadata `{key}` is {}, not {what}", v.summary()))),
        }
    }

    fn uint_of(g: &Gguf, key: &str) -> Result<Option<u64>> {
        Self::typed_of(g, key, "a non-negative integer", Value::as_u64)
    }

    fn uint(&self, k: &str) -> Result<Option<u64>> {
        Self::uint_of(self.g, &self.key(k))
    }

    fn required(&self, k: &str) -> Result<u64> {
        self.uint(k)?.ok_or_else(|| self.missing(k))
    }

    fn float(&self, k: &str) -> Result<Option<f64>> {
        Self::typed_of(self.g, &self.key(k), "a number", |v| match v {
            // An f32 stands for the decimal the converter was given (`1e-6`, not 9.99999997e-7):
            // its shortest round-trip form, as config.json would have it.
            Value::F32(f) => format!("{f}").parse::<f64>().ok(),
            v => v.as_f64().or_else(|| v.as_u64().map(|u| u as f64)),
        })
    }

    fn required_float(&self, k: &str) -> Result<f64> {
        self.float(k)?.ok_or_else(|| self.missing(k))
    }

    fn bool(&self, k: &str) -> Result<Option<bool>> {
        Self::typed_of(self.g, &self.key(k), "a boolean", |v| match v {
            Value::Bool(b) => Some(*b),
            _ => None,
        })
    }

    fn string(&self, k: &str) -> Result<Option<String>> {
        Self::typed_of(self.g, &self.key(k), "a string", |v| v.as_str().map(str::to_string))
    }

    fn missing(&self, k: &str) -> Error {
        Error::Invalid(format!("metadata `{}` is missing: not a file llama.cpp's DeepSeek converter wrote, or a damaged one", self.key(k)))
    }
}

/// The dtype dsrun reads a ggml type as, where it runs it.
fn dtype(t: &GgufTensor) -> Option<DType> {
    DType::from_ggml(t.ty.name)
}

/// What a GGUF tensor becomes among dsrun's.
enum Mapped {
    /// One tensor of that name (an unknown one keeps its GGUF name: unused, and listed so).
    One(String),
    /// Stacked experts, each a slice: `model.layers.{layer}.mlp.experts.{e}.{projection}`.
    Experts { layer: String, projection: &'static str },
    /// Half (0: `attn_k_b`, 1: `attn_v_b`) of the layer's `kv_b_proj`.
    KvHalf { layer: String, half: usize },
}

fn mapped(name: &str) -> Mapped {
    match name {
        "token_embd.weight" => return Mapped::One("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Mapped::One("model.norm.weight".into()),
        "output.weight" => return Mapped::One("lm_head.weight".into()),
        _ => {}
    }
    let Some((layer, rest)) = name.strip_prefix("blk.").and_then(|r| r.split_once('.')) else { return Mapped::One(name.into()) };
    if let Some(projection) = expert_projection(rest) {
        return Mapped::Experts { layer: layer.into(), projection };
    }
    if let Some(half) = ["attn_k_b.weight", "attn_v_b.weight"].iter().position(|h| *h == rest) {
        return Mapped::KvHalf { layer: layer.into(), half };
    }
    Mapped::One(layer_name(layer, rest).unwrap_or_else(|| name.into()))
}

/// Each tensor of `g` with its format, dimensions (ggml order) and what dsrun maps it to, a
/// line each (`dsrun inspect`).
pub fn describe_mapping(g: &Gguf) -> String {
    let mut out = String::from("tensors    (GGUF name, format, dimensions -> dsrun's name)\n");
    for t in &g.tensors {
        let to = match mapped(&t.name) {
            Mapped::One(name) if name == t.name => "(not used by the forward pass)".to_string(),
            Mapped::One(name) => name,
            Mapped::Experts { layer, projection } => format!("model.layers.{layer}.mlp.experts.{{0..{}}}.{projection}.weight", t.dims.last().copied().unwrap_or(1).saturating_sub(1)),
            Mapped::KvHalf { layer, half } => format!("model.layers.{layer}.self_attn.kv_b_proj.weight ({} half, joined)", ["W_UK", "W_UV"][half]),
        };
        out += &format!("  {:<36} {:<6} {:<20} -> {to}\n", t.name, t.ty.name, format!("{:?}", t.dims));
    }
    out
}

/// The Hugging Face name of a non-expert tensor of block `layer` (`blk.{layer}.{rest}`).
fn layer_name(layer: &str, rest: &str) -> Option<String> {
    let hf = match rest {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_q_a.weight" => "self_attn.q_a_proj.weight",
        "attn_q_a_norm.weight" => "self_attn.q_a_layernorm.weight",
        "attn_q_b.weight" => "self_attn.q_b_proj.weight",
        "attn_kv_a_mqa.weight" => "self_attn.kv_a_proj_with_mqa.weight",
        "attn_kv_a_norm.weight" => "self_attn.kv_a_layernorm.weight",
        "attn_kv_b.weight" => "self_attn.kv_b_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "ffn_gate_inp.weight" => "mlp.gate.weight",
        "exp_probs_b.bias" => "mlp.gate.e_score_correction_bias",
        "ffn_gate_shexp.weight" => "mlp.shared_experts.gate_proj.weight",
        "ffn_up_shexp.weight" => "mlp.shared_experts.up_proj.weight",
        "ffn_down_shexp.weight" => "mlp.shared_experts.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// The stacked experts' projection (`ffn_gate_exps` -> `gate_proj`).
fn expert_projection(rest: &str) -> Option<&'static str> {
    match rest {
        "ffn_gate_exps.weight" => Some("gate_proj"),
        "ffn_up_exps.weight" => Some("up_proj"),
        "ffn_down_exps.weight" => Some("down_proj"),
        _ => None,
    }
}

/// The files' tensors under dsrun's names (each with its whole file's bytes).
fn checkpoint(files: &[(PathBuf, Gguf, ShardBytes)]) -> Result<Checkpoint> {
    let path = &files[0].0;
    let mut unsupported: Vec<String> = files.iter().flat_map(|(_, g, _)| g.bytes_by_type()).filter(|(name, _)| DType::from_ggml(name).is_none()).map(|(name, _)| name.to_string()).collect();
    unsupported.dedup();
    if !unsupported.is_empty() {
        let known: Vec<&str> = crate::format::FORMATS.iter().map(|f| f.dtype).filter(|d| DType::from_ggml(d.name()).is_some()).map(DType::name).collect();
        return Err(Error::Invalid(format!(
            "holds {} tensors: not supported yet (dsrun runs GGUF weights in {}; `dsrun inspect --model FILE` lists what the file holds)",
            unsupported.join(", "),
            known.join(", ")
        )));
    }
    let mut shards: Vec<(PathBuf, ShardBytes)> = files.iter().map(|(p, _, bytes)| (p.clone(), bytes.clone())).collect();
    let mut tensors = BTreeMap::new();
    let mut split_kv_b: BTreeMap<String, [Option<(&GgufTensor, &[u8])>; 2]> = BTreeMap::new();
    let all = files.iter().enumerate().flat_map(|(shard, (_, g, bytes))| g.tensors.iter().map(move |t| (shard, t, (**bytes).as_ref())));
    let mut seen = std::collections::BTreeSet::new();
    for (shard, t, file) in all {
        if !seen.insert(t.name.as_str()) {
            return Err(Error::Invalid(format!("tensor `{}` appears twice", t.name)));
        }
        let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        let range = t.start as usize..(t.start + t.bytes) as usize;
        let info = |shape: Vec<usize>, range| TensorInfo::new(t.ty.name.to_string(), dtype(t), shape, shard, range);
        match mapped(&t.name) {
            Mapped::One(name) => {
                tensors.insert(name, info(shape, range));
            }
            Mapped::Experts { layer, projection } => {
                // [experts, rows, cols]: expert e is the e-th of equal slices.
                let [experts, rows, cols] = shape[..] else {
                    return Err(Error::Invalid(format!("tensor `{}` has {} dimensions, not the 3 of stacked experts", t.name, shape.len())));
                };
                let each = t.bytes as usize / experts.max(1);
                for e in 0..experts {
                    let start = range.start + e * each;
                    tensors.insert(format!("model.layers.{layer}.mlp.experts.{e}.{projection}.weight"), info(vec![rows, cols], start..start + each));
                }
            }
            // The split up-projection: joined below into `kv_b_proj`.
            Mapped::KvHalf { layer, half } => split_kv_b.entry(layer).or_default()[half] = Some((t, file)),
        }
    }
    for (layer, halves) in split_kv_b {
        let [Some(k_b), Some(v_b)] = halves else {
            return Err(Error::Invalid(format!("block {layer} has one of `attn_k_b` and `attn_v_b` without the other")));
        };
        let (joined, joined_type, shape) = join_kv_b(k_b, v_b)?;
        let len = joined.len();
        shards.push((path.to_path_buf(), Arc::new(joined) as ShardBytes));
        tensors.insert(format!("model.layers.{layer}.self_attn.kv_b_proj.weight"), TensorInfo::new(joined_type.name().to_string(), Some(joined_type), shape, shards.len() - 1, 0..len));
    }
    Checkpoint::from_parts(path.clone(), shards, tensors)
}

/// `attn_k_b` (`[heads, kv_lora, nope]`) and `attn_v_b` (`[heads, v, kv_lora]`) as one
/// `kv_b_proj` (`[heads * (nope + v), kv_lora]`: per head, W_UK's `nope` rows then W_UV's `v`),
/// value for value: in their own format where both share a float one, else decoded exactly to
/// f32 (a quantised row of `attn_k_b` runs along W_UK's columns: it cannot be moved whole).
/// Returns the bytes, their dtype and shape.
fn join_kv_b((k_b, k_file): (&GgufTensor, &[u8]), (v_b, v_file): (&GgufTensor, &[u8])) -> Result<(Vec<u8>, DType, Vec<usize>)> {
    let (Some(k_type), Some(v_type)) = (dtype(k_b), dtype(v_b)) else {
        return Err(Error::Invalid(format!("`{}` is {} and `{}` {}: not formats dsrun reads", k_b.name, k_b.ty.name, v_b.name, v_b.ty.name)));
    };
    let (&[nope, rank, heads], &[rank_v, v, heads_v]) = (&k_b.dims[..], &v_b.dims[..]) else {
        return Err(Error::Invalid(format!("`{}` and `{}` are not three-dimensional", k_b.name, v_b.name)));
    };
    if rank != rank_v || heads != heads_v {
        return Err(Error::Invalid(format!("`{}` ({:?}) and `{}` ({:?}) disagree on the heads or the latent rank", k_b.name, k_b.dims, v_b.name, v_b.dims)));
    }
    let (nope, rank, heads, v) = (nope as usize, rank as usize, heads as usize, v as usize);
    let k = &k_file[k_b.start as usize..(k_b.start + k_b.bytes) as usize];
    let vb = &v_file[v_b.start as usize..(v_b.start + v_b.bytes) as usize];
    let plain = |d: DType| !d.format().is_block();
    let (k, vb, joined) = if k_type == v_type && plain(k_type) {
        (std::borrow::Cow::Borrowed(k), std::borrow::Cow::Borrowed(vb), k_type)
    } else {
        let f32s = |d: DType, bytes: &[u8]| -> Vec<u8> { crate::quant::decode_vec(d, bytes).iter().flat_map(|v| v.to_le_bytes()).collect() };
        (std::borrow::Cow::Owned(f32s(k_type, k)), std::borrow::Cow::Owned(f32s(v_type, vb)), DType::F32)
    };
    let size = joined.size_bytes();
    let mut out = Vec::with_capacity(heads * (nope + v) * rank * size);
    for h in 0..heads {
        // W_UK row i, column c is k_b[h][c][i].
        for i in 0..nope {
            for c in 0..rank {
                let at = ((h * rank + c) * nope + i) * size;
                out.extend_from_slice(&k[at..at + size]);
            }
        }
        let at = h * v * rank * size;
        out.extend_from_slice(&vb[at..at + v * rank * size]);
    }
    Ok((out, joined, vec![heads * (nope + v), rank]))
}
