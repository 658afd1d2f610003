//! `dsrun quantize`: a checkpoint dsrun reads (safetensors or GGUF) written as a GGUF of
//! llama.cpp's `deepseek2` layout, in the format mix the user picks, so it is converted once
//! rather than at every load, and llama.cpp loads it too.
//!
//! The layout is what llama.cpp's converter writes today (and `deepseek2.rs` reads): its
//! metadata keys, stacked experts, `attn_k_b` / `attn_v_b` (the current MLA layout); each
//! matrix quantised by ggml's reference quantisers (`quant::ggml_quantize`, byte-equal to
//! llama-quantize's without an importance matrix). Vectors and the router stay F32, as
//! llama-quantize keeps them; a matrix whose rows are not whole blocks of its format falls back
//! to Q8_0, or F16 where they are not whole 32s either (llama-quantize's F16 fallback). The MTP
//! layer is not written (llama.cpp's converter drops it too).

use crate::config::{ModelConfig, ScoringFunc};
use crate::error::{Error, Result};
use crate::gguf::writer::{self, Planned};
use crate::gguf::{GgmlType, Value};
use crate::model::weights::{FeedForward, Matrix, Mlp, QueryProjection};
use crate::model::Model;
use crate::quant::DType;
use crate::util::Progress;
use std::path::Path;

/// The format mix of the file (llama.cpp's `general.file_type` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)] // llama.cpp's names
pub enum FileType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q6_K,
    Q4_K_M,
}

crate::util::choices!(FileType {
    Q8_0 => "Q8_0": "int8 blocks of 32 with an f16 scale (8.5 bits a weight)",
    Q6_K => "Q6_K": "6-bit K-quant blocks of 256 (6.6 bits a weight)",
    Q4_K_M => "Q4_K_M": "Q4_K (4.5 bits a weight), Q6_K for the output and some layers' down projections, as llama.cpp's Q4_K_M",
    F16 => "F16": "half precision",
    BF16 => "BF16": "bfloat16",
    F32 => "F32": "single precision",
});

impl FileType {
    /// llama.cpp's `llama_ftype` value.
    fn code(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Q8_0 => 7,
            FileType::Q4_K_M => 15,
            FileType::Q6_K => 18,
            FileType::BF16 => 32,
        }
    }
}

