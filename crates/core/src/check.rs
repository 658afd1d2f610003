//! `dsrun check`: every tensor of a checkpoint scanned for non-finite values (NaN, infinities;
//! FP8's NaN codes 0x7f / 0xff), in parallel over tensors with a progress bar, naming each bad
//! tensor with its count and first index. Loading checks the small tensors (norms, biases,
//! scales) itself; matrices are too large to scan at every load, so a corrupt one shows up as
//! non-finite logits, and this command says which it is.

use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::error::Result;
use crate::quant::DType;
use crate::util::Progress;
use rayon::prelude::*;

/// A tensor holding non-finite values.
#[derive(Debug, Clone, PartialEq)]
pub struct BadTensor {
    pub name: String,
    pub count: usize,
    pub first: usize,
    /// The first bad value as text ("NaN", "inf", "-inf").
    pub value: String,
}

/// What a scan found.
#[derive(Debug, Default)]
pub struct Report {
    pub tensors: usize,
    pub bytes: u64,
    /// Tensors of a dtype without non-finite values (integers) or one dsrun does not read.
    pub skipped: usize,
    pub bad: Vec<BadTensor>,
}

/// Scans every tensor of `checkpoint`; `progress` advances by each tensor's bytes.
pub fn scan(checkpoint: &Checkpoint, progress: &dyn Progress) -> Report {
    let tensors: Vec<(&str, &TensorInfo)> = checkpoint.tensors().collect();
    let results: Vec<Option<Option<BadTensor>>> = tensors
        .par_iter()
        .map(|(name, info)| {
            let bytes = checkpoint.bytes(info);
            let found = scan_tensor(name, info.dtype, bytes.as_slice());
            progress.advance(info.num_bytes() as u64);
            found
        })
        .collect();
    Report::of(results, tensors.iter().map(|(_, i)| i.num_bytes() as u64).sum())
}

impl Report {
    /// The report of each tensor's scan (None: skipped; Some(bad): scanned) over `bytes`.
    fn of(results: Vec<Option<Option<BadTensor>>>, bytes: u64) -> Report {
        let mut report = Report { tensors: results.len(), bytes, ..Default::default() };
        for r in results {
            match r {
                None => report.skipped += 1,
                Some(Some(bad)) => report.bad.push(bad),
                Some(None) => {}
            }
        }
        report.bad.sort_by(|a, b| a.name.cmp(&b.name));
        report
    }
}

