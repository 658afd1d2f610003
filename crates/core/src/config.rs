//! `config.json` of Hugging Face DeepSeek-V2/V3 checkpoints, parsed into one validated `ModelConfig`.
//!
//! Keys are read by hand from a JSON value (not serde-derived) so that every problem names the key
//! and the value it found. Defaults follow transformers' `DeepseekV3Config` / `DeepseekV2Config`.

use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V2,
    V3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringFunc {
    Sigmoid,
    Softmax,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    /// Top-k over all experts.
    Greedy,
    /// Groups ranked by their best score; top-k inside the best `topk_group` groups (DeepSeek-V2).
    GroupLimitedGreedy,
    /// Groups ranked by the sum of their two best bias-corrected scores (DeepSeek-V3).
    NoauxTc,
}

/// YaRN context extension (`rope_scaling.type == "yarn"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: f64,
    pub mscale_all_dim: f64,
    /// An explicit `attention_factor` overrides the cos/sin scale derived from the mscales.
    pub attention_factor: Option<f64>,
}

/// DeepSeek Sparse Attention's lightning indexer (V3.2): `heads` scoring heads of `head_dim`
/// pick the `topk` earlier positions each query attends to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IndexerConfig {
    pub heads: usize,
    pub head_dim: usize,
    pub topk: usize,
}

/// Block-quantised FP8 weights (`quantization_config.quant_method == "fp8"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8Blocks {
    pub block_rows: usize,
    pub block_cols: usize,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
    pub num_attention_heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub scoring_func: ScoringFunc,
    pub topk_method: TopkMethod,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub yarn: Option<Yarn>,
    pub max_position_embeddings: usize,
    pub num_nextn_predict_layers: usize,
    /// DeepSeek-V3.2's sparse attention (`model_type: deepseek_v32`): the lightning indexer.
    pub indexer: Option<IndexerConfig>,
    pub fp8: Option<Fp8Blocks>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Keys of config.json dsrun does not read (beyond training and bookkeeping metadata that
    /// cannot change the forward pass): listed by `inspect`, warned about once at load.
    pub unused_keys: Vec<String>,
}

