//! Safetensors I/O for Hugging Face model folders: a memory-mapped reader over one file or a
//! sharded set (with `model.safetensors.index.json`), and a streaming sharded writer.
//!
//! The header is parsed here rather than through the `safetensors` crate so that every error can
//! name the file and the tensor at fault, and so that a truncated download is caught at `open`
//! (offsets are checked against the file length) instead of at first read.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::{Map, Value};

mod writer;

pub use writer::{ShardedWriter, write_single};

/// Name of the single-file checkpoint in a Hugging Face model folder.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the index that maps tensor names to shard files.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Element types newt reads and writes. Other safetensors dtypes are rejected by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    F16,
    BF16,
    /// 32-bit signed integers: packed quantization codes (the `quantize` stage's artifact);
    /// never a model weight.
    I32,
}

impl Dtype {
    /// Parses a safetensors header dtype (`"F32"`, `"F16"`, `"BF16"`).
    pub fn from_safetensors(s: &str) -> Option<Dtype> {
        match s {
            "F32" => Some(Dtype::F32),
            "F16" => Some(Dtype::F16),
            "BF16" => Some(Dtype::BF16),
            "I32" => Some(Dtype::I32),
            _ => None,
        }
    }

    /// The dtype's spelling in a safetensors header.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }

    /// Parses a `torch_dtype`/`dtype` string from config.json (`"float32"`, `"bfloat16"`, ...).
    pub fn from_torch(s: &str) -> Option<Dtype> {
        match s {
            "float32" | "float" => Some(Dtype::F32),
            "float16" | "half" => Some(Dtype::F16),
            "bfloat16" => Some(Dtype::BF16),
            _ => None,
        }
    }

