//! The tensors of a DeepSeek-V2/V3 model, looked up by their published names and checked for
//! presence, dtype and shape against the config before any compute.
//!
//! Matrices stay in the checkpoint's format (memory-mapped, not copied); a backend decodes them.
//! Vectors (norm weights, router bias) are small and are decoded to f32 at load.

use crate::checkpoint::{Checkpoint, TensorBytes, TensorInfo};
use crate::config::{Fp8Blocks, ModelConfig, TopkMethod};
use crate::error::{Error, Result};
use crate::quant::{self, DType};
use std::cell::RefCell;
use std::collections::BTreeSet;

/// Per-block multipliers of an FP8 matrix: a `[ceil(rows/br), ceil(cols/bc)]` grid.
#[derive(Debug, Clone)]
pub struct BlockScales {
    pub block_rows: usize,
    pub block_cols: usize,
    pub grid_cols: usize,
    pub values: Vec<f32>,
}

/// A `[rows, cols]` weight matrix in its stored format (row-major, as `nn.Linear` keeps it).
#[derive(Debug, Clone)]
pub struct Matrix {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
    pub data: TensorBytes,
    /// FP8: block scales; q8: a scale per group; q4: (scale, min) pairs per group.
    pub scales: Option<BlockScales>,
}

impl Matrix {
    /// Decodes row `r` to f32 (FP8 rows come out with their block scales applied, q8/q4 rows
    /// with their group scales).
    #[inline(always)] // the CPU backend's kernels decode inside their SIMD-level code
    pub fn decode_row(&self, r: usize, out: &mut [f32]) {
        debug_assert_eq!(out.len(), self.cols);
        let data = self.data.as_slice();
        if self.dtype == DType::Q4 {
            let s = self.scales.as_ref().expect("q4 carries group parameters");
            let start = r * self.cols;
            if start.is_multiple_of(2) && self.cols.is_multiple_of(2) && s.block_cols.is_multiple_of(2) {
                // Whole bytes, a group at a time (the general rule below, without a division
                // per value).
                let bytes = &data[start / 2..(start + self.cols) / 2];
                let groups = &s.values[r * s.grid_cols * 2..][..s.grid_cols * 2];
                for ((out, bytes), group) in out.chunks_mut(s.block_cols).zip(bytes.chunks(s.block_cols / 2)).zip(groups.chunks_exact(2)) {
                    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
                        pair[0] = (b & 0xf) as f32 * group[0] + group[1];
                        pair[1] = (b >> 4) as f32 * group[0] + group[1];
                    }
                }
                return;
            }
            for (c, o) in out.iter_mut().enumerate() {
                let i = r * self.cols + c;
                let q = (data[i / 2] >> ((i % 2) * 4)) & 0xf;
                let g = (r * s.grid_cols + c / s.block_cols) * 2;
                *o = q as f32 * s.values[g] + s.values[g + 1];
            }
            return;
        }
        let width = self.dtype.format().bytes(self.cols);
        quant::decode_into(self.dtype, &data[r * width..(r + 1) * width], out);
        if let Some(s) = &self.scales {
            let grid_row = &s.values[(r / s.block_rows) * s.grid_cols..][..s.grid_cols];
            for (block, scale) in out.chunks_mut(s.block_cols).zip(grid_row) {
                block.iter_mut().for_each(|v| *v *= scale);
            }
        }
    }

    /// This matrix converted to `target` (exact decode to f32, then re-encoded); `Keep` and
    /// same-format conversions return it unchanged.
    pub fn quantized(&self, target: quant::QuantTarget) -> Matrix {
        let dtype = match target.dtype() {
            Some(dtype) if dtype != self.dtype => dtype,
            _ => return self.clone(),
        };
        let mut values = vec![0f32; self.rows * self.cols];
        for (r, row) in values.chunks_mut(self.cols).enumerate() {
            self.decode_row(r, row);
        }
        Matrix::from_values(&self.name, self.rows, self.cols, dtype, &values, (128, 128))
    }

    /// A matrix from f32 values stored as `dtype` (FP8: block-quantised with `block` scales).
    /// For synthetic weights in tests and benchmarks.
    pub fn from_values(name: &str, rows: usize, cols: usize, dtype: DType, values: &[f32], block: (usize, usize)) -> Matrix {
        assert_eq!(values.len(), rows * cols, "{name}: values for a {rows}x{cols} matrix");
        let groups = |values: Vec<f32>| BlockScales { block_rows: 1, block_cols: quant::GROUP, grid_cols: cols.div_ceil(quant::GROUP), values };
        let (bytes, scales) = match dtype {
            DType::Q8 => {
                let (codes, scales) = quant::quantize_q8(values, rows, cols);
                (codes, Some(groups(scales)))
            }
            DType::Q4 => {
                let (codes, params) = quant::quantize_q4(values, rows, cols);
                (codes, Some(groups(params)))
            }
            DType::F8E4M3 => {
                let (codes, grid) = quant::quantize_fp8_blocks(values, rows, cols, block);
                let scales = BlockScales { block_rows: block.0, block_cols: block.1, grid_cols: cols.div_ceil(block.1), values: grid };
                (codes, Some(scales))
            }
            _ => (quant::encode(dtype, values), None),
        };
        Matrix { name: name.into(), rows, cols, dtype, data: crate::checkpoint::TensorBytes::from_vec(bytes), scales }
    }

    /// Rows `row0 .. row0 + rows` as a matrix of their own (FP8: row0 on a scale-block boundary;
    /// q4: an even element offset).
    pub fn row_slice(&self, row0: usize, rows: usize) -> Matrix {
        let format = self.dtype.format();
        let (start, end) = (format.bytes(row0 * self.cols), format.bytes((row0 + rows) * self.cols));
        let scales = self.scales.as_ref().map(|s| {
            let per_row = if self.dtype == DType::Q4 { 2 * s.grid_cols } else { s.grid_cols };
            let (g0, g1) = (row0 / s.block_rows, (row0 + rows).div_ceil(s.block_rows));
            BlockScales { values: s.values[g0 * per_row..g1 * per_row].to_vec(), ..s.clone() }
        });
        Matrix { name: self.name.clone(), rows, cols: self.cols, dtype: self.dtype, data: self.data.slice(start..end), scales }
    }

    /// Columns `col0 .. col0 + cols` of every row as a matrix of their own (copied). FP8 keeps
    /// its codes and scales where `col0` starts a scale block; otherwise, and for q8/q4, the
    /// columns are decoded exactly to f32.
    pub fn column_slice(&self, name: &str, col0: usize, cols: usize) -> Matrix {
        assert!(col0 + cols <= self.cols, "{}: columns {col0}..{} of {}", self.name, col0 + cols, self.cols);
        let plain = matches!(self.dtype, DType::F32 | DType::BF16 | DType::F16);
        let fp8_aligned = self.dtype == DType::F8E4M3 && self.scales.as_ref().is_some_and(|s| col0.is_multiple_of(s.block_cols));
        if plain || fp8_aligned {
            let size = self.dtype.size_bytes();
            let data = self.data.as_slice();
            let mut bytes = Vec::with_capacity(self.rows * cols * size);
            for r in 0..self.rows {
                let row = r * self.cols * size;
                bytes.extend_from_slice(&data[row + col0 * size..row + (col0 + cols) * size]);
            }
            let scales = self.scales.as_ref().map(|s| {
                let (g0, g1) = (col0 / s.block_cols, (col0 + cols).div_ceil(s.block_cols));
                let values = s.values.chunks(s.grid_cols).flat_map(|grid_row| grid_row[g0..g1].iter().copied()).collect();
                BlockScales { grid_cols: g1 - g0, values, ..s.clone() }
            });
            return Matrix { name: name.into(), rows: self.rows, cols, dtype: self.dtype, data: TensorBytes::from_vec(bytes), scales };
        }
        let mut row = vec![0f32; self.cols];
        let mut values = Vec::with_capacity(self.rows * cols);
        for r in 0..self.rows {
            self.decode_row(r, &mut row);
            values.extend_from_slice(&row[col0..col0 + cols]);
        }
        Matrix::from_values(name, self.rows, cols, DType::F32, &values, (128, 128))
    }

    /// Whether `other` views the same stored bytes (a tied or shared weight, uploaded once).
    pub fn shares_data(&self, other: &Matrix) -> bool {
        let (a, b) = (self.data.as_slice(), other.data.as_slice());
        std::ptr::eq(a.as_ptr(), b.as_ptr()) && a.len() == b.len()
    }

    /// Bytes this matrix takes on a GPU in the format `quant` gives it, scales included.
    pub fn device_bytes(&self, quant: quant::QuantTarget) -> u64 {
        let target = match quant.dtype() {
            Some(dtype) if dtype != self.dtype => dtype.format(),
            _ => return self.stored_bytes() as u64,
        };
        let blocks = match target.block {
            crate::format::Block::Fixed(rows, cols) => self.rows.div_ceil(rows) * self.cols.div_ceil(cols),
            _ => 0,
        };
        (target.bytes(self.rows * self.cols) + blocks * target.values_per_block() * 4) as u64
    }

    /// Bytes this matrix occupies in its stored format, scales included.
    pub fn stored_bytes(&self) -> usize {
        self.data.as_slice().len() + self.scales.as_ref().map_or(0, |s| s.values.len() * 4)
    }
}