/// Keys of published configs that describe training or the file, not the forward pass.
const METADATA_KEYS: [&str; 17] = [
    "architectures",
    "auto_map",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "use_cache",
    "initializer_range",
    "attention_dropout",
    "aux_loss_alpha",
    "seq_aux",
    "ep_size",
    "pretraining_tp",
    "num_key_value_heads",
    "_name_or_path",
    "pad_token_id",
    "model_name",
    "attention_bias",
];

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::NotFound { " (is this a Hugging Face checkpoint directory? pass it with --model DIR)" } else { "" };
            Error::config("config.json", format!("cannot read {}: {e}{hint}", path.display()))
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
        Self::from_json(&value)
    }

    pub fn from_json(value: &Value) -> Result<Self> {
        let obj = value.as_object().ok_or_else(|| Error::config("config.json", "top level is not a JSON object"))?;
        let keys = Keys::new(obj);

        let model_type = keys.string("model_type")?.ok_or_else(|| Error::config("model_type", "missing key `model_type`"))?;
        let family = match model_type.as_str() {
            "deepseek_v3" | "kimi_k2" | "deepseek_v32" => Family::V3,
            "deepseek_v2" => Family::V2,
            other => return Err(Error::config("model_type", format!("unsupported model_type `{other}` (dsrun runs deepseek_v3 and deepseek_v2 architectures)"))),
        };
        if keys.bool("attention_bias")? == Some(true) {
            return Err(Error::config("attention_bias", "`attention_bias` is true: DeepSeek-architecture attention has no biases, and dsrun reads none"));
        }
        if let Some(act) = keys.string("hidden_act")? {
            if act != "silu" {
                return Err(Error::config("hidden_act", format!("unsupported hidden_act `{act}` (only `silu`)")));
            }
        }

        let (default_scoring, default_topk) = match family {
            Family::V3 => ("sigmoid", "noaux_tc"),
            Family::V2 => ("softmax", "greedy"),
        };
        let scoring_func = match keys.string("scoring_func")?.as_deref().unwrap_or(default_scoring) {
            "sigmoid" => ScoringFunc::Sigmoid,
            "softmax" => ScoringFunc::Softmax,
            other => return Err(Error::config("scoring_func", format!("unsupported scoring_func `{other}` (sigmoid or softmax)"))),
        };
        let topk_method = match keys.string("topk_method")?.as_deref().unwrap_or(default_topk) {
            "greedy" => TopkMethod::Greedy,
            "group_limited_greedy" => TopkMethod::GroupLimitedGreedy,
            "noaux_tc" => TopkMethod::NoauxTc,
            other => return Err(Error::config("topk_method", format!("unsupported topk_method `{other}` (greedy, group_limited_greedy or noaux_tc)"))),
        };

        let rope_theta_default = keys.object("rope_parameters")?.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64).unwrap_or(10000.0);
        let config = ModelConfig {
            family,
            vocab_size: keys.required_usize("vocab_size")?,
            hidden_size: keys.required_usize("hidden_size")?,
            intermediate_size: keys.required_usize("intermediate_size")?,
            moe_intermediate_size: keys.required_usize("moe_intermediate_size")?,
            num_hidden_layers: keys.required_usize("num_hidden_layers")?,
            first_k_dense_replace: keys.usize("first_k_dense_replace")?.unwrap_or(0),
            moe_layer_freq: keys.usize("moe_layer_freq")?.unwrap_or(1),
            num_attention_heads: keys.required_usize("num_attention_heads")?,
            q_lora_rank: keys.usize("q_lora_rank")?,
            kv_lora_rank: keys.required_usize("kv_lora_rank")?,
            qk_nope_head_dim: keys.required_usize("qk_nope_head_dim")?,
            qk_rope_head_dim: keys.required_usize("qk_rope_head_dim")?,
            v_head_dim: keys.required_usize("v_head_dim")?,
            n_routed_experts: keys.required_usize("n_routed_experts")?,
            n_shared_experts: keys.usize("n_shared_experts")?.unwrap_or(0),
            num_experts_per_tok: keys.required_usize("num_experts_per_tok")?,
            n_group: keys.usize("n_group")?.unwrap_or(if family == Family::V3 { 8 } else { 1 }),
            topk_group: keys.usize("topk_group")?.unwrap_or(if family == Family::V3 { 4 } else { 1 }),
            scoring_func,
            topk_method,
            norm_topk_prob: keys.bool("norm_topk_prob")?.unwrap_or(family == Family::V3),
            routed_scaling_factor: keys.f64("routed_scaling_factor")?.unwrap_or(if family == Family::V3 { 2.5 } else { 1.0 }),
            rms_norm_eps: keys.f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: keys.f64("rope_theta")?.unwrap_or(rope_theta_default),
            yarn: parse_rope_scaling(&keys)?,
            max_position_embeddings: keys.usize("max_position_embeddings")?.unwrap_or(4096),
            num_nextn_predict_layers: keys.usize("num_nextn_predict_layers")?.unwrap_or(0),
            // transformers' defaults for the keys V3.2's config may leave out.
            indexer: match model_type.as_str() {
                "deepseek_v32" => {
                    Some(IndexerConfig { heads: keys.usize("index_n_heads")?.unwrap_or(64), head_dim: keys.usize("index_head_dim")?.unwrap_or(128), topk: keys.usize("index_topk")?.unwrap_or(2048) })
                }
                _ => None,
            },
            fp8: parse_quantization(&keys)?,
            tie_word_embeddings: keys.bool("tie_word_embeddings")?.unwrap_or(false),
            bos_token_id: keys.usize("bos_token_id")?.map(|v| v as u32),
            eos_token_ids: parse_eos(keys.get("eos_token_id"))?,
            unused_keys: Vec::new(),
        };
        let read = keys.read.into_inner();
        let mut config = config;
        config.unused_keys = obj.keys().filter(|k| !read.contains(k.as_str()) && !METADATA_KEYS.contains(&k.as_str())).cloned().collect();
        config.validate()?;
        Ok(config)
    }

    /// Each size key's value and the largest it may take: beyond the largest published config
    /// by orders of magnitude, and small enough that every product of sizes the model computes
    /// (shapes, byte counts, kernel indices) fits in 64 bits, and no loop over layers runs away.
    fn size_limits(&self) -> [(&'static str, usize, usize); 17] {
        [
            ("vocab_size", self.vocab_size, 1 << 24),
            ("hidden_size", self.hidden_size, 1 << 20),
            ("intermediate_size", self.intermediate_size, 1 << 22),
            ("moe_intermediate_size", self.moe_intermediate_size, 1 << 22),
            ("num_hidden_layers", self.num_hidden_layers, 1 << 12),
            ("first_k_dense_replace", self.first_k_dense_replace, 1 << 12),
            ("moe_layer_freq", self.moe_layer_freq, 1 << 12),
            ("num_attention_heads", self.num_attention_heads, 1 << 12),
            ("q_lora_rank", self.q_lora_rank.unwrap_or(0), 1 << 16),
            ("kv_lora_rank", self.kv_lora_rank, 1 << 16),
            ("qk_nope_head_dim", self.qk_nope_head_dim, 1 << 12),
            ("qk_rope_head_dim", self.qk_rope_head_dim, 1 << 12),
            ("v_head_dim", self.v_head_dim, 1 << 12),
            ("n_routed_experts", self.n_routed_experts, 1 << 16),
            ("n_shared_experts", self.n_shared_experts, 1 << 8),
            ("num_nextn_predict_layers", self.num_nextn_predict_layers, 1 << 4),
            ("max_position_embeddings", self.max_position_embeddings, 1 << 26),
        ]
    }

    /// Sizes first (before anything loops over layers or multiplies dimensions), then the
    /// values that must give finite results.
    fn validate(&self) -> Result<()> {
        for (key, value, limit) in self.size_limits() {
            if value > limit {
                return Err(Error::config(key, format!("`{key}` is {value}, beyond what any DeepSeek-architecture model uses (at most {limit}): the config is corrupt")));
            }
        }
        self.validate_finite()?;
        self.validate_shapes()
    }

    /// Values that would make the forward pass non-finite, refused with the key named.
    fn validate_finite(&self) -> Result<()> {
        let bad = |key: &str, rule: &str, value: f64| Err(Error::config(key, format!("`{key}` must be {rule}, found {value}")));
        if !(self.routed_scaling_factor > 0.0 && self.routed_scaling_factor <= 1e3) {
            return bad("routed_scaling_factor", "in (0, 1000]", self.routed_scaling_factor);
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps <= 1.0) {
            return bad("rms_norm_eps", "in (0, 1]", self.rms_norm_eps);
        }
        if !(self.rope_theta > 1.0 && self.rope_theta.is_finite()) {
            return bad("rope_theta", "a finite number > 1", self.rope_theta);
        }
        if let Some(y) = &self.yarn {
            if !(y.factor <= 1e6) {
                return bad("rope_scaling.factor", "in [1, 1e6]", y.factor);
            }
            for (key, v) in [("rope_scaling.beta_fast", y.beta_fast), ("rope_scaling.beta_slow", y.beta_slow)] {
                if !(v > 0.0 && v <= 1e6) {
                    return bad(key, "in (0, 1e6]", v);
                }
            }
            for (key, v) in [("rope_scaling.mscale", y.mscale), ("rope_scaling.mscale_all_dim", y.mscale_all_dim)] {
                if !(0.0..=100.0).contains(&v) {
                    return bad(key, "in [0, 100]", v);
                }
            }
            if let Some(a) = y.attention_factor.filter(|a| !(*a > 0.0 && *a <= 1e3)) {
                return bad("rope_scaling.attention_factor", "in (0, 1000]", a);
            }
        }
        let rope = Rope::new(self);
        if !(rope.scale.is_finite() && rope.scale > 0.0 && rope.inv_freq.iter().all(|f| f.is_finite())) {
            return Err(Error::config("rope_theta", "`rope_theta` and `rope_scaling` give non-finite rotary frequencies or scale: the config is corrupt"));
        }
        let scale = self.softmax_scale();
        if !(scale > 0.0 && scale.is_finite()) {
            return Err(Error::config("qk_nope_head_dim", format!("the attention softmax scale from `qk_*_head_dim` and `rope_scaling` is {scale}: the config is corrupt")));
        }
        Ok(())
    }

    fn validate_shapes(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("moe_layer_freq", self.moe_layer_freq),
            ("n_group", self.n_group),
            ("topk_group", self.topk_group),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(Error::config(key, format!("`{key}` must be positive, found 0")));
            }
        }
        if self.qk_rope_head_dim == 0 || !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err(Error::config("qk_rope_head_dim", format!("`qk_rope_head_dim` must be a positive even number (rotated in pairs), found {}", self.qk_rope_head_dim)));
        }
        if self.q_lora_rank == Some(0) {
            return Err(Error::config("q_lora_rank", "`q_lora_rank` must be positive or null, found 0"));
        }
        if let Some(ix) = &self.indexer {
            for (key, value) in [("index_n_heads", ix.heads), ("index_head_dim", ix.head_dim), ("index_topk", ix.topk)] {
                if value == 0 || value > 1 << 20 {
                    return Err(Error::config(key, format!("`{key}` must be between 1 and {}, found {value}", 1 << 20)));
                }
            }
            if ix.head_dim < self.qk_rope_head_dim {
                return Err(Error::config("index_head_dim", format!("`index_head_dim` ({}) is smaller than `qk_rope_head_dim` ({}), which it rotates", ix.head_dim, self.qk_rope_head_dim)));
            }
            if self.q_lora_rank.is_none() {
                return Err(Error::config("q_lora_rank", "deepseek_v32 needs `q_lora_rank`: the indexer's queries read the query LoRA"));
            }
        }
        if self.has_moe_layers() {
            if self.n_routed_experts == 0 || self.moe_intermediate_size == 0 {
                return Err(Error::config("n_routed_experts", "`n_routed_experts` and `moe_intermediate_size` must be positive"));
            }
            if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.n_routed_experts {
                return Err(Error::config("num_experts_per_tok", format!("`num_experts_per_tok` ({}) must be between 1 and n_routed_experts ({})", self.num_experts_per_tok, self.n_routed_experts)));
            }
            if !self.n_routed_experts.is_multiple_of(self.n_group) {
                return Err(Error::config("n_routed_experts", format!("`n_routed_experts` ({}) is not divisible by `n_group` ({})", self.n_routed_experts, self.n_group)));
            }
            if self.topk_group > self.n_group {
                return Err(Error::config("topk_group", format!("`topk_group` ({}) exceeds `n_group` ({})", self.topk_group, self.n_group)));
            }
            let group_limited = self.topk_method != TopkMethod::Greedy && self.n_group > 1;
            let reachable = if group_limited { self.topk_group * (self.n_routed_experts / self.n_group) } else { self.n_routed_experts };
            if self.num_experts_per_tok > reachable {
                return Err(Error::config("num_experts_per_tok", format!("`num_experts_per_tok` ({}) exceeds the {} experts in the `topk_group` best groups", self.num_experts_per_tok, reachable)));
            }
            if self.topk_method == TopkMethod::NoauxTc && self.n_group > 1 && self.n_routed_experts / self.n_group < 2 {
                return Err(Error::config("topk_method", "noaux_tc needs at least 2 experts per group"));
            }
        }
        if self.has_dense_layers() && self.intermediate_size == 0 {
            return Err(Error::config("intermediate_size", "`intermediate_size` must be positive"));
        }
        if !(self.rms_norm_eps > 0.0) {
            return Err(Error::config("rms_norm_eps", format!("`rms_norm_eps` must be positive, found {}", self.rms_norm_eps)));
        }
        if !(self.rope_theta > 1.0) {
            return Err(Error::config("rope_theta", format!("`rope_theta` must be > 1, found {}", self.rope_theta)));
        }
        if let Some(id) = self.bos_token_id {
            if id as usize >= self.vocab_size {
                return Err(Error::config("bos_token_id", format!("`bos_token_id` {id} is not below vocab_size {}", self.vocab_size)));
            }
        }
        Ok(())
    }

    /// Layers below `first_k_dense_replace` (and those skipped by `moe_layer_freq`) use a dense MLP.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.n_routed_experts > 0 && layer >= self.first_k_dense_replace && layer.is_multiple_of(self.moe_layer_freq)
    }

    fn has_moe_layers(&self) -> bool {
        (0..self.num_hidden_layers).any(|l| self.is_moe_layer(l))
    }

    fn has_dense_layers(&self) -> bool {
        (0..self.num_hidden_layers).any(|l| !self.is_moe_layer(l))
    }

    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Values the CPU reference caches per token per layer: the latent, then (V3.2) the
    /// indexer's key.
    pub fn cache_row(&self) -> usize {
        self.latent_dim() + self.indexer.map_or(0, |ix| ix.head_dim)
    }

    /// Values cached per token per layer by latent attention: `c_kv` then `k_pe`.
    pub fn latent_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// `qk_head_dim^-0.5`, times `m²` with YaRN (`m = 0.1 · mscale_all_dim · ln(factor) + 1`).
    pub fn softmax_scale(&self) -> f64 {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        match &self.yarn {
            Some(y) if y.mscale_all_dim != 0.0 => {
                let m = yarn_mscale(y.factor, y.mscale_all_dim);
                base * m * m
            }
            _ => base,
        }
    }
}