    /// The dtype's spelling as config.json's `torch_dtype`.
    pub fn torch_name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::BF16 => "bfloat16",
            Dtype::I32 => "int32",
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors from reading or writing safetensors; each names the file (and tensor) at fault.
#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: corrupt or truncated safetensors file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: tensor `{name}` has dtype {dtype}, which newt does not support (F32, F16, BF16)")]
    UnsupportedDtype { path: PathBuf, name: String, dtype: String },
    #[error("{dir}: no safetensors weights found (tried {INDEX_FILE} and {SINGLE_FILE})")]
    NoWeights { dir: PathBuf },
    #[error("{path}: bad index: {reason}")]
    BadIndex { path: PathBuf, reason: String },
    #[error("tensor `{0}` not found")]
    NotFound(String),
    #[error("tensor `{name}` appears twice (in {first} and {second})")]
    Duplicate { name: String, first: PathBuf, second: PathBuf },
    #[error("tensor `{name}`: {reason}")]
    BadTensor { name: String, reason: String },
    #[error(transparent)]
    Ref(#[from] crate::weights_ref::RefError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TensorError + '_ {
    move |source| TensorError::Io { path: path.to_path_buf(), source }
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

#[derive(Clone)]
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range within the shard file.
    start: usize,
    end: usize,
}

/// Read-only, memory-mapped view of the tensors of a model folder or of one safetensors file.
pub struct TensorStore {
    shards: Vec<Shard>,
    entries: HashMap<String, Entry>,
    /// Names in file order (shard, then offset), so iteration is deterministic and streaming
    /// consumers touch the file sequentially.
    order: Vec<String>,
}

impl TensorStore {
    /// Opens a Hugging Face model folder: `model.safetensors.index.json` with its shards when
    /// present, else `model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self, TensorError> {
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            let text = fs::read_to_string(&index).map_err(io_err(&index))?;
            let json: Value = serde_json::from_str(&text)
                .map_err(|e| TensorError::BadIndex { path: index.clone(), reason: e.to_string() })?;
            let map = json.get("weight_map").and_then(Value::as_object).ok_or_else(|| TensorError::BadIndex {
                path: index.clone(),
                reason: "no `weight_map` object".into(),
            })?;
            let mut files: Vec<String> = Vec::new();
            for v in map.values() {
                let f = v.as_str().ok_or_else(|| TensorError::BadIndex {
                    path: index.clone(),
                    reason: format!("weight_map value {v} is not a file name"),
                })?;
                if !files.iter().any(|x| x == f) {
                    files.push(f.to_string());
                }
            }
            files.sort();
            // A shard kept in place (`weights_ref`) is read where it is, once checked.
            let folder = crate::weights_ref::Folder::open(dir)?;
            let paths = files
                .iter()
                .map(|f| Ok(folder.resolve(f)?.unwrap_or_else(|| dir.join(f))))
                .collect::<Result<Vec<PathBuf>, TensorError>>()?;
            let store = Self::open_files(&paths)?;
            for (name, file) in map {
                let Some(e) = store.entries.get(name) else {
                    return Err(TensorError::BadIndex {
                        path: index.clone(),
                        reason: format!("lists `{name}` in {file}, but that shard does not hold it"),
                    });
                };
                let actual = &store.shards[e.shard].path;
                if actual.file_name().and_then(|s| s.to_str()) != file.as_str() {
                    return Err(TensorError::BadIndex {
                        path: index.clone(),
                        reason: format!("lists `{name}` in {file}, found in {}", actual.display()),
                    });
                }
            }
            return Ok(store);
        }
        if let Some(single) = crate::weights_ref::Folder::open(dir)?.resolve(SINGLE_FILE)? {
            return Self::open_files(&[single]);
        }
        Err(TensorError::NoWeights { dir: dir.to_path_buf() })
    }

    /// Opens one safetensors file (e.g. `adapter_model.safetensors`).
    pub fn open_file(path: &Path) -> Result<Self, TensorError> {
        Self::open_files(&[path.to_path_buf()])
    }

    fn open_files(paths: &[PathBuf]) -> Result<Self, TensorError> {
        let mut store = TensorStore { shards: Vec::new(), entries: HashMap::new(), order: Vec::new() };
        for path in paths {
            let file = File::open(path).map_err(io_err(path))?;
            // SAFETY: the file is opened read-only; newt never writes to a file it has mapped.
            // Another process truncating it underneath us is the usual mmap caveat.
            let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
            let parsed = parse_header(path, &mmap)?;
            let shard = store.shards.len();
            for (name, dtype, shape, start, end) in parsed {
                if let Some(prev) = store.entries.get(&name) {
                    return Err(TensorError::Duplicate {
                        name,
                        first: store.shards[prev.shard].path.clone(),
                        second: path.clone(),
                    });
                }
                store.order.push(name.clone());
                store.entries.insert(name, Entry { shard, dtype, shape, start, end });
            }
            store.shards.push(Shard { path: path.clone(), mmap });
        }
        Ok(store)
    }

    /// All tensor names, in file order.
    pub fn names(&self) -> Vec<String> {
        self.order.clone()
    }

    /// Dtype and shape of a tensor, without reading it.
    pub fn info(&self, name: &str) -> Option<(Dtype, Vec<usize>)> {
        self.entries.get(name).map(|e| (e.dtype, e.shape.clone()))
    }

    /// Size in bytes of a tensor's data.
    pub fn byte_len(&self, name: &str) -> Option<usize> {
        self.entries.get(name).map(|e| e.end - e.start)
    }

    /// The files this store maps.
    pub fn files(&self) -> Vec<PathBuf> {
        self.shards.iter().map(|s| s.path.clone()).collect()
    }

    /// A float tensor's values as f32 (f16 and bf16 are widened exactly; I32 is refused). The mapped pages are
    /// released afterwards (see [`TensorStore::release`]), so reading a model tensor by tensor
    /// keeps only the returned copy resident.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>, TensorError> {
        let (dtype, _, bytes) = self.read_raw(name)?;
        if dtype == Dtype::I32 {
            return Err(TensorError::BadTensor { name: name.into(), reason: "is I32, not a float tensor".into() });
        }
        let v = decode_f32(dtype, bytes);
        self.release(name);
        Ok(v)
    }

    /// Drops a tensor's mapped pages from this process's resident set. They stay in the OS
    /// page cache and are faulted back in if read again, so this only affects memory
    /// accounting (RSS), never the data. Touched pages of a file mapping otherwise count
    /// toward RSS until unmapped, which would make streaming over a model look like loading it.
    pub fn release(&self, name: &str) {
        #[cfg(unix)]
        if let Some(e) = self.entries.get(name) {
            // SAFETY: MADV_DONTNEED on a read-only shared file mapping discards nothing that
            // cannot be re-read from the file, which newt never writes while it is mapped.
            let _ = unsafe {
                self.shards[e.shard].mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    e.start,
                    e.end - e.start,
                )
            };
        }
    }

    /// A tensor of i32 values (quantization codes).
    pub fn read_i32(&self, name: &str) -> Result<Vec<i32>, TensorError> {
        let (dtype, _, bytes) = self.read_raw(name)?;
        if dtype != Dtype::I32 {
            return Err(TensorError::BadTensor { name: name.into(), reason: format!("is {dtype}, not I32") });
        }
        let v = bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        self.release(name);
        Ok(v)
    }

    /// A tensor's dtype, shape and little-endian bytes, borrowed from the mapping.
    pub fn read_raw(&self, name: &str) -> Result<(Dtype, Vec<usize>, &[u8]), TensorError> {
        let e = self.entries.get(name).ok_or_else(|| TensorError::NotFound(name.to_string()))?;
        let bytes = &self.shards[e.shard].mmap[e.start..e.end];
        Ok((e.dtype, e.shape.clone(), bytes))
    }
}

