//! Weights and activations in GPU buffers.

use super::context::GpuContext;
use crate::error::Result;
use crate::model::weights::Matrix;
use crate::plan::layout::{codebook, PackedStack, SlotLayout};
use crate::quant::DType;
use crate::util::human_bytes;
use wgpu::util::DeviceExt;

/// One matrix, or a stack of same-shaped expert matrices, in its checkpoint format; a single
/// matrix larger than one binding is held as row chunks (`chunks`, in row order).
pub struct GpuMatrix {
    /// The element format (a row of the format table).
    pub format: DType,
    pub rows: usize,
    pub cols: usize,
    pub chunks: Vec<GpuChunk>,
    pub bytes: u64,
    /// Rows start on word boundaries and scale blocks hold whole words (what the word-wise
    /// kernel paths need).
    pub whole_words: bool,
}

/// Rows `row0 .. row0 + rows` of a matrix in their own buffers.
pub struct GpuChunk {
    pub row0: usize,
    pub rows: usize,
    pub layout: wgpu::Buffer,
    pub weights: wgpu::Buffer,
    pub scales: wgpu::Buffer,
}

impl GpuMatrix {
    /// Uploads `stack` (one matrix, or every expert of a layer) as one buffer: experts follow each
    /// other so a kernel finds expert e at element `e * rows * cols`.
    pub fn upload(ctx: &GpuContext, stack: &[&Matrix]) -> Result<GpuMatrix> {
        let first = stack[0];
        PackedStack::check(stack)?;
        let bytes: usize = stack.iter().map(|m| m.data.as_slice().len()).sum();
        if bytes as u64 > ctx.max_binding() {
            return Err(ctx.limit(format!(
                "`{}`{} is {}, more than this adapter binds at once ({}); streaming experts through a \
                 smaller cache is not implemented yet",
                first.name,
                if stack.len() > 1 { format!(" and its {} sibling experts", stack.len() - 1) } else { String::new() },
                human_bytes(bytes as u64),
                human_bytes(ctx.max_binding())
            )));
        }
        let chunk = upload_chunk(ctx, stack, 0, first.rows)?;
        let bytes = chunk_bytes(stack);
        Ok(GpuMatrix { format: first.dtype, rows: first.rows, cols: first.cols, chunks: vec![chunk], bytes, whole_words: whole_words(first) })
    }

    /// Uploads one matrix, split into row chunks of at most `ctx.chunk_limit()` bytes when it is
    /// larger (for kernels that take chunks: matmul and embedding).
    pub fn upload_chunked(ctx: &GpuContext, m: &Matrix) -> Result<GpuMatrix> {
        let row_bytes = m.data.as_slice().len() as f64 / m.rows as f64;
        let limit = ctx.chunk_limit();
        // Chunks start on whole FP8 scale blocks, and on whole bytes for q4's nibbles.
        let align = match (&m.scales, m.dtype) {
            (Some(s), _) => s.block_rows,
            (None, DType::Q4) => 2,
            _ => 1,
        };
        let rows_per_chunk = (((limit as f64 / row_bytes) as usize) / align * align).max(align);
        let mut chunks = Vec::new();
        for row0 in (0..m.rows).step_by(rows_per_chunk) {
            let rows = rows_per_chunk.min(m.rows - row0);
            let part = m.row_slice(row0, rows);
            chunks.push(upload_chunk(ctx, &[&part], row0, m.rows)?);
        }
        Ok(GpuMatrix { format: m.dtype, rows: m.rows, cols: m.cols, chunks, bytes: chunk_bytes(&[m]), whole_words: whole_words(m) })
    }

    /// The whole matrix as one chunk, for kernels that do not take chunks.
    pub fn single(&self) -> &GpuChunk {
        assert_eq!(self.chunks.len(), 1, "uploaded with `upload`, which never splits");
        &self.chunks[0]
    }
}

/// Elements per u32 word of `dtype` as the kernels read them (weights.wgsl's ELEMS).
fn elems_per_word(dtype: DType) -> usize {
    match dtype {
        DType::F32 => 1,
        DType::BF16 | DType::F16 => 2,
        _ => 4,
    }
}

fn whole_words(m: &Matrix) -> bool {
    let per_word = elems_per_word(m.dtype);
    m.cols.is_multiple_of(per_word) && m.scales.as_ref().is_none_or(|s| s.block_cols % per_word == 0)
}