/// Rotary position embedding's parameters on the `qk_rope_head_dim` dims: one frequency per
/// rotated pair and a scale, with optional YaRN (docs/forward-pass.md, "RoPE and YaRN").
#[derive(Debug, Clone)]
pub struct Rope {
    /// One frequency per rotated pair, rounded to f32 as transformers stores them.
    pub inv_freq: Vec<f32>,
    /// Multiplier on cos and sin (YaRN's attention factor; 1 without YaRN or for V3's mscales).
    pub scale: f32,
}

impl Rope {
    /// The frequencies and scale `config` gives (the oracle's rotation is in `model::rope`).
    pub fn new(config: &ModelConfig) -> Rope {
        let dim = config.qk_rope_head_dim;
        let theta = config.rope_theta;
        let base: Vec<f64> = (0..dim / 2).map(|j| theta.powf(-(2.0 * j as f64) / dim as f64)).collect();
        let Some(y) = &config.yarn else {
            return Rope { inv_freq: base.iter().map(|&f| f as f32).collect(), scale: 1.0 };
        };
        let correction = |rotations: f64| dim as f64 * (y.original_max_position_embeddings as f64 / (2.0 * std::f64::consts::PI * rotations)).ln() / (2.0 * theta.ln());
        let low = correction(y.beta_fast).floor().max(0.0);
        let mut high = correction(y.beta_slow).ceil().min(dim as f64 - 1.0);
        if high == low {
            high += 0.001;
        }
        let inv_freq = base
            .iter()
            .enumerate()
            .map(|(j, &f)| {
                let ramp = ((j as f64 - low) / (high - low)).clamp(0.0, 1.0);
                (f / y.factor * ramp + f * (1.0 - ramp)) as f32
            })
            .collect();
        let scale = y.attention_factor.unwrap_or_else(|| yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim));
        Rope { inv_freq, scale: scale as f32 }
    }
}

