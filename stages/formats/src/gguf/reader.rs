//! GGUF v2/v3 reader: header, metadata key/values (all value types, arrays included), tensor
//! infos, and the memory-mapped, aligned tensor data. Every read is bounds-checked, so a
//! truncated or corrupt file is an error saying what was being read and where.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::GgufError;
use super::quant::{GgmlType, dequantize};

/// `GGUF` read as a little-endian u32.
pub const MAGIC: u32 = 0x4655_4747;
/// Alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value, with GGUF's type preserved so a writer can reproduce it.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Element type id and elements (an empty array keeps its declared element type).
    Array(u32, Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// GGUF's value type id.
    pub fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::String(_) => 8,
            MetaValue::Array(..) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    /// Any integer value (or bool) as i64.
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            MetaValue::U8(v) => v as i64,
            MetaValue::I8(v) => v as i64,
            MetaValue::U16(v) => v as i64,
            MetaValue::I16(v) => v as i64,
            MetaValue::U32(v) => v as i64,
            MetaValue::I32(v) => v as i64,
            MetaValue::U64(v) => i64::try_from(v).ok()?,
            MetaValue::I64(v) => v,
            MetaValue::Bool(v) => v as i64,
            _ => return None,
        })
    }

    /// Any numeric value as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// A bool (or an integer, nonzero = true; some writers store flags as u8).
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => self.as_i64().map(|v| v != 0),
        }
    }

    /// A string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// An array's elements.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(_, v) => Some(v),
            _ => None,
        }
    }
}

/// One tensor's entry in the GGUF tensor-info table.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the contiguous (fastest-varying) one.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Shape in row-major (PyTorch / safetensors) order: ggml's dims reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements.
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
}

/// An open GGUF file: metadata in file order, tensor infos, and the mapped data.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    /// Key/value pairs in file order.
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: u64,
    keys: HashMap<String, usize>,
    by_name: HashMap<String, usize>,
    mmap: Mmap,
    data_start: usize,
}

struct Cursor<'a> {
    path: &'a Path,
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        if self.b.len().saturating_sub(self.pos) < n {
            return Err(GgufError::Format {
                path: self.path.to_path_buf(),
                reason: format!(
                    "truncated: needed {n} bytes for {what} at offset {}, file is {} bytes",
                    self.pos,
                    self.b.len()
                ),
            });
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8, GgufError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, GgufError> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let n = self.u64(what)?;
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::Format {
            path: self.path.to_path_buf(),
            reason: format!("{what} at offset {} is not UTF-8", self.pos - n),
        })
    }
    /// A count of items each at least `min_item` bytes; rejects counts the file cannot hold so
    /// a corrupt length never triggers a huge allocation.
    fn count(&mut self, min_item: usize, what: &str) -> Result<usize, GgufError> {
        let n = self.u64(what)?;
        let left = (self.b.len() - self.pos) as u64;
        if n.saturating_mul(min_item as u64) > left {
            return Err(GgufError::Format {
                path: self.path.to_path_buf(),
                reason: format!("{what} = {n} cannot fit in the remaining {left} bytes"),
            });
        }
        Ok(n as usize)
    }
    fn value(&mut self, ty: u32, what: &str) -> Result<MetaValue, GgufError> {
        Ok(match ty {
            0 => MetaValue::U8(self.u8(what)?),
            1 => MetaValue::I8(self.u8(what)? as i8),
            2 => MetaValue::U16(self.u16(what)?),
            3 => MetaValue::I16(self.u16(what)? as i16),
            4 => MetaValue::U32(self.u32(what)?),
            5 => MetaValue::I32(self.u32(what)? as i32),
            6 => MetaValue::F32(f32::from_bits(self.u32(what)?)),
            7 => MetaValue::Bool(self.u8(what)? != 0),
            8 => MetaValue::String(self.string(what)?),
            9 => {
                let ety = self.u32(what)?;
                if ety == 9 {
                    return Err(self.bad(format!("{what}: nested arrays are not valid GGUF")));
                }
                let n = self.count(1, what)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(ety, what)?);
                }
                MetaValue::Array(ety, v)
            }
            10 => MetaValue::U64(self.u64(what)?),
            11 => MetaValue::I64(self.u64(what)? as i64),
            12 => MetaValue::F64(f64::from_bits(self.u64(what)?)),
            t => return Err(self.bad(format!("{what}: unknown metadata value type {t}"))),
        })
    }
    fn bad(&self, reason: String) -> GgufError {
        GgufError::Format { path: self.path.to_path_buf(), reason }
    }
}