/// Where a tensor's values come from.
enum Source<'a> {
    Vector(&'a [f32]),
    Matrix(&'a Matrix),
    /// A layer's routed experts, one projection of each, stacked.
    Experts(Vec<&'a Matrix>),
    /// `kv_b_proj`'s W_UK per head, transposed (`attn_k_b`: `[heads, kv_lora, nope]`) or W_UV
    /// (`attn_v_b`: `[heads, v, kv_lora]`).
    KvHalf {
        kv_b: &'a Matrix,
        heads: usize,
        nope: usize,
        v: usize,
        keys: bool,
    },
}

struct Item<'a> {
    name: String,
    /// Row-major shape (the GGUF dims reversed).
    shape: Vec<usize>,
    source: Source<'a>,
    /// The block a layer tensor belongs to.
    layer: Option<usize>,
}

/// What was written.
pub struct Written {
    pub tensors: usize,
    pub bytes: u64,
    /// Bytes by format, largest first.
    pub formats: Vec<(DType, u64)>,
}

/// Writes the model at `source` (a checkpoint directory or a GGUF file) to `out` as `file_type`.
pub fn quantize(source: &Path, out: &Path, file_type: FileType, progress: &dyn Progress) -> Result<Written> {
    let builder = crate::builder::EngineBuilder::open(source)?;
    let model = builder.model()?;
    let c = &model.config;
    refuse_unsupported(c)?;
    let mut metadata = config_metadata(c, source);
    metadata.extend(tokenizer_metadata(source, c)?);
    // Last, where llama-quantize puts them.
    metadata.push(("general.quantization_version".into(), Value::U32(2)));
    metadata.push(("general.file_type".into(), Value::U32(file_type.code())));
    let items = items(&model);
    let layers = c.num_hidden_layers;
    let mut planned = Vec::with_capacity(items.len());
    for item in &items {
        let dtype = target(file_type, item, layers);
        let ty = GgmlType::from_name(dtype.name()).ok_or_else(|| Error::Invalid(format!("{}: no ggml type", dtype.name())))?;
        planned.push(Planned { name: item.name.clone(), dims: item.shape.iter().rev().map(|&d| d as u64).collect(), ty });
    }
    let total: u64 = planned.iter().map(Planned::bytes).sum();
    progress.start(&format!("writing {}", out.display()), total, true);
    let mut formats: Vec<(DType, u64)> = Vec::new();
    let bytes = writer::write(out, &metadata, &planned, |i, sink| {
        let dtype = DType::from_ggml(planned[i].ty.name).expect("planned from a dtype");
        let mut encoded = |values: &[f32]| -> Result<()> {
            let bytes = crate::quant::encode(dtype, values);
            match formats.iter_mut().find(|(d, _)| *d == dtype) {
                Some((_, n)) => *n += bytes.len() as u64,
                None => formats.push((dtype, bytes.len() as u64)),
            }
            progress.advance(bytes.len() as u64);
            sink(&bytes)
        };
        emit(&items[i].source, &mut encoded)
    });
    progress.finish();
    formats.sort_by_key(|f| std::cmp::Reverse(f.1));
    Ok(Written { tensors: planned.len(), bytes: bytes?, formats })
}

/// What llama.cpp's `deepseek2` cannot hold.
fn refuse_unsupported(c: &ModelConfig) -> Result<()> {
    if c.indexer.is_some() {
        return Err(Error::Invalid(
            "DeepSeek-V3.2's sparse attention (its indexer) has no place in llama.cpp's `deepseek2` layout (llama.cpp writes V3.2 as `deepseek32`, which dsrun does not write)".into(),
        ));
    }
    if c.moe_layer_freq != 1 {
        return Err(Error::Invalid(format!("`moe_layer_freq` {}: llama.cpp's `deepseek2` layout has MoE in every layer after the leading dense ones", c.moe_layer_freq)));
    }
    Ok(())
}

/// The `general.*` and `deepseek2.*` keys, as llama.cpp's converter writes them.
fn config_metadata(c: &ModelConfig, source: &Path) -> Vec<(String, Value)> {
    let arch = crate::gguf::deepseek2::ARCHITECTURE;
    let name = source.file_stem().map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    let mut m: Vec<(String, Value)> =
        vec![("general.architecture".into(), Value::String(arch.into())), ("general.type".into(), Value::String("model".into())), ("general.name".into(), Value::String(name))];
    let mut key = |k: &str, v: Value| m.push((format!("{arch}.{k}"), v));
    let u = |v: usize| Value::U32(v as u32);
    key("block_count", u(c.num_hidden_layers));
    key("context_length", u(c.max_position_embeddings));
    key("embedding_length", u(c.hidden_size));
    key("feed_forward_length", u(c.intermediate_size));
    key("attention.head_count", u(c.num_attention_heads));
    // MLA as MQA over the latent: one key/value head of kv_lora (+ rope) values.
    key("attention.head_count_kv", u(1));
    key("rope.freq_base", Value::F32(c.rope_theta as f32));
    key("attention.layer_norm_rms_epsilon", Value::F32(c.rms_norm_eps as f32));
    key("expert_count", u(c.n_routed_experts));
    key("expert_used_count", u(c.num_experts_per_tok));
    key("expert_group_count", u(c.n_group));
    key("expert_group_used_count", u(c.topk_group));
    key("expert_gating_func", Value::U32(if c.scoring_func == ScoringFunc::Sigmoid { 2 } else { 1 }));
    key("attention.key_length", u(c.kv_lora_rank + c.qk_rope_head_dim));
    key("attention.value_length", u(c.kv_lora_rank));
    key("leading_dense_block_count", u(c.first_k_dense_replace));
    key("vocab_size", u(c.vocab_size));
    if let Some(rank) = c.q_lora_rank {
        key("attention.q_lora_rank", u(rank));
    }
    key("attention.kv_lora_rank", u(c.kv_lora_rank));
    key("attention.key_length_mla", u(c.qk_nope_head_dim + c.qk_rope_head_dim));
    key("attention.value_length_mla", u(c.v_head_dim));
    key("expert_feed_forward_length", u(c.moe_intermediate_size));
    key("expert_shared_count", u(c.n_shared_experts));
    key("expert_weights_scale", Value::F32(c.routed_scaling_factor as f32));
    key("expert_weights_norm", Value::Bool(c.norm_topk_prob));
    key("rope.dimension_count", u(c.qk_rope_head_dim));
    if let Some(y) = &c.yarn {
        key("rope.scaling.type", Value::String("yarn".into()));
        key("rope.scaling.factor", Value::F32(y.factor as f32));
        key("rope.scaling.original_context_length", u(y.original_max_position_embeddings));
        key("rope.scaling.yarn_beta_fast", Value::F32(y.beta_fast as f32));
        key("rope.scaling.yarn_beta_slow", Value::F32(y.beta_slow as f32));
        // The converter's rule (deepseek2.rs reads it back as mscale = mscale_all_dim).
        key("rope.scaling.yarn_log_multiplier", Value::F32((0.1 * y.mscale_all_dim) as f32));
    }
    m
}

/// The tokenizer's keys: a GGUF source's as they are; a checkpoint's from its tokenizer.json
/// and tokenizer_config.json as llama.cpp's converter writes them.
fn tokenizer_metadata(source: &Path, c: &ModelConfig) -> Result<Vec<(String, Value)>> {
    if crate::gguf::is_gguf(source) {
        let (g, _) = crate::gguf::deepseek2::open_config(source)?;
        return Ok(g.metadata.into_iter().filter(|(k, _)| k.starts_with("tokenizer.")).collect());
    }
    crate::gguf::tokenizer::from_checkpoint(source, c)
}

/// Every tensor of the file, in llama.cpp's names and order.
fn items(model: &Model) -> Vec<Item<'_>> {
    let (w, c) = (&model.weights, &model.config);
    let mut out = vec![matrix("token_embd.weight", &w.embed, None)];
    for (i, layer) in w.layers.iter().enumerate() {
        let blk = |rest: &str| format!("blk.{i}.{rest}");
        let at = Some(i);
        out.push(vector(blk("attn_norm.weight"), &layer.input_norm, at));
        let a = &layer.attention;
        match &a.q {
            QueryProjection::LowRank { a: qa, norm, b } => {
                out.push(matrix(&blk("attn_q_a.weight"), qa, at));
                out.push(vector(blk("attn_q_a_norm.weight"), norm, at));
                out.push(matrix(&blk("attn_q_b.weight"), b, at));
            }
            QueryProjection::Direct(q) => out.push(matrix(&blk("attn_q.weight"), q, at)),
        }
        out.push(matrix(&blk("attn_kv_a_mqa.weight"), &a.kv_a, at));
        out.push(vector(blk("attn_kv_a_norm.weight"), &a.kv_norm, at));
        let (heads, nope, v, rank) = (c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank);
        out.push(Item { name: blk("attn_k_b.weight"), shape: vec![heads, rank, nope], source: Source::KvHalf { kv_b: &a.kv_b, heads, nope, v, keys: true }, layer: at });
        out.push(Item { name: blk("attn_v_b.weight"), shape: vec![heads, v, rank], source: Source::KvHalf { kv_b: &a.kv_b, heads, nope, v, keys: false }, layer: at });
        out.push(matrix(&blk("attn_output.weight"), &a.o, at));
        out.push(vector(blk("ffn_norm.weight"), &layer.post_attention_norm, at));
        match &layer.ffn {
            FeedForward::Dense(mlp) => out.extend(mlp_items(mlp, &|p| blk(&format!("ffn_{p}.weight")), at)),
            FeedForward::Moe(moe) => {
                out.push(matrix(&blk("ffn_gate_inp.weight"), &moe.router, at));
                if let Some(bias) = &moe.correction_bias {
                    out.push(vector(blk("exp_probs_b.bias"), bias, at));
                }
                for (p, pick) in [("gate", 0), ("up", 1), ("down", 2)] {
                    let stack: Vec<&Matrix> = moe.experts.iter().map(|e| e.matrices()[pick]).collect();
                    let shape = vec![stack.len(), stack[0].rows, stack[0].cols];
                    out.push(Item { name: blk(&format!("ffn_{p}_exps.weight")), shape, source: Source::Experts(stack), layer: at });
                }
                if let Some(shared) = &moe.shared {
                    out.extend(mlp_items(shared, &|p| blk(&format!("ffn_{p}_shexp.weight")), at));
                }
            }
        }
    }
    out.push(vector("output_norm.weight".into(), &w.final_norm, None));
    if !c.tie_word_embeddings {
        out.push(matrix("output.weight", &w.lm_head, None));
    }
    out
}

