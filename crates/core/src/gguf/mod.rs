//! GGUF files, the format llama.cpp's converter writes: a header, a table of typed metadata
//! (`general.architecture`, `deepseek2.*`, `tokenizer.ggml.*`, ...), a table of tensors (name,
//! dimensions, ggml type, offset), then the tensor data, aligned.
//!
//! A reader of our own rather than a crate: the Rust crates that parse GGUF come inside a
//! tensor framework (candle-core) or lack the checks a file from the internet needs. The
//! format is three tables; every count, length and offset is checked against the bytes that
//! remain, so a corrupt or truncated file is an error naming what is wrong, never a panic, a
//! huge allocation or a hang (tests cut a file at every byte).

use crate::error::{Error, Result};
use std::path::Path;

pub mod deepseek2;
pub mod tokenizer;
pub mod writer;

/// Versions read: 2 and 3 (64-bit counts; version 1's 32-bit counts are long gone).
const VERSIONS: [u32; 2] = [2, 3];
/// ggml tensors have at most four dimensions.
const MAX_DIMS: usize = 4;
/// Arrays of arrays deeper than this are refused (llama.cpp writes none).
const MAX_NESTING: usize = 4;
/// Data is aligned to `general.alignment`, 32 where the file does not say.
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// An integer value of any width, where it is one and fits.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// How `dsrun inspect` shows it: arrays by their length and first items.
    pub fn summary(&self) -> String {
        match self {
            Value::String(s) if s.chars().count() > 60 => format!("{:?}... ({} bytes)", s.chars().take(60).collect::<String>(), s.len()),
            Value::String(s) => format!("{s:?}"),
            Value::Array(items) => {
                let first: Vec<String> = items.iter().take(4).map(|v| v.summary()).collect();
                format!("[{}{}] ({} items)", first.join(", "), if items.len() > 4 { ", ..." } else { "" }, items.len())
            }
            Value::Bool(b) => b.to_string(),
            Value::F32(v) => v.to_string(),
            Value::F64(v) => v.to_string(),
            other => other.as_u64().map_or_else(|| format!("{other:?}"), |v| v.to_string()),
        }
    }
}

/// A ggml tensor type: its id in the file, its name, and its block (values per block, bytes
/// per block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType {
    pub id: u32,
    pub name: &'static str,
    pub block: u64,
    pub block_bytes: u64,
}

/// The ggml types a GGUF may hold (llama.cpp's `ggml.h`; ids 4, 5, 31-33 and 36-38 were
/// removed upstream).
const TYPES: [(u32, &str, u64, u64); 34] = [
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
    // Not written by current converters, listed so a file naming them is described, not refused
    // as corrupt.
    (4, "Q4_2 (removed)", 32, 0),
    (5, "Q4_3 (removed)", 32, 0),
];

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES.iter().find(|t| t.0 == id && t.3 > 0).map(|&(id, name, block, block_bytes)| GgmlType { id, name, block, block_bytes })
    }

    pub fn from_name(name: &str) -> Option<GgmlType> {
        TYPES.iter().find(|t| t.1 == name && t.3 > 0).and_then(|t| GgmlType::from_id(t.0))
    }
}

/// One tensor of the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the row length (the fastest-varying dimension).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Where its bytes start in the file, and how many.
    pub start: u64,
    pub bytes: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A GGUF file's tables (its tensor data stays where it is: in the map or the bytes given).
#[derive(Debug, Clone, PartialEq)]
pub struct Gguf {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Where the tensor data starts.
    pub data_start: u64,
}

impl Gguf {
    /// The tables of the GGUF file at `path`, read through a memory map.
    pub fn open(path: &Path) -> Result<(Gguf, memmap2::Mmap)> {
        let file = std::fs::File::open(path).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
        // SAFETY: the map is read-only; a file changed under it is reported by the SIGBUS
        // handler (`mapped`) rather than read as garbage.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
        crate::mapped::note_mapped(path.parent().unwrap_or(path));
        let gguf = Gguf::parse(&map).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
        Ok((gguf, map))
    }