/// `0.1 · m · ln(s) + 1`, or 1 when the scale does not extend the context.
pub fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

/// Typed access to config keys (`null` counts as absent), remembering which were read.
struct Keys<'a> {
    map: &'a Map<String, Value>,
    read: std::cell::RefCell<std::collections::BTreeSet<String>>,
}

impl<'a> Keys<'a> {
    fn new(map: &'a Map<String, Value>) -> Keys<'a> {
        Keys { map, read: Default::default() }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.read.borrow_mut().insert(key.to_string());
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| Error::config(key, format!("`{key}` must be a non-negative integer, found {v}"))),
        }
    }

    fn required_usize(&self, key: &str) -> Result<usize> {
        self.usize(key)?.ok_or_else(|| Error::config(key, format!("missing key `{key}`")))
    }

    fn f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().filter(|x| x.is_finite()).map(Some).ok_or_else(|| Error::config(key, format!("`{key}` must be a number, found {v}"))),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| Error::config(key, format!("`{key}` must be true or false, found {v}"))),
        }
    }

    fn string(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(|s| Some(s.to_string())).ok_or_else(|| Error::config(key, format!("`{key}` must be a string, found {v}"))),
        }
    }

    fn object(&self, key: &str) -> Result<Option<&'a Map<String, Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_object().map(Some).ok_or_else(|| Error::config(key, format!("`{key}` must be an object, found {v}"))),
        }
    }
}

