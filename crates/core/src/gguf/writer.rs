//! Writing GGUF v3 files (`dsrun quantize`): the metadata, the tensor table, then each tensor's
//! bytes at the file's alignment, asked for one tensor at a time so a large model is never all
//! in memory. Written to `<out>.part` and renamed when whole: a failure (a full disk) leaves no
//! file that looks finished.

use super::{GgmlType, Value};
use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;

/// llama.cpp's default data alignment (`general.alignment` unset).
pub const ALIGNMENT: u64 = 32;

/// A tensor to write: its name, dimensions in ggml order (`dims[0]` the row length) and type.
#[derive(Debug, Clone)]
pub struct Planned {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

impl Planned {
    /// Its bytes: whole blocks per row.
    pub fn bytes(&self) -> u64 {
        let elements: u64 = self.dims.iter().product();
        elements / self.ty.block * self.ty.block_bytes
    }
}

/// The sink a tensor's bytes go to, piece by piece.
pub type Sink<'a> = dyn FnMut(&[u8]) -> Result<()> + 'a;

/// Writes `metadata` and `tensors` to `out`; `data(i, sink)` gives tensor i's bytes to `sink`
/// (exactly `tensors[i].bytes()` of them, in as many pieces as it likes), in order. Returns
/// the file's size.
pub fn write(out: &Path, metadata: &[(String, Value)], tensors: &[Planned], mut data: impl FnMut(usize, &mut Sink) -> Result<()>) -> Result<u64> {
    let part = out.with_extension("gguf.part");
    let io = |what: &str, e: std::io::Error| Error::Io { path: part.clone(), source: std::io::Error::new(e.kind(), format!("{what}: {e}")) };
    let file = std::fs::File::create(&part).map_err(|e| io("creating it", e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut header = Vec::new();
    header.extend(b"GGUF");
    header.extend(3u32.to_le_bytes());
    header.extend((tensors.len() as u64).to_le_bytes());
    header.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut header, key);
        header.extend(type_code(value).to_le_bytes());
        put_value(&mut header, value);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_string(&mut header, &t.name);
        header.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            header.extend(d.to_le_bytes());
        }
        header.extend(t.ty.id.to_le_bytes());
        header.extend(offset.to_le_bytes());
        offset = (offset + t.bytes()).next_multiple_of(ALIGNMENT);
    }
    header.resize((header.len() as u64).next_multiple_of(ALIGNMENT) as usize, 0);
    w.write_all(&header).map_err(|e| io("writing the header", e))?;
    let mut written = header.len() as u64;
    for (i, t) in tensors.iter().enumerate() {
        let mut count = 0u64;
        data(i, &mut |bytes: &[u8]| {
            count += bytes.len() as u64;
            w.write_all(bytes).map_err(|e| io(&format!("writing `{}`", t.name), e))
        })?;
        if count != t.bytes() {
            return Err(Error::Invalid(format!("`{}`: {count} bytes for a {} tensor of {:?}, not {}", t.name, t.ty.name, t.dims, t.bytes())));
        }
        let padded = count.next_multiple_of(ALIGNMENT);
        w.write_all(&vec![0; (padded - count) as usize]).map_err(|e| io(&format!("writing `{}`", t.name), e))?;
        written += padded;
    }
    w.into_inner().map_err(|e| io("writing the end", e.into_error()))?.sync_all().map_err(|e| io("flushing it", e))?;
    std::fs::rename(&part, out).map_err(|e| Error::Io { path: out.to_path_buf(), source: e })?;
    Ok(written)
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// GGUF's value type codes (`gguf_type`).
fn type_code(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend(x.to_le_bytes()),
        Value::U16(x) => out.extend(x.to_le_bytes()),
        Value::I16(x) => out.extend(x.to_le_bytes()),
        Value::U32(x) => out.extend(x.to_le_bytes()),
        Value::I32(x) => out.extend(x.to_le_bytes()),
        Value::F32(x) => out.extend(x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            // Arrays hold one type (an empty one: strings, as llama.cpp's writer does).
            out.extend(items.first().map_or(8, type_code).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        Value::U64(x) => out.extend(x.to_le_bytes()),
        Value::I64(x) => out.extend(x.to_le_bytes()),
        Value::F64(x) => out.extend(x.to_le_bytes()),
    }
}
