//! `dsrun synth`: random-weight checkpoints in the published layout (config.json, sharded
//! safetensors with an index, a tokenizer) for any DeepSeek shape, for benchmarks.
//!
//! Tensors are generated and written a block of rows at a time, so no more than one block is
//! ever in memory whatever the model's size. Matrices are uniform with standard deviation
//! 1/sqrt(fan_in) (so each projection keeps activations at unit scale through every layer),
//! norms near 1, the embedding at unit scale; FP8 matrices are e4m3 with 128x128 block scales
//! (`weight_scale_inv`), as DeepSeek publishes them. Values depend only on the seed.

use crate::error::{Error, Result};
use crate::quant;
use crate::util::Progress;
use rayon::prelude::*;
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;

/// Published shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// DeepSeek-V3 / R1 (671B total, 37B active).
    DeepseekV3,
    /// DeepSeek-V2-Lite (16B, softmax router, no q LoRA).
    DeepseekV2Lite,
    /// Moonlight-16B-A3B (V3 architecture at V2-Lite's size).
    Moonlight,
    /// DeepSeek-V2 / V2.5 (236B, 21B active: softmax router, group-limited greedy top-6 of 160).
    DeepseekV2,
    /// Kimi-K2 (1.04T, 32B active: V3's architecture with 384 experts, 64 heads, one group).
    KimiK2,
    /// DeepSeek-V3.2 (V3's shape with DeepSeek Sparse Attention: a lightning indexer of 64
    /// heads x 128 choosing 2048 positions per query; runs on the CPU reference so far).
    DeepseekV32,
    /// ~0.58B parameters in V3 proportions: 8 layers, 64 experts (6 per token), MLA with q LoRA.
    Small,
}

crate::util::choices!(Preset {
    DeepseekV3 => "deepseek-v3": "DeepSeek-V3 / R1 (671B total, 37B active)",
    DeepseekV2Lite => "deepseek-v2-lite": "DeepSeek-V2-Lite (16B, softmax router, no q LoRA)",
    Moonlight => "moonlight": "Moonlight-16B-A3B (V3 architecture at V2-Lite's size)",
    DeepseekV2 => "deepseek-v2": "DeepSeek-V2 / V2.5 (236B, 21B active)",
    KimiK2 => "kimi-k2": "Kimi-K2 (1.04T, 32B active: 384 experts, 64 heads, one group)",
    DeepseekV32 => "deepseek-v32": "DeepSeek-V3.2 (V3's shape with DeepSeek Sparse Attention)",
    Small => "small": "~0.58B parameters in V3 proportions",
});

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthDtype {
    Bf16,
    /// e4m3 with 128x128 block scales for every linear layer but the embedding, lm_head and router.
    Fp8,
}

crate::util::choices!(SynthDtype {
    Bf16 => "bf16": "bfloat16",
    Fp8 => "fp8": "e4m3 with 128x128 block scales, as DeepSeek publishes",
});

#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub preset: Preset,
    pub layers: Option<usize>,
    pub experts: Option<usize>,
    pub hidden: Option<usize>,
    pub dtype: SynthDtype,
    pub seed: u64,
    /// Start a new shard file once one holds this many bytes.
    pub shard_bytes: u64,
    /// Also write a multi-token-prediction layer (DeepSeek-V3's layer 61: enorm, hnorm,
    /// eh_proj, a decoder layer, shared_head), with random weights like the rest.
    pub mtp: bool,
    /// The V3.2 preset's `index_topk` (positions each query attends to), when not 2048.
    pub index_topk: Option<usize>,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions { preset: Preset::Small, layers: None, experts: None, hidden: None, dtype: SynthDtype::Bf16, seed: 0, shard_bytes: 4 << 30, mtp: false, index_topk: None }
    }
}