    /// The tables of a whole GGUF file's bytes.
    pub fn parse(bytes: &[u8]) -> Result<Gguf> {
        let mut r = Reader { bytes, at: 0 };
        let magic = r.take(4, "the magic")?;
        if magic != b"GGUF" {
            return Err(bad(format!("not a GGUF file (it starts with {magic:02x?}, not \"GGUF\")")));
        }
        let version = r.u32("the version")?;
        if !VERSIONS.contains(&version) {
            return Err(bad(format!("GGUF version {version}: dsrun reads versions 2 and 3")));
        }
        let tensor_count = r.u64("the tensor count")?;
        let kv_count = r.u64("the metadata count")?;
        // Each entry takes at least 12 bytes (key length, type) or 24 (a tensor's name length,
        // dimension count, type, offset): counts beyond what remains are corrupt.
        r.check_count(kv_count, 12, "metadata entries")?;
        r.check_count(tensor_count, 24, "tensors")?;
        let mut metadata: Vec<(String, Value)> = Vec::with_capacity(kv_count as usize);
        for i in 0..kv_count {
            let key = r.string(&format!("metadata key {i}"))?;
            let ty = r.u32(&format!("the type of `{key}`"))?;
            let value = r.value(ty, &key, 0)?;
            if metadata.iter().any(|(k, _)| *k == key) {
                return Err(bad(format!("metadata key `{key}` appears twice")));
            }
            metadata.push((key, value));
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, v)) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                _ => return Err(bad(format!("general.alignment is {}, not a power of two", v.summary()))),
            },
        };
        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(tensor_count as usize);
        let mut offsets = Vec::with_capacity(tensor_count as usize);
        for i in 0..tensor_count {
            let name = r.string(&format!("the name of tensor {i}"))?;
            let n_dims = r.u32(&format!("the dimension count of `{name}`"))? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(bad(format!("tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS})")));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for d in 0..n_dims {
                dims.push(r.u64(&format!("dimension {d} of `{name}`"))?);
            }
            let id = r.u32(&format!("the type of `{name}`"))?;
            let ty = GgmlType::from_id(id).ok_or_else(|| bad(format!("tensor `{name}` has ggml type {id}, which dsrun does not know")))?;
            let offset = r.u64(&format!("the offset of `{name}`"))?;
            if !offset.is_multiple_of(alignment) {
                return Err(bad(format!("tensor `{name}` starts at data offset {offset}, not a multiple of the alignment {alignment}")));
            }
            let bytes = tensor_bytes(&name, &dims, ty)?;
            if tensors.iter().any(|t| t.name == name) {
                return Err(bad(format!("tensor `{name}` appears twice")));
            }
            offsets.push(offset);
            tensors.push(TensorInfo { name, dims, ty, start: 0, bytes });
        }
        let data_start = (r.at as u64).next_multiple_of(alignment);
        let file = bytes.len() as u64;
        for (t, offset) in tensors.iter_mut().zip(offsets) {
            t.start = data_start
                .checked_add(offset)
                .filter(|s| s.checked_add(t.bytes).is_some_and(|end| end <= file))
                .ok_or_else(|| bad(format!("tensor `{}` ({} bytes at data offset {offset}) runs past the end of the file ({file} bytes): the file is truncated or corrupt", t.name, t.bytes)))?;
        }
        Ok(Gguf { version, metadata, tensors, alignment, data_start })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// `general.architecture` (`deepseek2` for the DeepSeek family).
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }

    /// Bytes by ggml type, most first.
    pub fn bytes_by_type(&self) -> Vec<(&'static str, u64)> {
        let mut by: Vec<(&'static str, u64)> = Vec::new();
        for t in &self.tensors {
            match by.iter_mut().find(|(name, _)| *name == t.ty.name) {
                Some((_, b)) => *b += t.bytes,
                None => by.push((t.ty.name, t.bytes)),
            }
        }
        by.sort_by_key(|&(_, bytes)| std::cmp::Reverse(bytes));
        by
    }

    /// What `dsrun inspect` prints for the file: its version, architecture, metadata (long
    /// arrays summarised), tensor count and formats by bytes.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "GGUF v{}, architecture {}, {} tensors, {} metadata entries, data aligned to {}\n",
            self.version,
            self.architecture().unwrap_or("(none)"),
            self.tensors.len(),
            self.metadata.len(),
            self.alignment
        );
        let total: u64 = self.tensors.iter().map(|t| t.bytes).sum();
        let formats: Vec<String> = self.bytes_by_type().iter().map(|(n, b)| format!("{n} {} ({:.1}%)", crate::util::human_bytes(*b), 100.0 * *b as f64 / total.max(1) as f64)).collect();
        out += &format!("formats    {}\n", formats.join(", "));
        out += "metadata\n";
        for (k, v) in &self.metadata {
            out += &format!("  {k:<44} {}\n", v.summary());
        }
        out
    }
}