/// Reads `rope_scaling` (published checkpoints) or `rope_parameters` (transformers v5).
fn parse_rope_scaling(keys: &Keys) -> Result<Option<Yarn>> {
    let (key, params) = match (keys.object("rope_scaling")?, keys.object("rope_parameters")?) {
        (Some(p), _) => ("rope_scaling", p),
        (None, Some(p)) => ("rope_parameters", p),
        (None, None) => return Ok(None),
    };
    let inner = Keys::new(params);
    let kind = inner.string("rope_type")?.or(inner.string("type")?).unwrap_or_else(|| "default".into());
    match kind.as_str() {
        "default" => return Ok(None),
        "yarn" => {}
        other => return Err(Error::config(format!("{key}.rope_type"), format!("unsupported {key}.rope_type `{other}` (default or yarn)"))),
    }
    let field = |name: &str, default: Option<f64>| -> Result<f64> {
        inner
            .f64(name)
            .map_err(|_| Error::config(format!("{key}.{name}"), format!("`{key}.{name}` must be a number")))?
            .or(default)
            .ok_or_else(|| Error::config(format!("{key}.{name}"), format!("missing key `{key}.{name}` (needed for yarn)")))
    };
    let factor = field("factor", None)?;
    if !(factor >= 1.0) {
        return Err(Error::config(format!("{key}.factor"), format!("`{key}.factor` must be >= 1, found {factor}")));
    }
    let original = inner
        .usize("original_max_position_embeddings")
        .map_err(|_| Error::config(format!("{key}.original_max_position_embeddings"), format!("`{key}.original_max_position_embeddings` must be an integer")))?
        .ok_or_else(|| Error::config(format!("{key}.original_max_position_embeddings"), format!("missing key `{key}.original_max_position_embeddings` (needed for yarn)")))?;
    if original == 0 {
        return Err(Error::config(format!("{key}.original_max_position_embeddings"), format!("`{key}.original_max_position_embeddings` must be positive")));
    }
    Ok(Some(Yarn {
        factor,
        original_max_position_embeddings: original,
        beta_fast: field("beta_fast", Some(32.0))?,
        beta_slow: field("beta_slow", Some(1.0))?,
        mscale: field("mscale", Some(1.0))?,
        mscale_all_dim: field("mscale_all_dim", Some(0.0))?,
        attention_factor: inner.f64("attention_factor")?,
    }))
}