/// None: a dtype that cannot hold non-finite values; Some(None): all finite.
fn scan_tensor(name: &str, dtype: Option<DType>, bytes: &[u8]) -> Option<Option<BadTensor>> {
    let (size, value): (usize, fn(&[u8]) -> f32) = match dtype? {
        DType::F32 => (4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        DType::F16 => (2, |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        DType::BF16 => (2, |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        DType::F8E4M3 => (1, |b| crate::quant::fp8_e4m3_to_f32(b[0])),
        _ => return None,
    };
    let mut bad = None::<BadTensor>;
    for (i, chunk) in bytes.chunks_exact(size).enumerate() {
        let v = value(chunk);
        if !v.is_finite() {
            match &mut bad {
                Some(b) => b.count += 1,
                None => bad = Some(BadTensor { name: name.to_string(), count: 1, first: i, value: format!("{v}") }),
            }
        }
    }
    Some(bad)
}

/// The report as lines for the terminal.
pub fn describe(report: &Report) -> String {
    let mut s = format!(
        "checked {} tensors ({}){}: ",
        report.tensors,
        crate::util::human_bytes(report.bytes),
        if report.skipped > 0 { format!(", {} of integer dtypes or formats without scales to check skipped", report.skipped) } else { String::new() }
    );
    if report.bad.is_empty() {
        s += "every value is finite\n";
        return s;
    }
    s += &format!("{} hold non-finite values\n", report.bad.len());
    for b in &report.bad {
        s += &format!("  {}: {} non-finite value(s), the first {} at element {}\n", b.name, b.count, b.value, b.first);
    }
    s
}

/// Opens `dir` (a checkpoint directory, or a GGUF file) and scans it (the command's work; the
/// caller prints and sets the exit status).
pub fn run(dir: &std::path::Path, progress: &dyn Progress) -> Result<Report> {
    if crate::gguf::is_gguf(dir) {
        return run_gguf(dir, progress);
    }
    let checkpoint = Checkpoint::open(dir)?;
    progress.start("checking", checkpoint.tensors().map(|(_, i)| i.num_bytes() as u64).sum(), true);
    let report = scan(&checkpoint, progress);
    progress.finish();
    Ok(report)
}

/// A GGUF file: its tables are checked as it opens; float tensors are scanned value by value,
/// block-quantised ones by the f16/f32 scales each block carries (a non-finite scale makes its
/// whole block so); formats whose blocks hold no plain scale (the i-quants) are skipped.
fn run_gguf(path: &std::path::Path, progress: &dyn Progress) -> Result<Report> {
    let (gguf, map) = crate::gguf::Gguf::open(path)?;
    progress.start("checking", gguf.tensors.iter().map(|t| t.bytes).sum(), true);
    let results: Vec<Option<Option<BadTensor>>> = gguf
        .tensors
        .par_iter()
        .map(|t| {
            let bytes = &map[t.start as usize..(t.start + t.bytes) as usize];
            let found = scan_gguf_tensor(&t.name, t.ty, bytes);
            progress.advance(t.bytes);
            found
        })
        .collect();
    progress.finish();
    Ok(Report::of(results, gguf.tensors.iter().map(|t| t.bytes).sum()))
}

/// One GGUF tensor: its values (float formats) or its blocks' scales, as `scan_tensor`; the
/// element index of a bad scale is its block's first.
fn scan_gguf_tensor(name: &str, ty: crate::gguf::GgmlType, bytes: &[u8]) -> Option<Option<BadTensor>> {
    let dtype = match ty.name {
        "F32" => Some(DType::F32),
        "F16" => Some(DType::F16),
        "BF16" => Some(DType::BF16),
        _ => None,
    };
    if let Some(dtype) = dtype {
        return scan_tensor(name, Some(dtype), bytes);
    }
    // Byte offsets of each block's f16 scales (or one f32 scale, Q8_K) in llama.cpp's layouts.
    let (f16_scales, f32_scale): (&[usize], bool) = match ty.name {
        "Q4_0" | "Q5_0" | "Q8_0" | "IQ4_NL" | "IQ4_XS" => (&[0], false),
        "Q4_1" | "Q5_1" | "Q8_1" | "Q4_K" | "Q5_K" => (&[0, 2], false),
        "Q2_K" => (&[80, 82], false),
        "Q3_K" => (&[108], false),
        "Q6_K" => (&[208], false),
        "Q8_K" => (&[], true),
        _ => return None,
    };
    let mut bad = None::<BadTensor>;
    for (block, b) in bytes.chunks_exact(ty.block_bytes as usize).enumerate() {
        let halves = f16_scales.iter().map(|&at| half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32());
        let single = f32_scale.then(|| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        for v in halves.chain(single).filter(|v| !v.is_finite()) {
            match &mut bad {
                Some(x) => x.count += ty.block as usize,
                None => bad = Some(BadTensor { name: name.to_string(), count: ty.block as usize, first: block * ty.block as usize, value: format!("{v} (a block scale)") }),
            }
        }
    }
    Some(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Q8_0 block whose f16 scale is NaN makes its 32 values so; a Q4_K block's `dmin` too.
    #[test]
    fn gguf_block_scales_are_scanned() {
        let q8 = crate::gguf::GgmlType::from_id(8).unwrap();
        let mut blocks = vec![0u8; 3 * 34];
        assert_eq!(scan_gguf_tensor("w", q8, &blocks), Some(None));
        blocks[34..36].copy_from_slice(&half::f16::NAN.to_le_bytes());
        let bad = scan_gguf_tensor("w", q8, &blocks).unwrap().unwrap();
        assert_eq!((bad.count, bad.first), (32, 32));
        let q4k = crate::gguf::GgmlType::from_id(12).unwrap();
        let mut blocks = vec![0u8; 144];
        blocks[2..4].copy_from_slice(&half::f16::INFINITY.to_le_bytes());
        assert_eq!(scan_gguf_tensor("w", q4k, &blocks).unwrap().unwrap().first, 0);
        assert_eq!(scan_gguf_tensor("w", crate::gguf::GgmlType::from_id(16).unwrap(), &[0; 66]), None, "IQ2_XXS holds no plain scale to check");
    }
}
