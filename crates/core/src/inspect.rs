//! `dsrun inspect`: what a checkpoint is, how big, and what dsrun will not use.

use crate::checkpoint::Checkpoint;
use crate::config::{Family, ModelConfig};
use crate::model::weights::{FeedForward, Matrix, Mlp, QueryProjection, Weights};
use crate::quant::QuantTarget;
use crate::util::{human_bytes, human_count};
use std::collections::BTreeMap;
use std::fmt::Write;

/// Parameter counts of the main model (the MTP layer excluded).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ParamCounts {
    pub total: u64,
    /// Per token: everything but the routed experts, plus `num_experts_per_tok` of them per MoE layer.
    pub active: u64,
}

pub fn count_params(config: &ModelConfig, w: &Weights) -> ParamCounts {
    let m = |x: &Matrix| (x.rows * x.cols) as u64;
    let mlp = |x: &Mlp| m(&x.gate) + m(&x.up) + m(&x.down);
    let mut total = m(&w.embed) + w.final_norm.len() as u64;
    if !w.lm_head.shares_data(&w.embed) {
        total += m(&w.lm_head);
    }
    let mut inactive = 0u64;
    for layer in &w.layers {
        let a = &layer.attention;
        total += (layer.input_norm.len() + layer.post_attention_norm.len() + a.kv_norm.len()) as u64;
        total += m(&a.kv_a) + m(&a.kv_b) + m(&a.o);
        total += match &a.q {
            QueryProjection::LowRank { a, norm, b } => m(a) + norm.len() as u64 + m(b),
            QueryProjection::Direct(q) => m(q),
        };
        match &layer.ffn {
            FeedForward::Dense(d) => total += mlp(d),
            FeedForward::Moe(moe) => {
                let per_expert = mlp(&moe.experts[0]);
                total += m(&moe.router) + moe.correction_bias.as_ref().map_or(0, |b| b.len() as u64);
                total += moe.shared.as_ref().map_or(0, mlp);
                total += per_expert * moe.experts.len() as u64;
                inactive += per_expert * (moe.experts.len() - config.num_experts_per_tok) as u64;
            }
        }
    }
    ParamCounts { total, active: total - inactive }
}

/// Weight bytes one decode step reads: every matrix but the embedding (one row) and the routed
/// experts (`num_experts_per_tok` of them per MoE layer), in the format `quant` gives them on the
/// GPU (the router always stays as stored).
pub fn active_weight_bytes(config: &ModelConfig, w: &Weights, quant: QuantTarget) -> u64 {
    let m = |x: &Matrix| x.device_bytes(quant);
    let mlp = |x: &Mlp| x.matrices().iter().map(|x| m(x)).sum::<u64>();
    let mut total = m(&w.lm_head) + m(&w.embed) / w.embed.rows as u64;
    for layer in &w.layers {
        total += attention_bytes(&layer.attention, quant);
        total += match &layer.ffn {
            FeedForward::Dense(d) => mlp(d),
            FeedForward::Moe(moe) => moe.router.stored_bytes() as u64 + moe.shared.as_ref().map_or(0, mlp) + mlp(&moe.experts[0]) * config.num_experts_per_tok as u64,
        };
    }
    total
}

/// Multiply-add FLOPs of a prompt token's matmuls: two per active parameter, except the
/// embedding (a row read) and the head (computed for a prompt's last token only). Attention's
/// scores over the cache are not counted (they grow with the position).
pub fn prompt_matmul_flops(config: &ModelConfig, w: &Weights) -> u64 {
    let matrix = |m: &Matrix| (m.rows * m.cols) as u64;
    // A tied head is counted once, as the embedding.
    let head = if w.lm_head.shares_data(&w.embed) { 0 } else { matrix(&w.lm_head) };
    2 * (count_params(config, w).active - matrix(&w.embed) - head)
}