/// A SwiGLU feed-forward block: `down · (silu(gate · x) ⊙ (up · x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate: Matrix,
    pub up: Matrix,
    pub down: Matrix,
}

impl Mlp {
    pub fn matrices(&self) -> [&Matrix; 3] {
        [&self.gate, &self.up, &self.down]
    }

    /// The three matrices in the format `quant` gives them (cheap clones when kept as stored).
    pub fn quantized(&self, quant: quant::QuantTarget) -> Mlp {
        if quant == quant::QuantTarget::Keep {
            return self.clone();
        }
        Mlp { gate: self.gate.quantized(quant), up: self.up.quantized(quant), down: self.down.quantized(quant) }
    }
}

#[derive(Debug)]
pub enum QueryProjection {
    /// `q_b_proj · RMSNorm(q_a_proj · x)` (V3, V2).
    LowRank { a: Matrix, norm: Vec<f32>, b: Matrix },
    /// `q_proj · x` (V2-Lite, Moonlight: `q_lora_rank` is null).
    Direct(Matrix),
}

#[derive(Debug)]
pub struct Attention {
    pub q: QueryProjection,
    pub kv_a: Matrix,
    pub kv_norm: Vec<f32>,
    /// `[H * (qk_nope + v), kv_lora]`: per head, `qk_nope` rows of W_UK then `v` rows of W_UV.
    pub kv_b: Matrix,
    pub o: Matrix,
    /// DeepSeek-V3.2's lightning indexer (`self_attn.indexer.*`).
    pub indexer: Option<Indexer>,
}

