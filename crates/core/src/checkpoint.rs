//! Hugging Face safetensors checkpoints: one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, memory-mapped and indexed by tensor name.
//!
//! Every header is validated when the checkpoint is opened (header length, offsets inside the
//! file, no gaps or overlaps, byte counts that match dtype x shape), so later reads cannot go
//! out of bounds. Shape checks against the model config live with the weights (`model::weights`).
//!
//! A GGUF file is presented as a checkpoint too (`gguf::deepseek2`): its tensors under the names
//! a safetensors checkpoint gives them, each a range of the mapped file (or of a tensor made at
//! load where the layouts differ).

use crate::error::{Error, Result};
use crate::quant::DType;
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";

/// Where one tensor lives and what it claims to be.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// The dtype as written in the header (e.g. "BF16", "I64").
    pub dtype_name: String,
    /// `None` when the dtype is one dsrun does not read.
    pub dtype: Option<DType>,
    pub shape: Vec<usize>,
    shard: usize,
    range: Range<usize>,
}

impl TensorInfo {
    /// A tensor of `shard` (an index into the shards given to [`Checkpoint::from_parts`]) at
    /// `range` of its bytes.
    pub fn new(dtype_name: String, dtype: Option<DType>, shape: Vec<usize>, shard: usize, range: Range<usize>) -> TensorInfo {
        TensorInfo { dtype_name, dtype, shape, shard, range }
    }

    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn num_bytes(&self) -> usize {
        self.range.len()
    }
}

/// A tensor's bytes: inside a memory-mapped shard, or owned (converted or synthetic weights).
/// Cheap to clone.
#[derive(Clone)]
pub struct TensorBytes {
    map: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
}

impl TensorBytes {
    pub fn as_slice(&self) -> &[u8] {
        &(*self.map).as_ref()[self.range.clone()]
    }

    /// A sub-range (relative to this tensor's bytes).
    pub fn slice(&self, range: Range<usize>) -> TensorBytes {
        assert!(range.end <= self.range.len(), "slice past the tensor's end");
        TensorBytes { map: self.map.clone(), range: self.range.start + range.start..self.range.start + range.end }
    }

    /// Bytes made in memory (converted weights), moved to a cache-line-aligned buffer: the
    /// CPU kernels' 64-byte loads of a row would otherwise straddle two cache lines each
    /// (large allocations start 16 bytes into a page), which halved q8 decode's load rate.
    pub fn from_vec(bytes: Vec<u8>) -> TensorBytes {
        let range = 0..bytes.len();
        TensorBytes { map: Arc::new(Aligned::from(bytes)), range }
    }
}

/// Bytes starting on a 64-byte boundary.
struct Aligned {
    lines: Vec<Line>,
    len: usize,
}

#[repr(C, align(64))]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Line([u8; 64]);

impl From<Vec<u8>> for Aligned {
    fn from(bytes: Vec<u8>) -> Aligned {
        let mut lines = vec![Line([0; 64]); bytes.len().div_ceil(64)];
        for (line, chunk) in lines.iter_mut().zip(bytes.chunks(64)) {
            line.0[..chunk.len()].copy_from_slice(chunk);
        }
        Aligned { lines, len: bytes.len() }
    }
}

impl AsRef<[u8]> for Aligned {
    fn as_ref(&self) -> &[u8] {
        let lines: &[u8] = bytemuck::cast_slice(&self.lines);
        &lines[..self.len]
    }
}

impl std::fmt::Debug for TensorBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TensorBytes({} bytes)", self.range.len())
    }
}

/// The bytes a checkpoint's tensors live in: a mapped file, or a buffer made at load.
pub type ShardBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

pub struct Checkpoint {
    /// The checkpoint directory (or the GGUF file), for messages.
    pub dir: PathBuf,
    shards: Vec<(PathBuf, ShardBytes)>,
    tensors: BTreeMap<String, TensorInfo>,
    /// Tensors a shard holds that the index does not list (by shard file).
    unindexed: BTreeMap<String, String>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        // A weights path that exists but is no regular file (a directory, a symlink loop) is
        // named as such rather than reported as absent.
        for path in [&index_path, &single_path] {
            match std::fs::metadata(path) {
                Ok(m) if !m.is_file() => return Err(Error::Invalid(format!("{} is not a file (a directory?): dsrun reads safetensors weights from it", path.display()))),
                Err(e) if path.symlink_metadata().is_ok() => return Err(Error::io(path, e)),
                _ => {}
            }
        }
        let (files, index) = if index_path.is_file() {
            let index = read_index(&index_path)?;
            let mut files: Vec<String> = index.values().cloned().collect();
            files.sort();
            files.dedup();
            (files, Some(index))
        } else if single_path.is_file() {
            (vec![SINGLE_FILE.to_string()], None)
        } else {
            return Err(Error::Invalid(format!("no weights in {}: expected {SINGLE_FILE} or {INDEX_FILE}", dir.display())));
        };