/// Bytes on the GPU of every weight but the routed experts (which expert streaming may keep
/// off the GPU), in the format `quant` gives them; norms and biases as f32.
pub fn resident_weight_bytes(w: &Weights, quant: QuantTarget) -> u64 {
    let m = |x: &Matrix| x.device_bytes(quant);
    let mlp = |x: &Mlp| x.matrices().iter().map(|x| m(x)).sum::<u64>();
    let vector = |v: &[f32]| v.len() as u64 * 4;
    let mut total = m(&w.lm_head) + m(&w.embed) + vector(&w.final_norm);
    for layer in &w.layers {
        total += attention_bytes(&layer.attention, quant) + vector(&layer.input_norm) + vector(&layer.post_attention_norm);
        total += match &layer.ffn {
            FeedForward::Dense(d) => mlp(d),
            FeedForward::Moe(moe) => moe.router.stored_bytes() as u64 + moe.correction_bias.as_deref().map_or(0, vector) + moe.shared.as_ref().map_or(0, mlp),
        };
    }
    total
}

fn attention_bytes(a: &crate::model::weights::Attention, quant: QuantTarget) -> u64 {
    let m = |x: &Matrix| x.device_bytes(quant);
    let q = match &a.q {
        QueryProjection::LowRank { a, norm, b } => m(a) + m(b) + norm.len() as u64 * 4,
        QueryProjection::Direct(q) => m(q),
    };
    q + m(&a.kv_a) + m(&a.kv_b) + m(&a.o) + a.kv_norm.len() as u64 * 4
}

pub fn report(config: &ModelConfig, checkpoint: &Checkpoint, weights: &Weights, ignored: &[String]) -> String {
    let c = config;
    let mut s = String::new();
    let family = match c.family {
        Family::V3 => "DeepSeek-V3 architecture (deepseek_v3)",
        Family::V2 => "DeepSeek-V2 architecture (deepseek_v2)",
    };
    let moe_layers = (0..c.num_hidden_layers).filter(|&l| c.is_moe_layer(l)).count();
    let _ = writeln!(s, "model      {}", checkpoint.dir.display());
    let _ = writeln!(s, "arch       {family}");
    let _ = writeln!(s, "layers     {} ({} dense MLP, {} MoE), hidden {}, vocab {}", c.num_hidden_layers, c.num_hidden_layers - moe_layers, moe_layers, c.hidden_size, c.vocab_size);
    let q = c.q_lora_rank.map_or("q_proj (no q LoRA)".to_string(), |r| format!("q_lora_rank {r}"));
    let _ = writeln!(
        s,
        "attention  MLA, {} heads, {q}, kv_lora_rank {}, qk {}+{} (nope+rope), v {}; latent cache {} values/token/layer",
        c.num_attention_heads,
        c.kv_lora_rank,
        c.qk_nope_head_dim,
        c.qk_rope_head_dim,
        c.v_head_dim,
        c.latent_dim()
    );
    if let Some(ix) = &c.indexer {
        let _ = writeln!(
            s,
            "sparse     DeepSeek Sparse Attention (V3.2): a lightning indexer of {} heads x {} picks {} earlier positions per query; index key cache {} values/token/layer",
            ix.heads, ix.head_dim, ix.topk, ix.head_dim
        );
    }
    let _ = writeln!(
        s,
        "experts    {} routed + {} shared, {} per token, width {}; router {:?} / {:?}, {} groups keep {}, norm_topk_prob {}, scaling {}",
        c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.scoring_func, c.topk_method, c.n_group, c.topk_group, c.norm_topk_prob, c.routed_scaling_factor
    );
    let rope = match &c.yarn {
        Some(y) => format!(
            "theta {}, YaRN factor {} from {} positions (beta {}/{}, mscale {}/{})",
            c.rope_theta, y.factor, y.original_max_position_embeddings, y.beta_fast, y.beta_slow, y.mscale, y.mscale_all_dim
        ),
        None => format!("theta {}", c.rope_theta),
    };
    let _ = writeln!(s, "rope       {rope}; max positions {}; softmax scale {:.6}", c.max_position_embeddings, c.softmax_scale());
    let quant = match c.fp8 {
        Some(b) => format!("FP8 e4m3 with {}x{} block scales", b.block_rows, b.block_cols),
        None => "none (weights as stored)".to_string(),
    };
    let _ = writeln!(s, "quant      {quant}");

    let params = count_params(c, weights);
    let _ = writeln!(s, "params     {} total, {} active per token", human_count(params.total), human_count(params.active));

    let mut by_dtype: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for (_, info) in checkpoint.tensors() {
        let entry = by_dtype.entry(info.dtype_name.clone()).or_default();
        entry.0 += 1;
        entry.1 += info.num_bytes() as u64;
    }
    let _ = writeln!(s, "bytes      (whole checkpoint, by dtype)");
    for (dtype, (count, bytes)) in &by_dtype {
        let _ = writeln!(s, "           {dtype:<8} {:>10}  in {count} tensors", human_bytes(*bytes));
    }

    let _ = writeln!(s, "mtp        {}", describe_mtp(c, weights));
    let unused = if c.unused_keys.is_empty() { "none".to_string() } else { c.unused_keys.join(", ") };
    let _ = writeln!(s, "unused     config.json keys dsrun does not read: {unused}");
    if ignored.is_empty() {
        let _ = writeln!(s, "ignored    nothing");
    } else {
        let _ = writeln!(s, "ignored    (present in the checkpoint, not used by the forward pass)");
        for line in summarize_ignored(c, checkpoint, ignored) {
            let _ = writeln!(s, "           {line}");
        }
    }
    s
}

