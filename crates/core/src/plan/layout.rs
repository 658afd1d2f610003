//! What every GPU backend agrees on: how a weight matrix (or a stack of experts) is packed for
//! the kernels, and the shapes the model is lowered with.

use crate::error::{Error, Result};
use crate::model::weights::Matrix;
use crate::quant::DType;

/// A packed matrix's shape, as the kernels read it (`WeightLayout` in shaders/weights.wgsl and
/// the CUDA kernels' common.cuh).
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct WeightLayout {
    pub rows: u32,
    pub cols: u32,
    pub expert_stride: u32,
    pub scale_expert_stride: u32,
    pub grid_cols: u32,
    pub block_rows: u32,
    pub block_cols: u32,
    /// A row chunk of a split matrix: its first row and the whole matrix's rows.
    pub row0: u32,
    pub total_rows: u32,
    pub pad: [u32; 3],
}

/// One matrix, or same-shaped experts back to back (expert e at element `e * rows * cols`), as
/// the kernels take it: stored bytes padded to whole words, and the scales of each in turn.
pub struct PackedStack {
    pub layout: WeightLayout,
    pub data: Vec<u8>,
    pub scales: Vec<f32>,
}

impl PackedStack {
    /// Experts of a layer must share shape and dtype to stack (and q4's nibbles whole bytes).
    pub fn check(stack: &[&Matrix]) -> Result<()> {
        let first = stack[0];
        if let Some(odd) = stack.iter().find(|m| m.dtype != first.dtype || m.rows != first.rows || m.cols != first.cols) {
            return Err(Error::Invalid(format!(
                "`{}` ({:?}, {}x{}) differs from `{}` ({:?}, {}x{}): experts of a layer must share shape and dtype",
                odd.name, odd.dtype, odd.rows, odd.cols, first.name, first.dtype, first.rows, first.cols
            )));
        }
        if first.dtype == DType::Q4 && stack.len() > 1 && (first.rows * first.cols) % 2 == 1 {
            return Err(Error::Invalid(format!("`{}`: q4 experts need an even element count to stack", first.name)));
        }
        Ok(())
    }

    /// `stack` as rows `row0 ..` of a matrix of `total_rows` rows (0 and its own rows if whole).
    pub fn new(stack: &[&Matrix], row0: usize, total_rows: usize) -> PackedStack {
        let first = stack[0];
        let mut data: Vec<u8> = Vec::with_capacity(stack.iter().map(|m| m.data.as_slice().len()).sum::<usize>() + 4);
        let mut scales: Vec<f32> = Vec::new();
        for m in stack {
            data.extend_from_slice(m.data.as_slice());
            if let Some(s) = &m.scales {
                scales.extend_from_slice(&s.values);
            }
        }
        data.resize(data.len().next_multiple_of(4).max(4), 0);
        let (grid_cols, block_rows, block_cols, scale_stride) = match &first.scales {
            Some(s) => (s.grid_cols, s.block_rows, s.block_cols, s.values.len()),
            None => (1, 1, unscaled_block_cols(first.dtype), 0),
        };
        if scales.is_empty() {
            // The i-quants' codebook goes where scales would (the kernels' `grid_word`).
            scales = codebook(first.dtype);
        }
        let layout = WeightLayout {
            rows: first.rows as u32,
            cols: first.cols as u32,
            expert_stride: (first.rows * first.cols) as u32,
            scale_expert_stride: scale_stride as u32,
            grid_cols: grid_cols as u32,
            block_rows: block_rows as u32,
            block_cols: block_cols as u32,
            row0: row0 as u32,
            total_rows: total_rows as u32,
            pad: [0; 3],
        };
        PackedStack { layout, data, scales }
    }
}

/// What a matrix of `dtype` without scales binds as its scales: the i-quants' codebook grid (as
/// f32 bit patterns; the kernels read the words), else one placeholder value.
pub fn codebook(dtype: DType) -> Vec<f32> {
    match crate::quant::iq::grid_words(dtype) {
        Some(words) => words.iter().map(|&w| f32::from_bits(w)).collect(),
        None => vec![0.0],
    }
}

/// How an expert cache lays out equal slots for matrices shaped like `template` (one expert's,
/// in the format the GPU keeps): each slot padded to whole words so one expert is one aligned
/// copy, and the layout that lets kernels index slot s as expert s.
pub struct SlotLayout {
    pub layout: WeightLayout,
    /// Bytes between slots in the weight buffer.
    pub data_stride: u64,
    /// Scale values per slot.
    pub scale_values: usize,
}

impl SlotLayout {
    pub fn new(template: &Matrix) -> SlotLayout {
        let format = template.dtype.format();
        // Whole words, and for GGUF's block formats whole blocks too, so slot s starts at element
        // s * expert_stride exactly.
        let unit = match format.is_block() {
            true => lcm(4, format.bytes as u64),
            false => 4,
        };
        let data_stride = (template.data.as_slice().len() as u64).next_multiple_of(unit);
        let scale_values = template.scales.as_ref().map_or(0, |s| s.values.len());
        let expert_stride = format.elements(data_stride as usize);
        let (grid_cols, block_rows, block_cols) = match &template.scales {
            Some(s) => (s.grid_cols, s.block_rows, s.block_cols),
            None => (1, 1, unscaled_block_cols(template.dtype)),
        };
        let layout = WeightLayout {
            rows: template.rows as u32,
            cols: template.cols as u32,
            expert_stride: expert_stride as u32,
            scale_expert_stride: scale_values as u32,
            grid_cols: grid_cols as u32,
            block_rows: block_rows as u32,
            block_cols: block_cols as u32,
            row0: 0,
            total_rows: template.rows as u32,
            pad: [0; 3],
        };
        SlotLayout { layout, data_stride, scale_values }
    }

