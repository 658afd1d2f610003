//! The one table of weight formats: how each element type is stored on a device, read by
//! the Rust side (packing, byte counts, slot strides), by the WGSL kernels (as `const`
//! declarations prepended to shaders/weights.wgsl) and by the CUDA kernels (as `-D` defines
//! for kernels/common.cuh). A new format is one row here plus its decode in each kernel family.

use crate::quant::{DType, GROUP};

/// How a format's scales are laid out: a grid of blocks over the matrix, `per_block` f32 values
/// per block (row-major over blocks, experts `scale_expert_stride` values apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scales {
    /// No scales: elements are their values.
    None,
    /// One f32 multiplier per block (FP8's `weight_scale_inv`, q8's group scale).
    Scale,
    /// An interleaved f32 (scale, min) pair per block: `w = q * scale + min` (q4).
    ScaleMin,
}

/// Where a format's block shape comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    /// Unscaled formats: no blocks.
    None,
    /// The checkpoint's `weight_block_size` (DeepSeek publishes 128x128).
    Checkpoint { default: (usize, usize) },
    /// A fixed rows x cols block dsrun quantises to.
    Fixed(usize, usize),
}

#[derive(Debug)]
pub struct Format {
    pub dtype: DType,
    /// The kernels' FORMAT value.
    pub code: u32,
    /// Its name in the kernels: a WGSL `const` and a CUDA define.
    pub constant: &'static str,
    /// How values are stored: `values` of them in `bytes` bytes (q4 packs two a byte, element i
    /// in the low nibble when even; ggml's Q8_0 a block of 32 codes after its f16 scale).
    pub values: u32,
    pub bytes: u32,
    pub block: Block,
    pub scales: Scales,
}

pub const FORMATS: [Format; 25] = [
    Format { dtype: DType::F32, code: 0, constant: "FORMAT_F32", values: 1, bytes: 4, block: Block::None, scales: Scales::None },
    Format { dtype: DType::BF16, code: 1, constant: "FORMAT_BF16", values: 1, bytes: 2, block: Block::None, scales: Scales::None },
    Format { dtype: DType::F16, code: 2, constant: "FORMAT_F16", values: 1, bytes: 2, block: Block::None, scales: Scales::None },
    Format { dtype: DType::F8E4M3, code: 3, constant: "FORMAT_FP8", values: 1, bytes: 1, block: Block::Checkpoint { default: (128, 128) }, scales: Scales::Scale },
    Format { dtype: DType::Q8, code: 4, constant: "FORMAT_Q8", values: 1, bytes: 1, block: Block::Fixed(1, GROUP), scales: Scales::Scale },
    Format { dtype: DType::Q4, code: 5, constant: "FORMAT_Q4", values: 2, bytes: 1, block: Block::Fixed(1, GROUP), scales: Scales::ScaleMin },
    // GGUF files' blocks, scales inside the stored bytes (shaders/ggml_blocks.wgsl decodes them).
    Format { dtype: DType::Q8_0, code: 6, constant: "FORMAT_Q8_0", values: 32, bytes: 34, block: Block::None, scales: Scales::None },
    Format { dtype: DType::Q4_0, code: 7, constant: "FORMAT_Q4_0", values: 32, bytes: 18, block: Block::None, scales: Scales::None },
    Format { dtype: DType::Q4_1, code: 8, constant: "FORMAT_Q4_1", values: 32, bytes: 20, block: Block::None, scales: Scales::None },
    Format { dtype: DType::Q5_0, code: 9, constant: "FORMAT_Q5_0", values: 32, bytes: 22, block: Block::None, scales: Scales::None },
    Format { dtype: DType::Q5_1, code: 10, constant: "FORMAT_Q5_1", values: 32, bytes: 24, block: Block::None, scales: Scales::None },
    Format { dtype: DType::Q2_K, code: 11, constant: "FORMAT_Q2_K", values: 256, bytes: 84, block: Block::None, scales: Scales::None },
    Format { dtype: DType::Q3_K, code: 12, constant: "FORMAT_Q3_K", values: 256, bytes: 110, block: Block::None, scales: Scales::None },
    Format { dtype: DType::Q4_K, code: 13, constant: "FORMAT_Q4_K", values: 256, bytes: 144, block: Block::None, scales: Scales::None },
    Format { dtype: DType::Q5_K, code: 14, constant: "FORMAT_Q5_K", values: 256, bytes: 176, block: Block::None, scales: Scales::None },
    Format { dtype: DType::Q6_K, code: 15, constant: "FORMAT_Q6_K", values: 256, bytes: 210, block: Block::None, scales: Scales::None },
    Format { dtype: DType::IQ4_NL, code: 16, constant: "FORMAT_IQ4_NL", values: 32, bytes: 18, block: Block::None, scales: Scales::None },
    Format { dtype: DType::IQ4_XS, code: 17, constant: "FORMAT_IQ4_XS", values: 256, bytes: 136, block: Block::None, scales: Scales::None },
    // The i-quants: blocks index a codebook grid (`quant::iq`), which the GPU kernels read
    // where other formats' scales go.
    Format { dtype: DType::IQ2_XXS, code: 18, constant: "FORMAT_IQ2_XXS", values: 256, bytes: 66, block: Block::None, scales: Scales::None },
    Format { dtype: DType::IQ2_XS, code: 19, constant: "FORMAT_IQ2_XS", values: 256, bytes: 74, block: Block::None, scales: Scales::None },
    Format { dtype: DType::IQ2_S, code: 20, constant: "FORMAT_IQ2_S", values: 256, bytes: 82, block: Block::None, scales: Scales::None },
    Format { dtype: DType::IQ3_XXS, code: 21, constant: "FORMAT_IQ3_XXS", values: 256, bytes: 98, block: Block::None, scales: Scales::None },
    Format { dtype: DType::IQ3_S, code: 22, constant: "FORMAT_IQ3_S", values: 256, bytes: 110, block: Block::None, scales: Scales::None },
    Format { dtype: DType::IQ1_S, code: 23, constant: "FORMAT_IQ1_S", values: 256, bytes: 50, block: Block::None, scales: Scales::None },
    Format { dtype: DType::IQ1_M, code: 24, constant: "FORMAT_IQ1_M", values: 256, bytes: 56, block: Block::None, scales: Scales::None },
];