/// The multi-token-prediction layer: used, announced but absent, or none.
fn describe_mtp(c: &ModelConfig, weights: &Weights) -> String {
    match (&weights.mtp, c.num_nextn_predict_layers) {
        (Some(m), _) => {
            let ffn = if matches!(m.layer.ffn, crate::model::weights::FeedForward::Moe(_)) { "MoE" } else { "dense MLP" };
            let shared = |own: bool| if own { "its own" } else { "the main model's" };
            format!(
                "multi-token prediction layer {} ({ffn}), used to draft tokens (--speculative mtp); {} embedding, {} head",
                m.index,
                shared(!m.embed.shares_data(&weights.embed)),
                shared(!m.head.shares_data(&weights.lm_head)),
            )
        }
        (None, 0) => "none".into(),
        (None, n) => format!("num_nextn_predict_layers is {n}, but the checkpoint has no model.layers.{}.eh_proj.weight: no speculative decoding", c.num_hidden_layers),
    }
}

/// One line per ignored layer (e.g. an MTP layer beyond the first) and per other ignored tensor.
fn summarize_ignored(c: &ModelConfig, checkpoint: &Checkpoint, ignored: &[String]) -> Vec<String> {
    let mut layers: BTreeMap<usize, (usize, u64)> = BTreeMap::new();
    let mut lines = Vec::new();
    for name in ignored {
        let bytes = checkpoint.info(name).map_or(0, |i| i.num_bytes() as u64);
        let layer = name.strip_prefix("model.layers.").and_then(|rest| rest.split('.').next()).and_then(|i| i.parse::<usize>().ok()).filter(|&i| i >= c.num_hidden_layers);
        match layer {
            Some(i) => {
                let e = layers.entry(i).or_default();
                e.0 += 1;
                e.1 += bytes;
            }
            None => lines.push(format!("{name} ({})", human_bytes(bytes))),
        }
    }
    let mut out: Vec<String> = layers
        .into_iter()
        .map(|(i, (count, bytes))| {
            let what = if i < c.num_hidden_layers + c.num_nextn_predict_layers { "multi-token prediction layer" } else { "beyond num_hidden_layers" };
            format!("model.layers.{i}.* ({count} tensors, {}): {what}, not loaded", human_bytes(bytes))
        })
        .collect();
    out.extend(lines);
    out
}