/// Room on the GPU for `slots` experts' copies of one matrix (an expert cache), each slot
/// padded to whole words so one expert is one aligned copy.
pub struct SlotMatrix {
    pub matrix: GpuMatrix,
    /// Bytes between slots in the weight and scale buffers.
    pub data_stride: u64,
    pub scale_stride: u64,
}

impl SlotMatrix {
    /// Bytes one slot takes (weights and scales).
    pub fn slot_bytes(template: &Matrix) -> u64 {
        SlotLayout::new(template).slot_bytes()
    }

    /// Empty slots for matrices shaped and typed like `template` (one expert's, in the format
    /// the GPU keeps).
    pub fn new(ctx: &GpuContext, template: &Matrix, slots: usize) -> Result<SlotMatrix> {
        let SlotLayout { layout, data_stride, scale_values } = SlotLayout::new(template);
        let bytes = data_stride * slots as u64;
        if bytes > ctx.max_binding() {
            return Err(ctx.limit(format!("`{}`: {slots} expert slots take {}, more than this adapter binds at once ({})", template.name, human_bytes(bytes), human_bytes(ctx.max_binding()))));
        }
        let empty = |label: &str, bytes: u64| {
            ctx.device.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size: bytes.max(4), usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST, mapped_at_creation: false })
        };
        let chunk = GpuChunk {
            row0: 0,
            rows: template.rows,
            layout: uniform(ctx, &template.name, bytemuck::bytes_of(&layout)),
            weights: empty("expert slots", bytes),
            // Per-slot scales; formats without any bind what they read there instead, once (the
            // i-quants' codebook).
            scales: match scale_values {
                0 => storage_init(ctx, "expert slot codebook", bytemuck::cast_slice(&codebook(template.dtype))),
                n => empty("expert slot scales", (n * slots * 4) as u64),
            },
        };
        let matrix =
            GpuMatrix { format: template.dtype, rows: template.rows, cols: template.cols, chunks: vec![chunk], bytes: bytes + (scale_values * slots * 4) as u64, whole_words: whole_words(template) };
        Ok(SlotMatrix { matrix, data_stride, scale_stride: scale_values as u64 * 4 })
    }

    /// Queues the copy of `m` (shaped like the template) into `slot`; returns the bytes copied.
    pub fn write(&self, queue: &wgpu::Queue, slot: usize, m: &Matrix) -> u64 {
        let chunk = self.matrix.single();
        let data = m.data.as_slice();
        let padded = SlotLayout::new(m).padded(m);
        queue.write_buffer(&chunk.weights, slot as u64 * self.data_stride, &padded);
        let mut bytes = data.len() as u64;
        if let Some(s) = &m.scales {
            queue.write_buffer(&chunk.scales, slot as u64 * self.scale_stride, bytemuck::cast_slice(&s.values));
            bytes += self.scale_stride;
        }
        bytes
    }
}

fn chunk_bytes(stack: &[&Matrix]) -> u64 {
    stack.iter().map(|m| m.stored_bytes() as u64).sum()
}

fn upload_chunk(ctx: &GpuContext, stack: &[&Matrix], row0: usize, total_rows: usize) -> Result<GpuChunk> {
    let name = &stack[0].name;
    let packed = PackedStack::new(stack, row0, total_rows);
    Ok(GpuChunk {
        row0,
        rows: stack[0].rows,
        layout: uniform(ctx, name, bytemuck::bytes_of(&packed.layout)),
        weights: storage_init(ctx, name, &packed.data),
        scales: storage_init(ctx, name, bytemuck::cast_slice(&packed.scales)),
    })
}

pub fn uniform(ctx: &GpuContext, label: &str, contents: &[u8]) -> wgpu::Buffer {
    ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some(label), contents, usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST })
}

pub fn storage_init(ctx: &GpuContext, label: &str, contents: &[u8]) -> wgpu::Buffer {
    ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some(label), contents, usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC })
}

/// A zeroed f32/u32 storage buffer of `elements` values (at least one).
pub fn storage(ctx: &GpuContext, label: &str, elements: usize) -> Result<wgpu::Buffer> {
    let size = (elements.max(1) * 4) as u64;
    if size > ctx.max_binding() {
        return Err(ctx.limit(format!("the `{label}` buffer needs {}, more than this adapter binds at once ({}): lower --ctx", human_bytes(size), human_bytes(ctx.max_binding()))));
    }
    Ok(ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    }))
}