type HeaderEntry = (String, Dtype, Vec<usize>, usize, usize);

/// Parses and validates a safetensors header against the file length.
fn parse_header(path: &Path, bytes: &[u8]) -> Result<Vec<HeaderEntry>, TensorError> {
    let corrupt = |reason: String| TensorError::Corrupt { path: path.to_path_buf(), reason };
    if bytes.len() < 8 {
        return Err(corrupt(format!("file is {} bytes, shorter than the 8-byte header length", bytes.len())));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let data_start = 8u64.checked_add(n).filter(|&s| s <= bytes.len() as u64).ok_or_else(|| {
        corrupt(format!("header claims {n} bytes but the file has only {} after the length", bytes.len() - 8))
    })? as usize;
    let header: Map<String, Value> = serde_json::from_slice(&bytes[8..data_start])
        .map_err(|e| corrupt(format!("header is not a JSON object: {e}")))?;
    let data_len = bytes.len() - data_start;
    let mut out = Vec::with_capacity(header.len());
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let bad = |r: &str| corrupt(format!("tensor `{name}`: {r}"));
        let dt = v.get("dtype").and_then(Value::as_str).ok_or_else(|| bad("missing dtype"))?;
        let dtype = Dtype::from_safetensors(dt).ok_or_else(|| TensorError::UnsupportedDtype {
            path: path.to_path_buf(),
            name: name.clone(),
            dtype: dt.to_string(),
        })?;
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("missing shape"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("shape is not a list of non-negative integers"))?;
        let offs = v
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| bad("data_offsets is not [start, end]"))?;
        let (s, e) = (offs.0 as usize, offs.1 as usize);
        if s > e || e > data_len {
            return Err(bad(&format!(
                "data_offsets [{s}, {e}] exceed the {data_len} data bytes in the file (truncated?)"
            )));
        }
        let want = shape.iter().product::<usize>() * dtype.size();
        if e - s != want {
            return Err(bad(&format!("shape {shape:?} of {dtype} needs {want} bytes, data_offsets give {}", e - s)));
        }
        out.push((name, dtype, shape, data_start + s, data_start + e));
    }
    out.sort_by_key(|t| t.3);
    Ok(out)
}

/// Widens little-endian f32/f16/bf16 bytes to f32 (i32 values are converted, rounding past 2^24).
pub fn decode_f32(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::I32 => bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32).collect(),
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => {
            bytes.chunks_exact(2).map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect()
        }
        Dtype::BF16 => {
            bytes.chunks_exact(2).map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect()
        }
    }
}

/// Narrows f32 values to `dtype`'s little-endian bytes (round to nearest even).
pub fn encode_f32(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    match dtype {
        Dtype::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        Dtype::I32 => values.iter().for_each(|v| out.extend_from_slice(&(*v as i32).to_le_bytes())),
        Dtype::F16 => {
            values.iter().for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_bits().to_le_bytes()))
        }
        Dtype::BF16 => {
            values.iter().for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes()))
        }
    }
    out
}