/// The config.json for a preset with the overrides applied (validated: the overrides must still
/// describe a model dsrun and transformers can run).
pub fn config(o: &SynthOptions) -> Result<Value> {
    let mut c = match o.preset {
        Preset::DeepseekV3 => json!({
            "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 129280,
            "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
            "first_k_dense_replace": 3, "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
            "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
            "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
            "norm_topk_prob": true, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
            "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 163840,
            "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
            "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": false
        }),
        Preset::DeepseekV2Lite => json!({
            "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "vocab_size": 102400,
            "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
            "first_k_dense_replace": 1, "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": null,
            "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
            "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "n_group": 1, "topk_group": 1,
            "norm_topk_prob": false, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "topk_method": "greedy",
            "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 163840,
            "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
            "bos_token_id": 100000, "eos_token_id": 100001, "tie_word_embeddings": false
        }),
        Preset::DeepseekV2 => json!({
            "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "vocab_size": 102400,
            "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_hidden_layers": 60,
            "first_k_dense_replace": 1, "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
            "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
            "n_routed_experts": 160, "n_shared_experts": 2, "num_experts_per_tok": 6, "n_group": 8, "topk_group": 3,
            "norm_topk_prob": false, "routed_scaling_factor": 16.0, "scoring_func": "softmax", "topk_method": "group_limited_greedy",
            "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 163840,
            "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
            "bos_token_id": 100000, "eos_token_id": 100001, "tie_word_embeddings": false
        }),
        Preset::KimiK2 => json!({
            "model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 163840,
            "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
            "first_k_dense_replace": 1, "num_attention_heads": 64, "num_key_value_heads": 64, "q_lora_rank": 1536,
            "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
            "n_routed_experts": 384, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1,
            "norm_topk_prob": true, "routed_scaling_factor": 2.827, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
            "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 50000.0, "max_position_embeddings": 131072,
            "rope_scaling": {"type": "yarn", "factor": 32, "original_max_position_embeddings": 4096, "beta_fast": 1,
                             "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
            "bos_token_id": 163584, "eos_token_id": 163585, "tie_word_embeddings": false
        }),
        Preset::DeepseekV32 => {
            let mut c = config(&SynthOptions { preset: Preset::DeepseekV3, layers: None, experts: None, hidden: None, mtp: false, index_topk: None, ..o.clone() })?;
            c["model_type"] = json!("deepseek_v32");
            c["architectures"] = json!(["DeepseekV32ForCausalLM"]);
            c["index_n_heads"] = json!(64);
            c["index_head_dim"] = json!(128);
            c["index_topk"] = json!(o.index_topk.unwrap_or(2048));
            c
        }
        Preset::Moonlight => json!({
            "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 163840,
            "hidden_size": 2048, "intermediate_size": 11264, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
            "first_k_dense_replace": 1, "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": null,
            "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
            "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "n_group": 1, "topk_group": 1,
            "norm_topk_prob": true, "routed_scaling_factor": 2.446, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
            "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 50000.0, "max_position_embeddings": 8192,
            "bos_token_id": 163584, "eos_token_id": 163585, "tie_word_embeddings": false
        }),
        Preset::Small => json!({
            "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 32000,
            "hidden_size": 1024, "intermediate_size": 2816, "moe_intermediate_size": 352, "num_hidden_layers": 8,
            "first_k_dense_replace": 1, "num_attention_heads": 8, "num_key_value_heads": 8, "q_lora_rank": 384,
            "kv_lora_rank": 128, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64,
            "n_routed_experts": 64, "n_shared_experts": 1, "num_experts_per_tok": 6, "n_group": 8, "topk_group": 4,
            "norm_topk_prob": true, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
            "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096,
            "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": false
        }),
    };
    if let Some(layers) = o.layers {
        if layers == 0 {
            return Err(Error::Invalid("--layers must be at least 1".into()));
        }
        c["num_hidden_layers"] = json!(layers);
        let dense = c["first_k_dense_replace"].as_u64().unwrap_or(0) as usize;
        // Keep at least one MoE layer when there is room for one.
        c["first_k_dense_replace"] = json!(dense.min(layers.saturating_sub(1)));
    }
    if let Some(hidden) = o.hidden {
        if hidden == 0 || hidden % 2 != 0 {
            return Err(Error::Invalid(format!("--hidden {hidden}: must be a positive even number")));
        }
        c["hidden_size"] = json!(hidden);
    }
    if let Some(experts) = o.experts {
        let (groups, top_k) = (c["n_group"].as_u64().unwrap_or(1) as usize, c["num_experts_per_tok"].as_u64().unwrap_or(1) as usize);
        if experts < top_k {
            return Err(Error::Invalid(format!("--experts {experts}: fewer than the {top_k} experts each token uses")));
        }
        if experts % groups != 0 {
            return Err(Error::Invalid(format!("--experts {experts}: must divide into the preset's {groups} expert groups")));
        }
        let per_group = experts / groups;
        let kept_groups = c["topk_group"].as_u64().unwrap_or(1) as usize;
        if per_group * kept_groups < top_k {
            return Err(Error::Invalid(format!("--experts {experts}: {kept_groups} of {groups} groups of {per_group} cannot supply {top_k} experts per token")));
        }
        c["n_routed_experts"] = json!(experts);
    }
    c["num_nextn_predict_layers"] = json!(o.mtp as u32);
    if o.dtype == SynthDtype::Fp8 {
        c["quantization_config"] = json!({"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]});
    }
    Ok(c)
}

/// How one tensor's values are drawn.
#[derive(Debug, Clone, Copy)]
enum Fill {
    /// Uniform with standard deviation `std`.
    Uniform { std: f32 },
    /// 1 + uniform noise of standard deviation 0.1 (norm weights).
    NearOne,
}

#[derive(Debug, Clone)]
struct TensorPlan {
    name: String,
    rows: usize,
    cols: usize,
    dtype: &'static str,
    fill: Fill,
}

impl TensorPlan {
    fn bytes(&self) -> u64 {
        let per = match self.dtype {
            "F8_E4M3" => 1,
            "F32" => 4,
            _ => 2,
        };
        (self.rows * self.cols * per) as u64
    }
}

/// Every tensor of the checkpoint in file order (FP8 weights followed by their scales).
fn tensor_plan(c: &Value, dtype: SynthDtype) -> Vec<TensorPlan> {
    let u = |k: &str| c[k].as_u64().unwrap_or(0) as usize;
    let (d, vocab, heads) = (u("hidden_size"), u("vocab_size"), u("num_attention_heads"));
    let (nope, rope, v, lora) = (u("qk_nope_head_dim"), u("qk_rope_head_dim"), u("v_head_dim"), u("kv_lora_rank"));
    let q_lora = c["q_lora_rank"].as_u64().map(|x| x as usize);
    let mut out = Vec::new();
    let vector = |out: &mut Vec<TensorPlan>, name: String, n: usize| {
        out.push(TensorPlan { name, rows: 1, cols: n, dtype: "BF16", fill: Fill::NearOne });
    };
    let linear = |out: &mut Vec<TensorPlan>, name: String, rows: usize, cols: usize| {
        let std = 1.0 / (cols as f32).sqrt();
        if dtype == SynthDtype::Fp8 {
            out.push(TensorPlan { name: name.clone(), rows, cols, dtype: "F8_E4M3", fill: Fill::Uniform { std } });
            let scales = name.replace(".weight", ".weight_scale_inv");
            out.push(TensorPlan { name: scales, rows: rows.div_ceil(128), cols: cols.div_ceil(128), dtype: "F32", fill: Fill::NearOne });
        } else {
            out.push(TensorPlan { name, rows, cols, dtype: "BF16", fill: Fill::Uniform { std } });
        }
    };
    out.push(TensorPlan { name: "model.embed_tokens.weight".into(), rows: vocab, cols: d, dtype: "BF16", fill: Fill::Uniform { std: 1.0 } });
    let layers = u("num_hidden_layers");
    for i in 0..layers + u("num_nextn_predict_layers").min(1) {
        let p = format!("model.layers.{i}");
        vector(&mut out, format!("{p}.input_layernorm.weight"), d);
        let a = format!("{p}.self_attn");
        match q_lora {
            Some(r) => {
                linear(&mut out, format!("{a}.q_a_proj.weight"), r, d);
                vector(&mut out, format!("{a}.q_a_layernorm.weight"), r);
                linear(&mut out, format!("{a}.q_b_proj.weight"), heads * (nope + rope), r);
            }
            None => linear(&mut out, format!("{a}.q_proj.weight"), heads * (nope + rope), d),
        }
        linear(&mut out, format!("{a}.kv_a_proj_with_mqa.weight"), lora + rope, d);
        vector(&mut out, format!("{a}.kv_a_layernorm.weight"), lora);
        linear(&mut out, format!("{a}.kv_b_proj.weight"), heads * (nope + v), lora);
        linear(&mut out, format!("{a}.o_proj.weight"), d, heads * v);
        if c["model_type"] == "deepseek_v32" {
            let (ih, idim) = (u("index_n_heads"), u("index_head_dim"));
            let ix = format!("{a}.indexer");
            linear(&mut out, format!("{ix}.wq_b.weight"), ih * idim, q_lora.unwrap_or(d));
            linear(&mut out, format!("{ix}.wk.weight"), idim, d);
            vector(&mut out, format!("{ix}.k_norm.weight"), idim);
            out.push(TensorPlan { name: format!("{ix}.k_norm.bias"), rows: 1, cols: idim, dtype: "BF16", fill: Fill::Uniform { std: 0.01 } });
            linear(&mut out, format!("{ix}.weights_proj.weight"), ih, d);
        }
        vector(&mut out, format!("{p}.post_attention_layernorm.weight"), d);
        let mlp = |out: &mut Vec<TensorPlan>, prefix: String, inter: usize| {
            linear(out, format!("{prefix}.gate_proj.weight"), inter, d);
            linear(out, format!("{prefix}.up_proj.weight"), inter, d);
            linear(out, format!("{prefix}.down_proj.weight"), d, inter);
        };
        if i < u("first_k_dense_replace") {
            mlp(&mut out, format!("{p}.mlp"), u("intermediate_size"));
        } else {
            let experts = u("n_routed_experts");
            let std = 1.0 / (d as f32).sqrt();
            out.push(TensorPlan { name: format!("{p}.mlp.gate.weight"), rows: experts, cols: d, dtype: "BF16", fill: Fill::Uniform { std } });
            if c["topk_method"] == "noaux_tc" {
                out.push(TensorPlan { name: format!("{p}.mlp.gate.e_score_correction_bias"), rows: 1, cols: experts, dtype: "F32", fill: Fill::Uniform { std: 0.01 } });
            }
            for e in 0..experts {
                mlp(&mut out, format!("{p}.mlp.experts.{e}"), u("moe_intermediate_size"));
            }
            if u("n_shared_experts") > 0 {
                mlp(&mut out, format!("{p}.mlp.shared_experts"), u("moe_intermediate_size") * u("n_shared_experts"));
            }
        }
    }
    if u("num_nextn_predict_layers") > 0 {
        // The MTP layer's own tensors (its embedding is the main model's: not written).
        let p = format!("model.layers.{layers}");
        vector(&mut out, format!("{p}.enorm.weight"), d);
        vector(&mut out, format!("{p}.hnorm.weight"), d);
        linear(&mut out, format!("{p}.eh_proj.weight"), d, 2 * d);
        vector(&mut out, format!("{p}.shared_head.norm.weight"), d);
        out.push(TensorPlan { name: format!("{p}.shared_head.head.weight"), rows: vocab, cols: d, dtype: "BF16", fill: Fill::Uniform { std: 1.0 / (d as f32).sqrt() } });
    }
    vector(&mut out, "model.norm.weight".into(), d);
    out.push(TensorPlan { name: "lm_head.weight".into(), rows: vocab, cols: d, dtype: "BF16", fill: Fill::Uniform { std: 1.0 / (d as f32).sqrt() } });
    out
}

/// Parameters and bytes the checkpoint will have (scales counted in bytes, not parameters).
pub fn size(o: &SynthOptions) -> Result<(u64, u64)> {
    let c = config(o)?;
    let plan = tensor_plan(&c, o.dtype);
    let params = plan.iter().filter(|t| !t.name.ends_with("_scale_inv")).map(|t| (t.rows * t.cols) as u64).sum();
    Ok((params, plan.iter().map(TensorPlan::bytes).sum()))
}

/// The deterministic generator of one row of one tensor.
struct Rng(crate::sample::SplitMix64);

impl Rng {
    fn new(seed: u64, tensor: usize, row: usize) -> Rng {
        let state = seed ^ (tensor as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (row as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
        Rng(crate::sample::SplitMix64(state))
    }

    /// Uniform in [-sqrt(3), sqrt(3)): unit variance.
    fn unit(&mut self) -> f32 {
        (self.0.next_f32() * 2.0 - 1.0) * 1.732_050_8
    }
}

fn fill_row(fill: Fill, rng: &mut Rng, out: &mut [f32]) {
    for x in out {
        *x = match fill {
            Fill::Uniform { std } => rng.unit() * std,
            Fill::NearOne => 1.0 + 0.1 * rng.unit(),
        };
    }
}

/// Rows generated and written at once (a multiple of the FP8 block height).
const BLOCK_ROWS: usize = 128;

/// Writes one tensor's bytes (and, for FP8, returns its block scales to write next).
fn write_tensor(w: &mut impl Write, t: &TensorPlan, id: usize, seed: u64) -> std::io::Result<Option<Vec<f32>>> {
    let grid_cols = t.cols.div_ceil(128);
    let mut scales = Vec::new();
    for row0 in (0..t.rows).step_by(BLOCK_ROWS) {
        let rows = BLOCK_ROWS.min(t.rows - row0);
        let mut values = vec![0f32; rows * t.cols];
        values.par_chunks_mut(t.cols).enumerate().for_each(|(r, row)| fill_row(t.fill, &mut Rng::new(seed, id, row0 + r), row));
        let bytes = match t.dtype {
            "F8_E4M3" => {
                let (codes, block_scales) = quant::quantize_fp8_blocks(&values, rows, t.cols, (128, 128));
                debug_assert_eq!(block_scales.len(), rows.div_ceil(128) * grid_cols);
                scales.extend(block_scales);
                codes
            }
            "F32" => bytemuck::cast_slice(&values).to_vec(),
            _ => quant::encode(quant::DType::BF16, &values),
        };
        w.write_all(&bytes)?;
    }
    Ok((t.dtype == "F8_E4M3").then_some(scales))
}

/// What `synth` wrote.
pub struct SynthReport {
    pub params: u64,
    pub bytes: u64,
    pub shards: usize,
}

/// Writes the checkpoint into `out` (created if missing). `progress` is advanced by bytes.
pub fn synth(out: &Path, o: &SynthOptions, progress: &dyn Progress) -> Result<SynthReport> {
    let c = config(o)?;
    let plan = tensor_plan(&c, o.dtype);
    std::fs::create_dir_all(out).map_err(|e| Error::io(out.display().to_string(), e))?;
    let total: u64 = plan.iter().map(TensorPlan::bytes).sum();
    progress.start("writing", total, true);

    // Shards of whole tensors (an FP8 weight and its scales stay together).
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut in_shard = 0u64;
    for (i, t) in plan.iter().enumerate() {
        let is_scale = t.name.ends_with("_scale_inv");
        if !is_scale && in_shard > 0 && in_shard + t.bytes() > o.shard_bytes {
            shards.push(Vec::new());
            in_shard = 0;
        }
        shards.last_mut().unwrap().push(i);
        in_shard += t.bytes();
    }

    let mut weight_map = serde_json::Map::new();
    let count = shards.len();
    for (s, members) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", s + 1, count);
        let path = out.join(&file);
        let io = |e| Error::io(path.display().to_string(), e);
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut offset = 0u64;
        for &i in members {
            let t = &plan[i];
            // Norms and biases are 1-D; every weight and scale grid 2-D, even with one row.
            let is_vector = t.rows == 1 && (t.name.ends_with("norm.weight") || t.name.ends_with("_bias") || t.name.ends_with("norm.bias"));
            let shape = if is_vector { json!([t.cols]) } else { json!([t.rows, t.cols]) };
            header.insert(t.name.clone(), json!({"dtype": t.dtype, "shape": shape, "data_offsets": [offset, offset + t.bytes()]}));
            offset += t.bytes();
            weight_map.insert(t.name.clone(), json!(file));
        }
        let mut text = serde_json::to_string(&header).expect("JSON of strings and numbers");
        while !text.len().is_multiple_of(8) {
            text.push(' ');
        }
        let mut w = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(&path).map_err(io)?);
        w.write_all(&(text.len() as u64).to_le_bytes()).map_err(io)?;
        w.write_all(text.as_bytes()).map_err(io)?;
        let mut pending_scales: Option<Vec<f32>> = None;
        for &i in members {
            let t = &plan[i];
            if t.name.ends_with("_scale_inv") {
                let scales = pending_scales.take().expect("FP8 scales follow their weight");
                w.write_all(bytemuck::cast_slice(&scales)).map_err(io)?;
            } else {
                pending_scales = write_tensor(&mut w, t, i, o.seed).map_err(io)?;
            }
            progress.advance(t.bytes());
        }
        w.flush().map_err(io)?;
    }

    progress.finish();
    let write_json = |name: &str, value: &Value| -> Result<()> {
        let path = out.join(name);
        let text = serde_json::to_string_pretty(value).expect("JSON");
        std::fs::write(&path, text).map_err(|e| Error::io(path.display().to_string(), e))
    };
    write_json("config.json", &c)?;
    write_json("model.safetensors.index.json", &json!({"metadata": {"total_size": total}, "weight_map": weight_map}))?;
    let (vocab, bos, eos) = (c["vocab_size"].as_u64().unwrap_or(0) as u32, c["bos_token_id"].as_u64(), c["eos_token_id"].as_u64());
    write_json("tokenizer.json", &tokenizer_json(vocab, bos.map(|b| b as u32), eos.map(|e| e as u32)))?;
    let settings = json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": bos.is_some(), "chat_template": DEEPSEEK_V3_CHAT_TEMPLATE});
    write_json("tokenizer_config.json", &settings)?;
    let params = plan.iter().filter(|t| !t.name.ends_with("_scale_inv")).map(|t| (t.rows * t.cols) as u64).sum();
    Ok(SynthReport { params, bytes: total, shards: count })
}

/// DeepSeek-V3's published chat template (vendored as test data), so `chat` and `serve` run on
/// synthetic checkpoints.
const DEEPSEEK_V3_CHAT_TEMPLATE: &str = include_str!("../templates/deepseek-v3.jinja");

/// A word-level tokenizer over the whole vocabulary: `<s>`/`</s>` at the config's ids, the
/// printable ASCII characters, then `t<id>` fillers. Text tokenizes (unknown words to `<unk>`),
/// and every id decodes; the weights are random, so the text is too.
fn tokenizer_json(vocab: u32, bos: Option<u32>, eos: Option<u32>) -> Value {
    let mut names: Vec<String> = (0..vocab).map(|i| format!("t{i}")).collect();
    let mut free = (0..vocab).filter(|i| Some(*i) != bos && Some(*i) != eos);
    let unk = free.next().unwrap_or(0);
    for (id, ch) in free.zip((b'!'..=b'~').map(char::from)) {
        names[id as usize] = ch.to_string();
    }
    names[unk as usize] = "<unk>".into();
    if let Some(b) = bos.filter(|&b| b < vocab) {
        names[b as usize] = "<s>".into();
    }
    if let Some(e) = eos.filter(|&e| e < vocab) {
        names[e as usize] = "</s>".into();
    }
    let map: serde_json::Map<String, Value> = names.into_iter().enumerate().map(|(i, n)| (n, json!(i))).collect();
    let special = |id: Option<u32>, content: &str| id.map(|id| json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
    let added: Vec<Value> = [special(bos, "<s>"), special(eos, "</s>")].into_iter().flatten().collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        // Joins tokens with spaces.
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
        "model": {"type": "WordLevel", "vocab": map, "unk_token": "<unk>"}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_v3_preset_has_v3s_size() {
        let o = SynthOptions { preset: Preset::DeepseekV3, dtype: SynthDtype::Fp8, ..Default::default() };
        let (params, bytes) = size(&o).unwrap();
        // DeepSeek's 671B is the main model; the 14B multi-token-prediction module on top (685B
        // on the Hub) is not written: the runtime ignores it.
        assert!((670e9..672e9).contains(&(params as f64)), "{params}");
        assert!(bytes > 670_000_000_000, "{bytes}");
    }

    #[test]
    fn lite_presets_have_their_published_sizes() {
        for preset in [Preset::DeepseekV2Lite, Preset::Moonlight] {
            let (params, _) = size(&SynthOptions { preset, ..Default::default() }).unwrap();
            assert!((15.5e9..16.5e9).contains(&(params as f64)), "{preset:?}: {params}");
        }
    }

    /// V2 / V2.5 at 236B parameters; Kimi-K2 at 1.04T (32B active).
    #[test]
    fn large_presets_have_their_published_sizes() {
        let (v2, _) = size(&SynthOptions { preset: Preset::DeepseekV2, ..Default::default() }).unwrap();
        assert!((235e9..237e9).contains(&(v2 as f64)), "V2: {v2}");
        let (kimi, _) = size(&SynthOptions { preset: Preset::KimiK2, ..Default::default() }).unwrap();
        assert!((1.02e12..1.05e12).contains(&(kimi as f64)), "Kimi-K2: {kimi}");
        // V3.2: V3 plus each layer's indexer (64 x 128 queries from the 1536 LoRA, a key and
        // head weights from the hidden state): ~0.86B more.
        let (v32, _) = size(&SynthOptions { preset: Preset::DeepseekV32, ..Default::default() }).unwrap();
        assert!((671.5e9..672.5e9).contains(&(v32 as f64)), "V3.2: {v32}");
        for preset in [Preset::DeepseekV2, Preset::KimiK2, Preset::DeepseekV32] {
            let c = config(&SynthOptions { preset, layers: Some(2), experts: Some(32), index_topk: Some(64), ..Default::default() }).unwrap();
            let c = crate::config::ModelConfig::from_json(&c).unwrap_or_else(|e| panic!("{preset:?}: {e}"));
            assert_eq!(c.indexer.map(|ix| ix.topk), (preset == Preset::DeepseekV32).then_some(64));
        }
    }

    #[test]
    fn overrides_are_checked() {
        let o = |experts| SynthOptions { experts: Some(experts), ..Default::default() };
        assert!(config(&o(16)).is_ok());
        assert!(config(&o(4)).is_err(), "fewer than top-k");
        assert!(config(&o(20)).is_err(), "not divisible into 8 groups");
        assert!(config(&SynthOptions { layers: Some(0), ..Default::default() }).is_err());
        let c = config(&SynthOptions { layers: Some(1), ..Default::default() }).unwrap();
        assert_eq!(c["first_k_dense_replace"], 0);
    }

    #[test]
    fn rows_are_reproducible_and_unit_scaled() {
        let mut a = vec![0f32; 4096];
        let mut b = vec![0f32; 4096];
        fill_row(Fill::Uniform { std: 1.0 }, &mut Rng::new(7, 3, 11), &mut a);
        fill_row(Fill::Uniform { std: 1.0 }, &mut Rng::new(7, 3, 11), &mut b);
        assert_eq!(a, b);
        let var = a.iter().map(|x| x * x).sum::<f32>() / a.len() as f32;
        assert!((0.9..1.1).contains(&var), "{var}");
        fill_row(Fill::Uniform { std: 1.0 }, &mut Rng::new(7, 3, 12), &mut b);
        assert_ne!(a, b);
    }
}