/// The lightning indexer of DeepSeek Sparse Attention (V3.2), as transformers'
/// `DeepseekV32Indexer`: `index_n_heads` query heads from the query LoRA, one key per position
/// from the normalised hidden state.
#[derive(Debug)]
pub struct Indexer {
    /// `[heads * head_dim, q_lora_rank]`.
    pub wq_b: Matrix,
    /// `[head_dim, hidden]`.
    pub wk: Matrix,
    /// LayerNorm of the key (weight and bias, eps 1e-6).
    pub k_norm: Vec<f32>,
    pub k_norm_bias: Vec<f32>,
    /// `[heads, hidden]`: each head's weight per token.
    pub weights_proj: Matrix,
}

#[derive(Debug)]
pub struct Moe {
    /// The router, `[n_routed_experts, hidden]`.
    pub router: Matrix,
    /// `e_score_correction_bias` (noaux_tc): shifts which experts are chosen, never their weights.
    pub correction_bias: Option<Vec<f32>>,
    pub experts: Vec<Mlp>,
    pub shared: Option<Mlp>,
}

#[derive(Debug)]
pub enum FeedForward {
    Dense(Mlp),
    Moe(Moe),
}

#[derive(Debug)]
pub struct Layer {
    pub input_norm: Vec<f32>,
    pub attention: Attention,
    pub post_attention_norm: Vec<f32>,
    pub ffn: FeedForward,
}

#[derive(Debug)]
pub struct Weights {
    pub embed: Matrix,
    pub layers: Vec<Layer>,
    pub final_norm: Vec<f32>,
    pub lm_head: Matrix,
    /// The multi-token-prediction module, where the checkpoint ships one.
    pub mtp: Option<Mtp>,
}

