//! Safetensors writers: one small file in one go, or a streaming, sharded checkpoint.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use super::{Dtype, INDEX_FILE, SINGLE_FILE, TensorError, io_err};

fn check_tensor(name: &str, dtype: Dtype, shape: &[usize], len: usize) -> Result<(), TensorError> {
    let want = shape.iter().product::<usize>() * dtype.size();
    if want != len {
        return Err(TensorError::BadTensor {
            name: name.to_string(),
            reason: format!("shape {shape:?} of {dtype} needs {want} bytes, got {len}"),
        });
    }
    Ok(())
}

/// Serializes a header whose data section follows in the given order; padded with spaces to a
/// multiple of 8 bytes (as the reference writer does) so the data stays aligned when mapped.
fn header_bytes(entries: &[(String, Dtype, Vec<usize>, usize)]) -> Vec<u8> {
    let mut map = Map::new();
    map.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut off = 0usize;
    for (name, dtype, shape, len) in entries {
        map.insert(name.clone(), json!({ "dtype": dtype.as_str(), "shape": shape, "data_offsets": [off, off + len] }));
        off += len;
    }
    let mut h = serde_json::to_vec(&Value::Object(map)).expect("header serializes");
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out
}

/// Writes a small safetensors file in one go (adapters, test fixtures). Written to a temporary
/// name and renamed, so a crash never leaves a half-written file under `path`.
pub fn write_single(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) -> Result<(), TensorError> {
    let mut seen = std::collections::HashSet::new();
    for (name, dtype, shape, data) in tensors {
        check_tensor(name, *dtype, shape, data.len())?;
        if !seen.insert(name.as_str()) {
            return Err(TensorError::BadTensor { name: name.clone(), reason: "added twice".into() });
        }
    }
    let entries: Vec<_> = tensors.iter().map(|(n, d, s, b)| (n.clone(), *d, s.clone(), b.len())).collect();
    let tmp = tmp_name(path);
    let file = File::create(&tmp).map_err(io_err(&tmp))?;
    let mut w = BufWriter::new(file);
    w.write_all(&header_bytes(&entries)).map_err(io_err(&tmp))?;
    for (_, _, _, data) in tensors {
        w.write_all(data).map_err(io_err(&tmp))?;
    }
    w.into_inner().map_err(|e| e.into_error()).and_then(|f| f.sync_all()).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

fn tmp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// One shard being written: its data goes to a side file as tensors arrive, and the header
/// (known only once the shard is closed) is written in front of it at close.
struct OpenShard {
    data_path: PathBuf,
    data: BufWriter<File>,
    entries: Vec<(String, Dtype, Vec<usize>, usize)>,
    bytes: u64,
}

/// Streaming writer of a (possibly sharded) Hugging Face checkpoint. Memory use is one tensor:
/// tensor data is appended to a side file as it arrives, and when a shard closes its header is
/// written followed by a kernel-side copy of that data, so a whole shard is never buffered.
pub struct ShardedWriter {
    dir: PathBuf,
    max_shard_bytes: u64,
    /// Closed shards (temporary paths) and the names they hold.
    closed: Vec<(PathBuf, Vec<String>)>,
    current: Option<OpenShard>,
    names: std::collections::HashSet<String>,
    /// The tensor being streamed: name, dtype, shape, expected and written byte counts.
    pending: Option<(String, Dtype, Vec<usize>, usize, usize)>,
    /// Set when a streamed tensor went wrong: its partial bytes are in the shard, so nothing
    /// more may be written and `finish` refuses.
    poisoned: Option<String>,
    total_bytes: u64,
    finished: bool,
}

impl ShardedWriter {
    /// Starts writing into `dir` (created if missing); a shard is closed before a tensor would
    /// take it past `max_shard_bytes` (a single larger tensor gets a shard of its own).
    pub fn new(dir: &Path, max_shard_bytes: u64) -> Result<Self, TensorError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        Ok(ShardedWriter {
            dir: dir.to_path_buf(),
            max_shard_bytes: max_shard_bytes.max(1),
            closed: Vec::new(),
            current: None,
            names: Default::default(),
            pending: None,
            poisoned: None,
            total_bytes: 0,
            finished: false,
        })
    }

    /// Appends one tensor (little-endian bytes in `dtype`).
    pub fn add(&mut self, name: &str, dtype: Dtype, shape: &[usize], data: &[u8]) -> Result<(), TensorError> {
        check_tensor(name, dtype, shape, data.len())?;
        self.begin_tensor(name, dtype, shape)?;
        self.write_chunk(data)?;
        self.end_tensor()
    }

    /// Starts a tensor whose bytes will arrive in pieces through [`ShardedWriter::write_chunk`]
    /// and be closed by [`ShardedWriter::end_tensor`], so not even one whole tensor need be in
    /// memory at once.
    pub fn begin_tensor(&mut self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<(), TensorError> {
        self.check_poisoned()?;
        if let Some(p) = &self.pending {
            return Err(TensorError::BadTensor { name: p.0.clone(), reason: format!("not ended before `{name}`") });
        }
        if !self.names.insert(name.to_string()) {
            return Err(TensorError::BadTensor { name: name.to_string(), reason: "added twice".into() });
        }
        let len = shape.iter().product::<usize>() * dtype.size();
        if self.current.as_ref().is_some_and(|c| !c.entries.is_empty() && c.bytes + len as u64 > self.max_shard_bytes) {
            self.close_shard()?;
        }
        if self.current.is_none() {
            let data_path = self.dir.join(format!(".newt-shard-{:05}.data", self.closed.len() + 1));
            let f = File::create(&data_path).map_err(io_err(&data_path))?;
            self.current = Some(OpenShard {
                data_path,
                data: BufWriter::with_capacity(1 << 20, f),
                entries: Vec::new(),
                bytes: 0,
            });
        }
        self.pending = Some((name.to_string(), dtype, shape.to_vec(), len, 0));
        Ok(())
    }

    /// Appends the next bytes of the tensor begun by [`ShardedWriter::begin_tensor`].
    pub fn write_chunk(&mut self, data: &[u8]) -> Result<(), TensorError> {
        let Some((name, _, _, len, written)) = self.pending.as_mut() else {
            return Err(TensorError::BadTensor {
                name: String::new(),
                reason: "write_chunk without begin_tensor".into(),
            });
        };
        if *written + data.len() > *len {
            let reason = format!("{} bytes written, more than its {len}", *written + data.len());
            self.poisoned = Some(format!("`{name}`: {reason}"));
            return Err(TensorError::BadTensor { name: name.clone(), reason });
        }
        *written += data.len();
        let cur = self.current.as_mut().expect("begin_tensor opened a shard");
        cur.data.write_all(data).map_err(io_err(&cur.data_path))
    }

    /// Ends the tensor begun by [`ShardedWriter::begin_tensor`]; all its bytes must have come.
    pub fn end_tensor(&mut self) -> Result<(), TensorError> {
        let Some((name, dtype, shape, len, written)) = self.pending.take() else {
            return Err(TensorError::BadTensor {
                name: String::new(),
                reason: "end_tensor without begin_tensor".into(),
            });
        };
        if written != len {
            let reason = format!("{written} of its {len} bytes written");
            self.poisoned = Some(format!("`{name}`: {reason}"));
            return Err(TensorError::BadTensor { name, reason });
        }
        let cur = self.current.as_mut().expect("begin_tensor opened a shard");
        cur.entries.push((name, dtype, shape, len));
        cur.bytes += len as u64;
        self.total_bytes += len as u64;
        Ok(())
    }

    fn check_poisoned(&self) -> Result<(), TensorError> {
        match &self.poisoned {
            None => Ok(()),
            Some(why) => Err(TensorError::BadTensor {
                name: String::new(),
                reason: format!("the writer is unusable after an earlier error ({why})"),
            }),
        }
    }

    fn close_shard(&mut self) -> Result<(), TensorError> {
        let Some(cur) = self.current.take() else {
            return Ok(());
        };
        let OpenShard { data_path, data, entries, .. } = cur;
        data.into_inner().map_err(|e| e.into_error()).map_err(io_err(&data_path))?;
        let shard_path = self.dir.join(format!(".newt-shard-{:05}.safetensors", self.closed.len() + 1));
        let mut out = File::create(&shard_path).map_err(io_err(&shard_path))?;
        out.write_all(&header_bytes(&entries)).map_err(io_err(&shard_path))?;
        let mut src = File::open(&data_path).map_err(io_err(&data_path))?;
        // io::copy uses copy_file_range on Linux: the bytes never pass through our memory.
        io::copy(&mut src, &mut out).map_err(io_err(&shard_path))?;
        out.sync_all().map_err(io_err(&shard_path))?;
        fs::remove_file(&data_path).map_err(io_err(&data_path))?;
        self.closed.push((shard_path, entries.into_iter().map(|e| e.0).collect()));
        Ok(())
    }

    /// Closes the last shard and gives the shards their final names: `model.safetensors` when
    /// there is one, else `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`.
    /// Returns the files written.
    pub fn finish(mut self) -> Result<Vec<PathBuf>, TensorError> {
        self.check_poisoned()?;
        if let Some(p) = &self.pending {
            return Err(TensorError::BadTensor { name: p.0.clone(), reason: "begun but never ended".into() });
        }
        self.close_shard()?;
        if self.closed.is_empty() {
            // An empty checkpoint is still a valid file; callers decide whether it makes sense.
            let p = self.dir.join(SINGLE_FILE);
            write_single(&p, &[])?;
            self.finished = true;
            return Ok(vec![p]);
        }
        let n = self.closed.len();
        let mut written = Vec::new();
        if n == 1 {
            let p = self.dir.join(SINGLE_FILE);
            fs::rename(&self.closed[0].0, &p).map_err(io_err(&p))?;
            written.push(p);
        } else {
            let mut weight_map = BTreeMap::new();
            for (i, (tmp, names)) in self.closed.iter().enumerate() {
                let fname = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
                let p = self.dir.join(&fname);
                fs::rename(tmp, &p).map_err(io_err(&p))?;
                for name in names {
                    weight_map.insert(name.clone(), fname.clone());
                }
                written.push(p);
            }
            let index = json!({
                "metadata": { "total_size": self.total_bytes },
                "weight_map": weight_map,
            });
            let p = self.dir.join(INDEX_FILE);
            let text = serde_json::to_string_pretty(&index).expect("index serializes");
            fs::write(&p, text + "\n").map_err(io_err(&p))?;
            written.push(p);
        }
        self.finished = true;
        Ok(written)
    }
}

impl Drop for ShardedWriter {
    /// An abandoned writer removes its temporary files so no partial checkpoint is left behind.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Some(cur) = self.current.take() {
            drop(cur.data);
            let _ = fs::remove_file(&cur.data_path);
        }
        for (p, _) in &self.closed {
            let _ = fs::remove_file(p);
        }
    }
}