fn parse_quantization(keys: &Keys) -> Result<Option<Fp8Blocks>> {
    let Some(q) = keys.object("quantization_config")? else { return Ok(None) };
    let inner = Keys::new(q);
    let method = inner.string("quant_method")?.unwrap_or_default();
    if method != "fp8" {
        return Err(Error::config("quantization_config.quant_method", format!("unsupported quantization_config.quant_method `{method}` (dsrun reads fp8 block-quantised checkpoints)")));
    }
    if let Some(fmt) = inner.string("fmt")? {
        if fmt != "e4m3" {
            return Err(Error::config("quantization_config.fmt", format!("unsupported quantization_config.fmt `{fmt}` (only e4m3)")));
        }
    }
    let block = match inner.get("weight_block_size") {
        None => vec![128, 128],
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|n| n as usize)).collect::<Option<Vec<_>>>())
            .filter(|b| b.len() == 2 && b.iter().all(|&n| n > 0))
            .ok_or_else(|| Error::config("quantization_config.weight_block_size", format!("`quantization_config.weight_block_size` must be two positive integers, found {v}")))?,
    };
    Ok(Some(Fp8Blocks { block_rows: block[0], block_cols: block[1] }))
}

pub(crate) fn parse_eos(value: Option<&Value>) -> Result<Vec<u32>> {
    match value {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Number(n)) => n.as_u64().map(|id| vec![id as u32]).ok_or_else(|| Error::config("eos_token_id", format!("`eos_token_id` must be a token id, found {n}"))),
        Some(Value::Array(ids)) => {
            ids.iter().map(|v| v.as_u64().map(|id| id as u32)).collect::<Option<Vec<_>>>().ok_or_else(|| Error::config("eos_token_id", "`eos_token_id` must be a token id or a list of them"))
        }
        Some(other) => Err(Error::config("eos_token_id", format!("`eos_token_id` must be a token id or a list, found {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn published(name: &str) -> Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data").join(name);
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn with(mut base: Value, key: &str, value: Value) -> Value {
        base[key] = value;
        base
    }

    fn err(value: Value) -> String {
        ModelConfig::from_json(&value).unwrap_err().to_string()
    }

    #[test]
    fn deepseek_v3_published_config() {
        let c = ModelConfig::from_json(&published("deepseek_v3_config.json")).unwrap();
        assert!(c.unused_keys.is_empty(), "{:?}", c.unused_keys);
        assert_eq!(c.family, Family::V3);
        assert_eq!((c.vocab_size, c.hidden_size, c.num_hidden_layers), (129280, 7168, 61));
        assert_eq!(c.q_lora_rank, Some(1536));
        assert_eq!(c.latent_dim(), 576);
        assert_eq!((c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group), (256, 8, 8, 4));
        assert_eq!((c.scoring_func, c.topk_method), (ScoringFunc::Sigmoid, TopkMethod::NoauxTc));
        assert!(c.norm_topk_prob);
        assert_eq!(c.routed_scaling_factor, 2.5);
        assert_eq!(c.fp8, Some(Fp8Blocks { block_rows: 128, block_cols: 128 }));
        let y = c.yarn.as_ref().unwrap();
        assert_eq!((y.factor, y.original_max_position_embeddings), (40.0, 4096));
        assert!(!c.is_moe_layer(2) && c.is_moe_layer(3) && c.is_moe_layer(60));
        assert_eq!(c.num_nextn_predict_layers, 1);
        assert_eq!(c.eos_token_ids, vec![1]);
        // docs/forward-pass.md: 192^-0.5 * (0.1 ln 40 + 1)^2; transformers gives 0.1352337788608801.
        assert!((c.softmax_scale() - 0.1352337788608801).abs() < 1e-12);
    }

    #[test]
    fn deepseek_v2_lite_published_config() {
        let c = ModelConfig::from_json(&published("deepseek_v2_lite_config.json")).unwrap();
        assert!(c.unused_keys.is_empty(), "{:?}", c.unused_keys);
        assert_eq!(c.family, Family::V2);
        assert_eq!(c.q_lora_rank, None);
        assert_eq!((c.scoring_func, c.topk_method), (ScoringFunc::Softmax, TopkMethod::Greedy));
        assert_eq!((c.n_shared_experts, c.num_experts_per_tok), (2, 6));
        assert!(!c.norm_topk_prob);
        assert_eq!(c.fp8, None);
        let m = yarn_mscale(40.0, 0.707);
        assert!((c.softmax_scale() - 192f64.powf(-0.5) * m * m).abs() < 1e-12);
    }

    #[test]
    fn rope_parameters_of_transformers_v5_are_read() {
        let mut v = published("deepseek_v3_config.json");
        let scaling = v.as_object_mut().unwrap().remove("rope_scaling").unwrap();
        v.as_object_mut().unwrap().remove("rope_theta");
        let mut params = scaling.clone();
        params.as_object_mut().unwrap().remove("type");
        params["rope_type"] = json!("yarn");
        params["rope_theta"] = json!(50000.0);
        v["rope_parameters"] = params;
        let c = ModelConfig::from_json(&v).unwrap();
        assert_eq!(c.rope_theta, 50000.0);
        assert_eq!(c.yarn.unwrap().factor, 40.0);

        let mut plain = published("deepseek_v3_config.json");
        plain.as_object_mut().unwrap().remove("rope_scaling");
        plain["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 20000.0});
        plain.as_object_mut().unwrap().remove("rope_theta");
        let c = ModelConfig::from_json(&plain).unwrap();
        assert!(c.yarn.is_none());
        assert_eq!(c.rope_theta, 20000.0);
        assert!((c.softmax_scale() - 192f64.powf(-0.5)).abs() < 1e-15);
    }

    #[test]
    fn v3_defaults_apply_when_keys_are_omitted() {
        // transformers' V3 config omits scoring_func / topk_method (hard-coded sigmoid / noaux_tc).
        let mut v = published("deepseek_v3_config.json");
        for key in ["scoring_func", "topk_method", "quantization_config"] {
            v.as_object_mut().unwrap().remove(key);
        }
        let c = ModelConfig::from_json(&v).unwrap();
        assert_eq!((c.scoring_func, c.topk_method, c.fp8), (ScoringFunc::Sigmoid, TopkMethod::NoauxTc, None));
    }

    #[test]
    fn unsupported_values_name_the_key_and_value() {
        let v3 = published("deepseek_v3_config.json");
        let e = err(with(v3.clone(), "hidden_act", json!("gelu")));
        assert!(e.contains("hidden_act") && e.contains("gelu"), "{e}");
        let e = err(with(v3.clone(), "topk_method", json!("magic")));
        assert!(e.contains("topk_method") && e.contains("magic"), "{e}");
        let e = err(with(v3.clone(), "scoring_func", json!("tanh")));
        assert!(e.contains("scoring_func") && e.contains("tanh"), "{e}");
        let e = err(with(v3.clone(), "model_type", json!("llama")));
        assert!(e.contains("model_type") && e.contains("llama"), "{e}");
        let e = err(with(v3.clone(), "hidden_size", json!("big")));
        assert!(e.contains("hidden_size") && e.contains("big"), "{e}");
        let e = err(with(v3.clone(), "quantization_config", json!({"quant_method": "gptq"})));
        assert!(e.contains("quant_method") && e.contains("gptq"), "{e}");
        let e = err(with(v3.clone(), "rope_scaling", json!({"type": "longrope", "factor": 2})));
        assert!(e.contains("rope_type") && e.contains("longrope"), "{e}");
        let e = err(with(v3.clone(), "qk_rope_head_dim", json!(63)));
        assert!(e.contains("qk_rope_head_dim") && e.contains("63"), "{e}");
        let e = err(with(v3.clone(), "num_experts_per_tok", json!(300)));
        assert!(e.contains("num_experts_per_tok"), "{e}");
        let e = err(with(v3.clone(), "n_group", json!(7)));
        assert!(e.contains("n_group"), "{e}");
        // 4 groups of 32 experts cannot supply 200 choices.
        let e = err(with(v3.clone(), "num_experts_per_tok", json!(200)));
        assert!(e.contains("topk_group"), "{e}");
        let mut missing = v3.clone();
        missing.as_object_mut().unwrap().remove("kv_lora_rank");
        let e = err(missing);
        assert!(e.contains("missing key `kv_lora_rank`"), "{e}");
        assert!(err(json!([1, 2])).contains("not a JSON object"));
    }

    #[test]
    fn malformed_file_is_a_json_error_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("dsrun-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(&path, "{\"model_type\": \"deepseek_v3\",").unwrap();
        let e = ModelConfig::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("malformed JSON"), "{e}");
        let e = ModelConfig::from_file(&dir.join("absent.json")).unwrap_err().to_string();
        assert!(e.contains("absent.json") && e.contains("--model"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn keys_dsrun_does_not_read_are_listed() {
        let mut v = published("deepseek_v3_config.json");
        v["scale_fmt"] = json!("ue8m0");
        v["index_topk"] = json!(2048);
        let c = ModelConfig::from_json(&v).unwrap();
        assert_eq!(c.unused_keys, ["index_topk", "scale_fmt"]);
        v["attention_bias"] = json!(true);
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("attention_bias"), "{e}");
    }
}
