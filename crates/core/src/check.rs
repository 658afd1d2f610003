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
    let mut report = Report { tensors: tensors.len(), bytes: tensors.iter().map(|(_, i)| i.num_bytes() as u64).sum(), ..Default::default() };
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
        if report.skipped > 0 { format!(", {} of integer dtypes skipped", report.skipped) } else { String::new() }
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

/// Opens `dir` and scans it (the command's work; the caller prints and sets the exit status).
pub fn run(dir: &std::path::Path, progress: &dyn Progress) -> Result<Report> {
    let checkpoint = Checkpoint::open(dir)?;
    progress.start("checking", checkpoint.tensors().map(|(_, i)| i.num_bytes() as u64).sum(), true);
    let report = scan(&checkpoint, progress);
    progress.finish();
    Ok(report)
}