/// The multi-token-prediction (MTP) module: DeepSeek-V3's layer 61 (`num_nextn_predict_layers`
/// layers after the main ones; dsrun uses the first). It drafts the token after next:
///
/// ```text
/// x = eh_proj · concat(enorm(embed(t[i+1])), hnorm(h[i]))
/// logits[i+2] = head(head_norm(DecoderLayer(x)))
/// ```
///
/// Followed from vLLM's `deepseek_mtp.py` and SGLang's `deepseek_nextn.py`, which agree on the
/// tensor names and the order of the concatenation (the embedding first, then the hidden state)
/// and on `h[i]` being the main model's hidden state after its final norm (what its lm_head
/// reads). Where they differ dsrun follows SGLang: no zeroing of the embedding at position 0
/// (vLLM's), as in DeepSeek's report; a chained draft reads the MTP's output after
/// `shared_head.norm`, as the main model's hidden state is read after its final norm. The
/// layer's own `embed_tokens` and `shared_head.head` are used where present (vLLM); V3's are
/// copies of the main model's, which serve where they are absent.
#[derive(Debug)]
pub struct Mtp {
    /// Its layer index in the checkpoint (`num_hidden_layers`).
    pub index: usize,
    pub embed: Matrix,
    pub enorm: Vec<f32>,
    pub hnorm: Vec<f32>,
    /// `eh_proj`'s columns for the normalised embedding (`[:, :hidden]`) and for the
    /// normalised hidden state (`[:, hidden:]`): `eh_proj · concat(e, h) = eh_embed · e +
    /// eh_hidden · h`.
    pub eh_embed: Matrix,
    pub eh_hidden: Matrix,
    pub layer: Layer,
    pub head_norm: Vec<f32>,
    pub head: Matrix,
}

impl Weights {
    /// The MoE layers of the main model: (layer index, its MoE weights), in order.
    pub fn moe_layers(&self) -> Vec<(usize, &Moe)> {
        self.layers
            .iter()
            .enumerate()
            .filter_map(|(i, l)| match &l.ffn {
                FeedForward::Moe(m) => Some((i, m)),
                FeedForward::Dense(_) => None,
            })
            .collect()
    }

    /// The MoE layers whose routed experts a GPU plan holds: the main model's, then the MTP
    /// layer's when `mtp` (and it is a MoE layer).
    pub fn routed_layers(&self, mtp: bool) -> Vec<&Moe> {
        let main = self.moe_layers().into_iter().map(|(_, m)| m);
        let mtp = self.mtp.as_ref().filter(|_| mtp).and_then(|m| match &m.layer.ffn {
            FeedForward::Moe(moe) => Some(moe),
            FeedForward::Dense(_) => None,
        });
        main.chain(mtp).collect()
    }

    /// The element types of every matrix (the MTP layer's included), each once.
    pub fn dtypes(&self) -> Vec<DType> {
        let mut seen = Vec::new();
        let mut note = |m: &Matrix| {
            if !seen.contains(&m.dtype) {
                seen.push(m.dtype);
            }
        };
        let layer = |l: &Layer, note: &mut dyn FnMut(&Matrix)| {
            let a = &l.attention;
            match &a.q {
                QueryProjection::LowRank { a, b, .. } => [a, b].into_iter().for_each(&mut *note),
                QueryProjection::Direct(q) => note(q),
            }
            [&a.kv_a, &a.kv_b, &a.o].into_iter().for_each(&mut *note);
            if let Some(ix) = &a.indexer {
                [&ix.wq_b, &ix.wk, &ix.weights_proj].into_iter().for_each(&mut *note);
            }
            match &l.ffn {
                FeedForward::Dense(mlp) => mlp.matrices().into_iter().for_each(&mut *note),
                FeedForward::Moe(moe) => {
                    note(&moe.router);
                    moe.experts.iter().chain(&moe.shared).flat_map(Mlp::matrices).for_each(&mut *note);
                }
            }
        };
        [&self.embed, &self.lm_head].into_iter().for_each(&mut note);
        self.layers.iter().for_each(|l| layer(l, &mut note));
        if let Some(mtp) = &self.mtp {
            [&mtp.embed, &mtp.eh_embed, &mtp.eh_hidden, &mtp.head].into_iter().for_each(&mut note);
            layer(&mtp.layer, &mut note);
        }
        seen
    }

    /// Looks up and checks every tensor the model needs. Returns the weights and the names of
    /// checkpoint tensors the model does not use (e.g. the MTP layer).
    pub fn load(config: &ModelConfig, checkpoint: &Checkpoint) -> Result<(Weights, Vec<String>)> {
        let loader = Loader { checkpoint, fp8: config.fp8, used: RefCell::new(BTreeSet::new()) };
        let (d, v) = (config.hidden_size, config.vocab_size);
        let embed = loader.matrix("model.embed_tokens.weight", v, d)?;
        let layers = (0..config.num_hidden_layers).map(|i| load_layer(&loader, config, i)).collect::<Result<Vec<_>>>()?;
        let final_norm = loader.vector("model.norm.weight", d)?;
        // Tied models project with the embedding, as transformers ties them, even if a stale
        // `lm_head.weight` is also present.
        let lm_head = if config.tie_word_embeddings { embed.clone() } else { loader.matrix("lm_head.weight", v, d)? };
        let mtp = load_mtp(&loader, config, &embed, &lm_head)?;
        let used = loader.used.into_inner();
        let ignored = checkpoint.names().filter(|n| !used.contains(*n)).map(str::to_string).collect();
        Ok((Weights { embed, layers, final_norm, lm_head, mtp }, ignored))
    }
}