impl DType {
    /// This element type's row of the format table (an index: the mat-vecs ask per row).
    pub fn format(self) -> &'static Format {
        &FORMATS[self as usize]
    }

    /// The dtype of a ggml type name (`Q4_K`), where dsrun reads it: the float ones and the
    /// block formats (dsrun's own q8/q4 and FP8 are no ggml types).
    pub fn from_ggml(name: &str) -> Option<DType> {
        let ggml = |d: &DType| matches!(d, DType::F32 | DType::F16 | DType::BF16) || d.format().is_block();
        FORMATS.iter().map(|f| f.dtype).filter(ggml).find(|d| d.name() == name)
    }
}

impl Format {
    /// f32 values per scale block (0 for unscaled formats).
    pub fn values_per_block(&self) -> usize {
        match self.scales {
            Scales::None => 0,
            Scales::Scale => 1,
            Scales::ScaleMin => 2,
        }
    }

    /// Bytes `elements` elements take as stored (block formats: whole blocks).
    pub fn bytes(&self, elements: usize) -> usize {
        elements.div_ceil(self.values as usize) * self.bytes as usize
    }

    /// Elements in `bytes` stored bytes (whole blocks).
    pub fn elements(&self, bytes: usize) -> usize {
        bytes / self.bytes as usize * self.values as usize
    }

    /// Whether values are stored in blocks of several with their scale inside (GGUF formats),
    /// so a row must hold whole blocks and cannot be cut inside one.
    pub fn is_block(&self) -> bool {
        self.values > 2
    }
}

/// The table as WGSL `const` declarations (prepended before shaders/weights.wgsl): each
/// format's code, each block format's bytes per block (`FORMAT_Q4_K_BYTES`), and the first block
/// format's code (block formats come last in the table).
pub fn wgsl_constants() -> String {
    let mut out: String = FORMATS.iter().map(|f| format!("const {}: u32 = {}u;\n", f.constant, f.code)).collect();
    for f in FORMATS.iter().filter(|f| f.is_block()) {
        out.push_str(&format!("const {}_BYTES: u32 = {}u;\n", f.constant, f.bytes));
    }
    out.push_str(&format!("const FIRST_BLOCK_FORMAT: u32 = {}u;\n", first_block_format()));
    out
}

/// The code of the first block format: every later row of the table is one too.
fn first_block_format() -> u32 {
    FORMATS.iter().find(|f| f.is_block()).map_or(FORMATS.len() as u32, |f| f.code)
}

/// The table as `-D` defines for the CUDA kernels (common.cuh refuses to compile without them):
/// what [`wgsl_constants`] declares.
#[cfg(feature = "cuda")]
pub fn cuda_defines() -> Vec<(String, u32)> {
    let mut out: Vec<(String, u32)> = FORMATS.iter().map(|f| (f.constant.to_string(), f.code)).collect();
    out.extend(FORMATS.iter().filter(|f| f.is_block()).map(|f| (format!("{}_BYTES", f.constant), f.bytes)));
    out.push(("FIRST_BLOCK_FORMAT".into(), first_block_format()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_every_dtype_has_a_row() {
        for (i, f) in FORMATS.iter().enumerate() {
            assert_eq!(f.code as usize, i, "{:?}: codes are table indices", f.dtype);
            assert_eq!(f.dtype.format().code, f.code);
            assert_eq!(f.dtype as usize, i, "{:?}: the variant is its row", f.dtype);
            assert_eq!(f.scales == Scales::None, f.block == Block::None, "{:?}: scaled formats have blocks", f.dtype);
        }
        for f in &FORMATS {
            assert_eq!(f.is_block(), f.code >= first_block_format(), "{:?}: block formats come last (the kernels test FORMAT >= FIRST_BLOCK_FORMAT)", f.dtype);
        }
        assert_eq!(DType::Q4.format().bytes(5), 3);
        assert!(wgsl_constants().contains("const FORMAT_FP8: u32 = 3u;"));
    }
}