fn matrix<'a>(name: &str, m: &'a Matrix, layer: Option<usize>) -> Item<'a> {
    Item { name: name.into(), shape: vec![m.rows, m.cols], source: Source::Matrix(m), layer }
}

fn vector(name: String, v: &[f32], layer: Option<usize>) -> Item<'_> {
    Item { name, shape: vec![v.len()], source: Source::Vector(v), layer }
}

fn mlp_items<'a>(mlp: &'a Mlp, name: &dyn Fn(&str) -> String, layer: Option<usize>) -> Vec<Item<'a>> {
    vec![matrix(&name("gate"), &mlp.gate, layer), matrix(&name("up"), &mlp.up, layer), matrix(&name("down"), &mlp.down, layer)]
}

/// The format a tensor is written in.
fn target(file_type: FileType, item: &Item, layers: usize) -> DType {
    let row = *item.shape.last().expect("tensors have a dimension");
    if item.shape.len() == 1 || item.name.ends_with("ffn_gate_inp.weight") {
        return DType::F32;
    }
    let wanted = match file_type {
        FileType::F32 => DType::F32,
        FileType::F16 => DType::F16,
        FileType::BF16 => DType::BF16,
        FileType::Q8_0 => DType::Q8_0,
        FileType::Q6_K => DType::Q6_K,
        FileType::Q4_K_M => {
            let down = item.name.contains(".ffn_down");
            match item.name == "output.weight" || (down && item.layer.is_some_and(|i| more_bits(i, layers))) {
                true => DType::Q6_K,
                false => DType::Q4_K,
            }
        }
    };
    let f = wanted.format();
    if !f.is_block() || row.is_multiple_of(f.values as usize) {
        wanted
    } else if row.is_multiple_of(32) {
        DType::Q8_0
    } else {
        DType::F16
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third one
/// between, keep more bits in Q4_K_M's down projections.
fn more_bits(layer: usize, layers: usize) -> bool {
    layer < layers / 8 || layer >= 7 * layers / 8 || (layer - layers / 8) % 3 == 2
}

/// A tensor's values, row-major, decoded exactly from the checkpoint's format, to `out` in
/// pieces of whole rows (a matrix at most 64 rows at a time, stacked experts one at a time:
/// a large model's tensors never all in memory).
fn emit(source: &Source, out: &mut dyn FnMut(&[f32]) -> Result<()>) -> Result<()> {
    fn rows(m: &Matrix, r0: usize, n: usize) -> Vec<f32> {
        let mut values = vec![0f32; n * m.cols];
        for (r, row) in values.chunks_exact_mut(m.cols).enumerate() {
            m.decode_row(r0 + r, row);
        }
        values
    }
    fn matrix(m: &Matrix, out: &mut dyn FnMut(&[f32]) -> Result<()>) -> Result<()> {
        for r0 in (0..m.rows).step_by(64) {
            out(&rows(m, r0, 64.min(m.rows - r0)))?;
        }
        Ok(())
    }
    match source {
        Source::Vector(v) => out(v),
        Source::Matrix(m) => matrix(m, out),
        Source::Experts(stack) => stack.iter().try_for_each(|m| matrix(m, out)),
        Source::KvHalf { kv_b, heads, nope, v, keys } => {
            let (rank, per_head) = (kv_b.cols, nope + v);
            for h in 0..*heads {
                let head = rows(kv_b, h * per_head, per_head);
                if *keys {
                    // attn_k_b[h][c][i] = W_UK[h][i][c].
                    let transposed: Vec<f32> = (0..rank).flat_map(|c| (0..*nope).map(move |i| (i, c))).map(|(i, c)| head[i * rank + c]).collect();
                    out(&transposed)?;
                } else {
                    out(&head[nope * rank..])?;
                }
            }
            Ok(())
        }
    }
}