    /// Bytes one slot takes (weights and scales).
    pub fn slot_bytes(&self) -> u64 {
        self.data_stride + self.scale_values as u64 * 4
    }

    /// `m`'s stored bytes padded to the slot stride.
    pub fn padded<'a>(&self, m: &'a Matrix) -> std::borrow::Cow<'a, [u8]> {
        let data = m.data.as_slice();
        if data.len() as u64 == self.data_stride {
            return data.into();
        }
        let mut padded = data.to_vec();
        padded.resize(self.data_stride as usize, 0);
        padded.into()
    }
}

/// The layout's block width for a format without separate scales: a GGUF block format's values
/// per block (its scales live inside; the kernels' word-wise paths check blocks of whole words),
/// else 1.
fn unscaled_block_cols(dtype: DType) -> usize {
    match dtype.format().is_block() {
        true => dtype.format().values as usize,
        false => 1,
    }
}

fn lcm(a: u64, b: u64) -> u64 {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    a / x * b
}

/// How a matmul picks its input rows and its weights.
#[derive(Clone, Copy)]
pub struct MatmulShape {
    /// Output slots per token (top-k for routed experts, else 1).
    pub slots_per_token: u32,
    /// Slot s reads input row s / x_div.
    pub x_div: u32,
    /// Slot s multiplies by the stacked expert `ids[s]`.
    pub use_ids: bool,
    /// Compute exactly this many slots whatever the step's size (the last position's logits).
    pub fixed_slots: Option<u32>,
    /// ids lists (slot, expert) pairs, one per workgroup z (expert-cache pools).
    pub slot_list: bool,
    /// y += W x instead of y = W x (residual connections).
    pub accumulate: bool,
}

impl MatmulShape {
    pub const PLAIN: MatmulShape = MatmulShape { slots_per_token: 1, x_div: 1, use_ids: false, fixed_slots: None, slot_list: false, accumulate: false };
}

/// transformers hard-codes this epsilon for `q_a_layernorm` and `kv_a_layernorm`.
pub const LATENT_NORM_EPS: f64 = 1e-6;

pub use crate::quant::CacheFormat;

/// The dimensions MLA kernels need (docs/forward-pass.md's names).
#[derive(Debug, Clone, Copy)]
pub struct MlaShape {
    pub heads: usize,
    pub nope: usize,
    pub rope: usize,
    pub v: usize,
    pub lora: usize,
    /// Cache capacity in tokens (the attention scratch row length).
    pub ctx: usize,
    pub scale: f32,
    pub rope_scale: f32,
    /// How the latent cache stores its values.
    pub cache: CacheFormat,
}

impl MlaShape {
    /// The shape the attention's splits are sized for: V3.2's sparse attention (`topk`
    /// positions per token at most) covers no more than `topk` rows, whatever the context.
    pub fn attended(&self, topk: Option<usize>) -> MlaShape {
        MlaShape { ctx: topk.map_or(self.ctx, |k| self.ctx.min(k)), ..*self }
    }

    pub fn new(c: &crate::config::ModelConfig, ctx: usize, rope: &crate::model::rope::Rope) -> MlaShape {
        MlaShape {
            heads: c.num_attention_heads,
            nope: c.qk_nope_head_dim,
            rope: c.qk_rope_head_dim,
            v: c.v_head_dim,
            lora: c.kv_lora_rank,
            ctx,
            scale: c.softmax_scale() as f32,
            rope_scale: rope.scale,
            cache: CacheFormat::F32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An expert cache's slot s must start at element `s * expert_stride` as the kernels count
    /// it: for GGUF's block formats whole blocks and whole words (a Q8_0 expert of one block,
    /// 34 bytes, takes a 68-byte slot), for the rest whole words.
    #[test]
    fn slots_hold_whole_blocks_and_words() {
        for f in crate::format::FORMATS.iter().filter(|f| f.scales == crate::format::Scales::None) {
            let values = f.values as usize;
            let template = Matrix { name: "t".into(), rows: 1, cols: values, dtype: f.dtype, data: crate::checkpoint::TensorBytes::from_vec(vec![0; f.bytes as usize]), scales: None };
            let slot = SlotLayout::new(&template);
            assert!(slot.data_stride.is_multiple_of(4) && slot.data_stride.is_multiple_of(f.bytes as u64), "{:?}: stride {}", f.dtype, slot.data_stride);
            assert_eq!(f.bytes(slot.layout.expert_stride as usize) as u64, slot.data_stride, "{:?}", f.dtype);
            assert_eq!(slot.layout.block_cols as usize, if f.is_block() { values } else { 1 }, "{:?}", f.dtype);
        }
    }
}