        let mut shards = Vec::new();
        let mut tensors = BTreeMap::new();
        let mut unindexed = BTreeMap::new();
        for file in files {
            let path = dir.join(&file);
            let map = map_file(&path)?;
            for (name, info) in read_header(&path, &map, shards.len())? {
                if let Some(index) = &index {
                    // The index is the authority on which shard holds a name.
                    if index.get(&name) != Some(&file) {
                        if !index.contains_key(&name) {
                            unindexed.insert(name, file.clone());
                        }
                        continue;
                    }
                }
                tensors.insert(name, info);
            }
            shards.push((path, Arc::new(map) as ShardBytes));
        }
        if let Some(index) = &index {
            for (name, file) in index {
                if !tensors.contains_key(name) {
                    return Err(Error::MissingTensor { name: name.clone(), hint: format!(" ({INDEX_FILE} places it in {file}, which does not contain it)") });
                }
            }
        }
        crate::mapped::note_mapped(dir);
        Ok(Checkpoint { dir: dir.to_path_buf(), shards, tensors, unindexed })
    }

    /// A checkpoint of tensors already located: `tensors` index into `shards`, and each range
    /// must lie inside its shard (checked: the caller's ranges come from a file).
    pub fn from_parts(dir: PathBuf, shards: Vec<(PathBuf, ShardBytes)>, tensors: BTreeMap<String, TensorInfo>) -> Result<Checkpoint> {
        for (name, info) in &tensors {
            let len = shards.get(info.shard).map(|(_, bytes)| (**bytes).as_ref().len());
            if len.is_none_or(|len| info.range.end > len || info.range.start > info.range.end) {
                return Err(corrupt(&dir, format!("tensor `{name}` lies outside its file ({:?})", info.range)));
            }
        }
        Ok(Checkpoint { dir, shards, tensors, unindexed: BTreeMap::new() })
    }

    /// Why a tensor the model needs is not there, for the error message: a shard holds it but
    /// the index does not list it, or it is nowhere.
    pub fn missing_hint(&self, name: &str) -> String {
        match self.unindexed.get(name) {
            Some(file) => format!(" as listed by {INDEX_FILE}: {file} holds it, but the index does not name it (a stale or incomplete index: regenerate it or add the entry)"),
            None => format!(" in {}", self.dir.display()),
        }
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn tensors(&self) -> impl Iterator<Item = (&str, &TensorInfo)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn bytes(&self, info: &TensorInfo) -> TensorBytes {
        TensorBytes { map: self.shards[info.shard].1.clone(), range: info.range.clone() }
    }

    pub fn shard_paths(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|(p, _)| p.as_path())
    }
}

fn read_index(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
    let map = value.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::Invalid(format!("{}: no `weight_map` object", path.display())))?;
    map.iter()
        .map(|(name, file)| {
            let file = file
                .as_str()
                .filter(|f| !f.contains('/') && !f.contains('\\') && !f.starts_with('.'))
                .ok_or_else(|| Error::Invalid(format!("{}: `{name}` maps to {file}, not a file name", path.display())))?;
            Ok((name.clone(), file.to_string()))
        })
        .collect()
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len < 8 {
        return Err(corrupt(path, format!("the file is {len} bytes, shorter than the 8-byte header length")));
    }
    // Safety: the file is opened read-only and dsrun never writes to checkpoint files; like every
    // memory-mapped reader we rely on nobody truncating it while it is open.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

fn corrupt(path: &Path, reason: String) -> Error {
    Error::CorruptCheckpoint { path: path.to_path_buf(), reason }
}