/// The first MTP layer, where the config announces one and the checkpoint has its `eh_proj`
/// (quantised community checkpoints often drop the layer: then there is none, and
/// `--speculative mtp` says so). Once `eh_proj` is there, every other tensor must be.
fn load_mtp(loader: &Loader, c: &ModelConfig, embed: &Matrix, lm_head: &Matrix) -> Result<Option<Mtp>> {
    let index = c.num_hidden_layers;
    let p = format!("model.layers.{index}");
    let eh_name = format!("{p}.eh_proj.weight");
    if c.num_nextn_predict_layers == 0 || loader.checkpoint.info(&eh_name).is_none() {
        return Ok(None);
    }
    let d = c.hidden_size;
    let eh = loader.matrix(&eh_name, d, 2 * d)?;
    let optional = |name: String, rows: usize| -> Result<Option<Matrix>> {
        match loader.checkpoint.info(&name) {
            Some(_) => loader.matrix(&name, rows, d).map(Some),
            None => Ok(None),
        }
    };
    Ok(Some(Mtp {
        index,
        embed: optional(format!("{p}.embed_tokens.weight"), c.vocab_size)?.unwrap_or_else(|| embed.clone()),
        enorm: loader.vector(&format!("{p}.enorm.weight"), d)?,
        hnorm: loader.vector(&format!("{p}.hnorm.weight"), d)?,
        eh_embed: eh.column_slice(&format!("{eh_name}[:, :{d}]"), 0, d),
        eh_hidden: eh.column_slice(&format!("{eh_name}[:, {d}:]"), d, d),
        layer: load_layer(loader, c, index)?,
        head_norm: loader.vector(&format!("{p}.shared_head.norm.weight"), d)?,
        head: optional(format!("{p}.shared_head.head.weight"), c.vocab_size)?.unwrap_or_else(|| lm_head.clone()),
    }))
}

fn load_layer(loader: &Loader, c: &ModelConfig, i: usize) -> Result<Layer> {
    let p = format!("model.layers.{i}");
    let d = c.hidden_size;
    let heads = c.num_attention_heads;
    let q = match c.q_lora_rank {
        Some(rank) => QueryProjection::LowRank {
            a: loader.matrix(&format!("{p}.self_attn.q_a_proj.weight"), rank, d)?,
            norm: loader.vector(&format!("{p}.self_attn.q_a_layernorm.weight"), rank)?,
            b: loader.matrix(&format!("{p}.self_attn.q_b_proj.weight"), heads * c.qk_head_dim(), rank)?,
        },
        None => QueryProjection::Direct(loader.matrix(&format!("{p}.self_attn.q_proj.weight"), heads * c.qk_head_dim(), d)?),
    };
    let attention = Attention {
        q,
        kv_a: loader.matrix(&format!("{p}.self_attn.kv_a_proj_with_mqa.weight"), c.latent_dim(), d)?,
        kv_norm: loader.vector(&format!("{p}.self_attn.kv_a_layernorm.weight"), c.kv_lora_rank)?,
        kv_b: loader.matrix(&format!("{p}.self_attn.kv_b_proj.weight"), heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)?,
        o: loader.matrix(&format!("{p}.self_attn.o_proj.weight"), d, heads * c.v_head_dim)?,
        indexer: match (&c.indexer, c.q_lora_rank) {
            (Some(ix), Some(rank)) => {
                let q = format!("{p}.self_attn.indexer");
                Some(Indexer {
                    wq_b: loader.matrix(&format!("{q}.wq_b.weight"), ix.heads * ix.head_dim, rank)?,
                    wk: loader.matrix(&format!("{q}.wk.weight"), ix.head_dim, d)?,
                    k_norm: loader.vector(&format!("{q}.k_norm.weight"), ix.head_dim)?,
                    k_norm_bias: loader.vector(&format!("{q}.k_norm.bias"), ix.head_dim)?,
                    weights_proj: loader.matrix(&format!("{q}.weights_proj.weight"), ix.heads, d)?,
                })
            }
            _ => None,
        },
    };
    let ffn = if c.is_moe_layer(i) {
        let experts = (0..c.n_routed_experts).map(|e| loader.mlp(&format!("{p}.mlp.experts.{e}"), d, c.moe_intermediate_size)).collect::<Result<Vec<_>>>()?;
        let shared = match c.n_shared_experts {
            0 => None,
            n => Some(loader.mlp(&format!("{p}.mlp.shared_experts"), d, n * c.moe_intermediate_size)?),
        };
        // Only noaux_tc routing uses the correction bias (transformers' V2 router ignores one).
        let correction_bias = match c.topk_method {
            TopkMethod::NoauxTc => Some(loader.vector(&format!("{p}.mlp.gate.e_score_correction_bias"), c.n_routed_experts)?),
            _ => None,
        };
        FeedForward::Moe(Moe { router: loader.matrix(&format!("{p}.mlp.gate.weight"), c.n_routed_experts, d)?, correction_bias, experts, shared })
    } else {
        FeedForward::Dense(loader.mlp(&format!("{p}.mlp"), d, c.intermediate_size)?)
    };
    Ok(Layer { input_norm: loader.vector(&format!("{p}.input_layernorm.weight"), d)?, attention, post_attention_norm: loader.vector(&format!("{p}.post_attention_layernorm.weight"), d)?, ffn })
}