/// Whether `path` names a GGUF file (by its extension; the magic is checked when it opens, and a
/// missing file is reported as such then, not as a directory without config.json).
pub fn is_gguf(path: &Path) -> bool {
    !path.is_dir() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

fn bad(why: String) -> Error {
    Error::Invalid(why)
}

/// Bytes of a tensor of `dims` in `ty`: whole blocks along the row, every product checked.
fn tensor_bytes(name: &str, dims: &[u64], ty: GgmlType) -> Result<u64> {
    if !dims[0].is_multiple_of(ty.block) {
        return Err(bad(format!("tensor `{name}`: rows of {} values do not divide into {}'s blocks of {}", dims[0], ty.name, ty.block)));
    }
    let rows = dims[1..].iter().try_fold(1u64, |a, &d| a.checked_mul(d));
    rows.and_then(|rows| (dims[0] / ty.block).checked_mul(ty.block_bytes)?.checked_mul(rows)).ok_or_else(|| bad(format!("tensor `{name}`: dimensions {dims:?} overflow")))
}

/// Little-endian reads from the file's bytes, each checked against what remains.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(bad(format!("the file ends inside {what} (at byte {}, {n} bytes needed, {} left): truncated or corrupt", self.at, self.remaining())));
        }
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A count of entries of at least `min_bytes` each must fit in what remains.
    fn check_count(&self, count: u64, min_bytes: u64, what: &str) -> Result<()> {
        if count.checked_mul(min_bytes).is_none_or(|need| need > self.remaining() as u64) {
            return Err(bad(format!("{count} {what} cannot fit in the {} bytes left (at byte {}): corrupt", self.remaining(), self.at)));
        }
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let len = usize::try_from(len).ok().filter(|&l| l <= self.remaining()).ok_or_else(|| bad(format!("{what}: a string of {len} bytes in the {} bytes left: corrupt", self.remaining())))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| bad(format!("{what} is not UTF-8")))
    }

    /// A value of metadata type `ty` (`key` names it in errors).
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value> {
        let what = format!("the value of `{key}`");
        Ok(match ty {
            0 => Value::U8(self.array::<1>(&what)?[0]),
            1 => Value::I8(self.array::<1>(&what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => Value::U32(self.u32(&what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match self.array::<1>(&what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(bad(format!("`{key}` is a bool of byte {b}"))),
            },
            8 => Value::String(self.string(&what)?),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(bad(format!("`{key}`: arrays nested deeper than {MAX_NESTING}")));
                }
                let item = self.u32(&what)?;
                let count = self.u64(&what)?;
                // Every item takes at least a byte (a string its 8-byte length).
                let min = match item {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => return Err(bad(format!("`{key}`: an array of unknown type {other}"))),
                };
                self.check_count(count, min, &format!("items of `{key}`"))?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(item, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(&what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
            other => return Err(bad(format!("`{key}` has unknown metadata type {other}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small GGUF as llama.cpp lays one out (the writer here only builds test input).
    fn file(version: u32, kv: &[(&str, u32, Vec<u8>)], tensors: &[(&str, &[u64], u32, u64)], data: usize) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(version.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((kv.len() as u64).to_le_bytes());
        let string = |b: &mut Vec<u8>, s: &str| {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        for (key, ty, value) in kv {
            string(&mut b, key);
            b.extend(ty.to_le_bytes());
            b.extend(value);
        }
        for (name, dims, ty, offset) in tensors {
            string(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
            b.extend(ty.to_le_bytes());
            b.extend(offset.to_le_bytes());
        }
        b.resize(b.len().next_multiple_of(32) + data, 0);
        b
    }

    fn str_value(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend(s.as_bytes());
        v
    }

    fn sample() -> Vec<u8> {
        let mut tokens = 8u32.to_le_bytes().to_vec();
        tokens.extend(2u64.to_le_bytes());
        tokens.extend(str_value("<s>"));
        tokens.extend(str_value("hi"));
        file(
            3,
            &[
                ("general.architecture", 8, str_value("deepseek2")),
                ("deepseek2.block_count", 4, 27u32.to_le_bytes().to_vec()),
                ("tokenizer.ggml.tokens", 9, tokens),
                ("deepseek2.rope.freq_base", 6, 10000f32.to_le_bytes().to_vec()),
            ],
            // A Q8_0 matrix of 2 rows of 64 (2 blocks of 34 bytes a row), then an F32 vector.
            &[("blk.0.attn_q.weight", &[64, 2], 8, 0), ("blk.0.attn_norm.weight", &[64], 0, 160)],
            160 + 256,
        )
    }

    #[test]
    fn reads_the_tables_of_a_file() {
        let bytes = sample();
        let g = Gguf::parse(&bytes).unwrap();
        assert_eq!((g.version, g.alignment), (3, 32));
        assert_eq!(g.architecture(), Some("deepseek2"));
        assert_eq!(g.get("deepseek2.block_count").and_then(Value::as_u64), Some(27));
        assert_eq!(g.get("deepseek2.rope.freq_base").and_then(Value::as_f64), Some(10000.0));
        assert_eq!(g.get("tokenizer.ggml.tokens"), Some(&Value::Array(vec![Value::String("<s>".into()), Value::String("hi".into())])));
        let q = &g.tensors[0];
        assert_eq!((q.ty.name, q.bytes, q.start), ("Q8_0", 2 * 2 * 34, g.data_start));
        assert_eq!((g.tensors[1].bytes, g.tensors[1].start), (256, g.data_start + 160));
        assert_eq!(g.bytes_by_type(), [("F32", 256), ("Q8_0", 136)]);
        assert!(g.describe().contains("architecture deepseek2, 2 tensors"));
    }

    /// Cut anywhere, the file is refused with a message, never a panic.
    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample();
        for len in 0..bytes.len() - 1 {
            let e = Gguf::parse(&bytes[..len]).expect_err("a truncated file parses").to_string();
            assert!(!e.is_empty());
        }
    }

    /// Any byte of the tables changed to any of a few values: an error or a file whose every
    /// tensor lies inside it, never a panic.
    #[test]
    fn changed_bytes_never_panic() {
        let bytes = sample();
        let tables = Gguf::parse(&bytes).unwrap().data_start as usize;
        for at in 0..tables {
            for value in [0u8, 1, 0x7f, 0x80, 0xff, bytes[at].wrapping_add(1)] {
                let mut b = bytes.clone();
                b[at] = value;
                if let Ok(g) = Gguf::parse(&b) {
                    assert!(g.tensors.iter().all(|t| t.start + t.bytes <= b.len() as u64));
                }
            }
        }
    }

    #[test]
    fn corrupt_tables_are_refused_by_name() {
        let refused = |bytes: Vec<u8>, needle: &str| {
            let e = Gguf::parse(&bytes).expect_err("corrupt").to_string();
            assert!(e.contains(needle), "{e}");
        };
        let mut b = sample();
        b[0] = b'X';
        refused(b, "not a GGUF file");
        refused(file(1, &[], &[], 0), "version 1");
        // A count far beyond the file.
        let mut b = sample();
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        refused(b, "metadata entries cannot fit");
        refused(file(3, &[], &[("w", &[64], 77, 0)], 64), "ggml type 77");
        refused(file(3, &[], &[("w", &[30], 8, 0)], 64), "do not divide into Q8_0's blocks of 32");
        refused(file(3, &[], &[("w", &[64], 0, 8)], 512), "not a multiple of the alignment");
        refused(file(3, &[], &[("w", &[64, 1 << 40], 0, 0)], 64), "runs past the end of the file");
        refused(file(3, &[], &[("w", &[u64::MAX, u64::MAX], 0, 0)], 64), "overflow");
        refused(file(3, &[], &[("w", &[1, 1, 1, 1, 1], 0, 0)], 64), "5 dimensions");
        refused(file(3, &[("a", 4, vec![0; 4]), ("a", 4, vec![0; 4])], &[], 0), "appears twice");
        refused(file(3, &[("general.alignment", 4, 24u32.to_le_bytes().to_vec())], &[], 0), "not a power of two");
        refused(file(3, &[("k", 13, vec![])], &[], 0), "unknown metadata type 13");
        let mut huge = 8u32.to_le_bytes().to_vec();
        huge.extend(u64::MAX.to_le_bytes());
        refused(file(3, &[("k", 9, huge)], &[], 0), "cannot fit");
    }
}