/// Explains a header whose tensors do not end exactly at the end of the file.
fn data_extent_mismatch(map: &[u8], header_len: u64) -> String {
    let available = map.len().saturating_sub(8 + header_len as usize);
    let header: serde_json::Value = serde_json::from_slice(&map[8..8 + header_len as usize]).unwrap_or_default();
    let last = header.as_object().into_iter().flatten().filter_map(|(name, t)| Some((name, t.get("data_offsets")?.get(1)?.as_u64()? as usize))).max_by_key(|(_, end)| *end);
    match last {
        Some((name, end)) if end > available => format!("tensor `{name}` ends at data byte {end}, past the {available} data bytes in the file (truncated download?)"),
        Some((_, end)) => format!("{} bytes follow the last tensor's data (padded or corrupt file)", available - end),
        None => "tensor data does not end where the file ends".to_string(),
    }
}

/// Names the tensor whose byte range does not match its dtype and shape.
fn invalid_tensor_info(map: &[u8], header_len: u64) -> String {
    let header: serde_json::Value = serde_json::from_slice(&map[8..(8 + header_len as usize).min(map.len())]).unwrap_or_default();
    let size = |dtype: &str| match dtype {
        "F64" | "I64" | "U64" => Some(8u64),
        "F32" | "I32" | "U32" => Some(4),
        "F16" | "BF16" | "I16" | "U16" => Some(2),
        "F8_E4M3" | "F8_E5M2" | "I8" | "U8" | "BOOL" => Some(1),
        _ => None,
    };
    for (name, t) in header.as_object().into_iter().flatten().filter(|(n, _)| n.as_str() != "__metadata__") {
        let offsets = t.get("data_offsets").and_then(|o| Some((o.get(0)?.as_u64()?, o.get(1)?.as_u64()?)));
        let shape: Option<Vec<u64>> = t.get("shape").and_then(|s| s.as_array()?.iter().map(|d| d.as_u64()).collect());
        let dtype = t.get("dtype").and_then(|d| d.as_str()).unwrap_or("?");
        let expected = shape.as_ref().and_then(|s| s.iter().try_fold(size(dtype)?, |acc, &d| acc.checked_mul(d)));
        match (offsets, expected) {
            (Some((start, end)), Some(bytes)) if end.checked_sub(start) == Some(bytes) => continue,
            (Some((start, end)), Some(bytes)) => {
                return format!("tensor `{name}` ({dtype} {:?}) needs {bytes} bytes but its data_offsets [{start}, {end}] give {}", shape.unwrap_or_default(), end as i128 - start as i128)
            }
            (_, None) => return format!("tensor `{name}` has a shape {:?} of dtype {dtype} whose size overflows", shape.unwrap_or_default()),
            (None, _) => return format!("tensor `{name}` has no valid data_offsets"),
        }
    }
    "a tensor's byte range does not match its dtype and shape".to_string()
}

/// Parses and validates one shard's header; returns absolute byte ranges into the file.
fn read_header(path: &Path, map: &[u8], shard: usize) -> Result<Vec<(String, TensorInfo)>> {
    use safetensors::SafeTensorError as E;
    let header_len = u64::from_le_bytes(map[..8].try_into().unwrap());
    let (n, metadata) = safetensors::SafeTensors::read_metadata(map).map_err(|e| {
        let reason = match e {
            E::HeaderTooLarge | E::InvalidHeaderLength | E::HeaderTooSmall => format!("header length {header_len} runs past the end of the {}-byte file (truncated download?)", map.len()),
            E::InvalidHeader(_) | E::InvalidHeaderDeserialization(_) | E::InvalidHeaderStart => {
                format!("header is not valid JSON metadata ({e})")
            }
            E::InvalidOffset(name) => {
                format!("tensor `{name}` has data offsets that overlap or leave gaps between tensors")
            }
            E::MetadataIncompleteBuffer => data_extent_mismatch(map, header_len),
            E::TensorInvalidInfo => invalid_tensor_info(map, header_len),
            other => other.to_string(),
        };
        corrupt(path, reason)
    })?;
    let data_start = 8 + n;
    let mut out = Vec::new();
    for (name, info) in metadata.tensors() {
        let dtype_name = format!("{:?}", info.dtype);
        let dtype = match info.dtype {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::F16 => Some(DType::F16),
            safetensors::Dtype::BF16 => Some(DType::BF16),
            safetensors::Dtype::F8_E4M3 => Some(DType::F8E4M3),
            _ => None,
        };
        let (start, end) = info.data_offsets;
        out.push((name, TensorInfo { dtype_name, dtype, shape: info.shape.clone(), shard, range: data_start + start..data_start + end }));
    }
    Ok(out)
}