struct Loader<'a> {
    checkpoint: &'a Checkpoint,
    fp8: Option<Fp8Blocks>,
    used: RefCell<BTreeSet<String>>,
}

impl Loader<'_> {
    fn find(&self, name: &str, shape: &[usize]) -> Result<&TensorInfo> {
        let info = self.checkpoint.info(name).ok_or_else(|| Error::MissingTensor { name: name.to_string(), hint: self.checkpoint.missing_hint(name) })?;
        if info.shape != shape {
            return Err(Error::WrongShape { name: name.into(), expected: shape.to_vec(), found: info.shape.clone() });
        }
        self.used.borrow_mut().insert(name.to_string());
        Ok(info)
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let info = self.find(name, &[rows, cols])?;
        let wrong_dtype = |expected: &str| Error::WrongDtype { name: name.into(), expected: expected.into(), found: info.dtype_name.clone() };
        let dtype = info.dtype.ok_or_else(|| wrong_dtype("F32, F16, BF16 or F8_E4M3"))?;
        let scales = if dtype == DType::F8E4M3 {
            let blocks = self.fp8.unwrap_or(Fp8Blocks { block_rows: 128, block_cols: 128 });
            let (grid_rows, grid_cols) = (rows.div_ceil(blocks.block_rows), cols.div_ceil(blocks.block_cols));
            let scale_name = format!("{name}_scale_inv");
            let values = self.float_tensor(&scale_name, &[grid_rows, grid_cols])?;
            Some(BlockScales { block_rows: blocks.block_rows, block_cols: blocks.block_cols, grid_cols, values })
        } else {
            None
        };
        Ok(Matrix { name: name.into(), rows, cols, dtype, data: self.checkpoint.bytes(info), scales })
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        self.float_tensor(name, &[len])
    }

    /// A small tensor in a float format, decoded to f32.
    fn float_tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let info = self.find(name, shape)?;
        match info.dtype {
            Some(dtype @ (DType::F32 | DType::F16 | DType::BF16)) => {
                let values = quant::decode_vec(dtype, self.checkpoint.bytes(info).as_slice());
                // Small tensors (norms, biases, scales) are checked whole at load; matrices by
                // the non-finite logits check and `dsrun check`.
                if let Some((i, bad)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                    return Err(Error::Invalid(format!("tensor `{name}` holds a non-finite value ({bad}) at index {i}: the checkpoint is corrupt")));
                }
                Ok(values)
            }
            _ => Err(Error::WrongDtype { name: name.into(), expected: "F32, F16 or BF16".into(), found: info.dtype_name.clone() }),
        }
    }

    fn mlp(&self, prefix: &str, hidden: usize, inter: usize) -> Result<Mlp> {
        Ok(Mlp {
            gate: self.matrix(&format!("{prefix}.gate_proj.weight"), inter, hidden)?,
            up: self.matrix(&format!("{prefix}.up_proj.weight"), inter, hidden)?,
            down: self.matrix(&format!("{prefix}.down_proj.weight"), hidden, inter)?,
        })
    }
}