impl GgufFile {
    /// Opens and validates a GGUF file: every tensor's type must be a known ggml type and its
    /// data must lie inside the file.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        // SAFETY: read-only mapping of a file newt does not modify while it is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let mut c = Cursor { path, b: &mmap, pos: 0 };
        let magic = c.u32("magic")?;
        if magic != MAGIC {
            return Err(c.bad(format!("not a GGUF file (magic {magic:#010x})")));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            let hint = if version.swap_bytes() <= 3 { " (big-endian GGUF is not supported)" } else { "" };
            return Err(GgufError::UnsupportedVersion { path: path.to_path_buf(), version, hint });
        }
        // Each tensor info is at least 8 (name len) + 4 + 4 + 8 bytes; each KV at least 8 + 4.
        let n_tensors = c.count(24, "tensor_count")?;
        let n_kv = c.count(12, "metadata_kv_count")?;
        let mut metadata = Vec::with_capacity(n_kv);
        let mut keys = HashMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&format!("type of `{key}`"))?;
            let v = c.value(ty, &format!("value of `{key}`"))?;
            keys.insert(key.clone(), metadata.len());
            metadata.push((key, v));
        }
        let alignment = match keys.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_i64() {
                Some(a) if a > 0 && (a as u64).is_power_of_two() => a as u64,
                _ => return Err(c.bad(format!("general.alignment {v:?} is not a power of two"))),
            },
        };
        let mut tensors = Vec::with_capacity(n_tensors);
        let mut by_name = HashMap::new();
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor #{i} name"))?;
            let n_dims = c.u32(&format!("n_dims of `{name}`"))?;
            if n_dims > 4 {
                return Err(c.bad(format!("tensor `{name}` has {n_dims} dims (ggml allows 4)")));
            }
            let dims = (0..n_dims).map(|_| c.u64(&format!("dims of `{name}`"))).collect::<Result<Vec<_>, _>>()?;
            let ty = GgmlType(c.u32(&format!("type of `{name}`"))?);
            let offset = c.u64(&format!("offset of `{name}`"))?;
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                return Err(c.bad(format!("tensor `{name}` appears twice")));
            }
            tensors.push(GgufTensorInfo { name, dims, ty, offset });
        }
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let data_len = (mmap.len() as u64).saturating_sub(data_start);
        for t in &tensors {
            let n = t
                .dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| c.bad(format!("tensor `{}`: dims {:?} overflow", t.name, t.dims)))?;
            if t.ty.name().is_none() {
                return Err(GgufError::UnknownType { path: path.to_path_buf(), tensor: t.name.clone(), ty: t.ty });
            }
            let len = t.ty.byte_len(n as usize).ok_or_else(|| {
                c.bad(format!("tensor `{}`: {n} elements of {} is not a whole number of blocks", t.name, t.ty))
            })? as u64;
            if t.offset % alignment != 0 {
                return Err(c.bad(format!("tensor `{}` offset {} is not aligned to {alignment}", t.name, t.offset)));
            }
            if t.offset.checked_add(len).is_none_or(|end| end > data_len) {
                return Err(c.bad(format!(
                    "tensor `{}` data [{}, {}) lies past the end of the {data_len}-byte data \
                     section (truncated?)",
                    t.name,
                    t.offset,
                    t.offset.saturating_add(len)
                )));
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            alignment,
            keys,
            by_name,
            data_start: data_start as usize,
            mmap,
        })
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.keys.get(key).map(|&i| &self.metadata[i].1)
    }

    /// A tensor's info by name.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// A tensor's raw (possibly quantized) bytes, borrowed from the mapping.
    pub fn tensor_bytes(&self, t: &GgufTensorInfo) -> &[u8] {
        let len = t.ty.byte_len(t.n_elements()).expect("validated at open");
        let start = self.data_start + t.offset as usize;
        &self.mmap[start..start + len]
    }

    /// A tensor dequantized to f32, in row-major order of [`GgufTensorInfo::shape`].
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let t = self.tensor(name).ok_or_else(|| GgufError::MissingTensor(name.to_string()))?;
        let out = dequantize(t.ty, self.tensor_bytes(t), t.n_elements());
        self.release(t);
        out.map_err(|source| GgufError::Quant { tensor: name.to_string(), source })
    }

    /// Drops a tensor's mapped pages from the resident set (they stay in the page cache), so
    /// dequantizing a large file tensor by tensor does not accumulate its pages in RSS.
    pub fn release(&self, t: &GgufTensorInfo) {
        #[cfg(unix)]
        if let Some(len) = t.ty.byte_len(t.n_elements()) {
            // SAFETY: read-only shared file mapping; dropped pages are re-read from the file.
            let _ = unsafe {
                self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    self.data_start + t.offset as usize,
                    len,
                )
            };
        }
    }
}
