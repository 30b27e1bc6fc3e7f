//! Weights kept in place: a model folder whose safetensors shards are not copied but named, with
//! their size, modification time and blake3 digest, in [`REFS_FILE`].
//!
//! The fetch stage writes such a folder for a local model folder or a Hub snapshot, so an 8B
//! model's 16 GB are not copied into the cache beside the original. A reference is only as good
//! as the file it names: [`resolve`] checks it before anything reads it (size and modification
//! time as recorded, else the digest, re-hashed), and refuses a file that changed or went away,
//! naming it. The fetch stage's key covers the files' contents, so `newt run` after such a change
//! fetches again; the check guards results read later (`newt serve`, `newt inference`) against a
//! source edited in between. Such a folder names files of this machine: the remote cache does not
//! share it (`newt_cache::LOCAL_REFS_FILE`, which is this file's name).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The references of a model folder, beside its config (the name the remote cache refuses to
/// upload).
pub const REFS_FILE: &str = newt_cache::LOCAL_REFS_FILE;

/// One weight file kept where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightRef {
    /// Its name in the model folder (`model-00001-of-00004.safetensors`).
    pub name: String,
    /// Where it is (absolute, links resolved).
    pub source: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Its modification time (ns since the epoch) when it was hashed.
    pub mtime_ns: i128,
    /// Its blake3 digest, hex.
    pub blake3: String,
}

/// The contents of [`REFS_FILE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightRefs {
    /// Format of this file (1).
    pub format: u32,
    /// The referenced files.
    pub files: Vec<WeightRef>,
}

/// Why a referenced weight file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RefError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a valid weights reference file: {reason}")]
    Bad { path: PathBuf, reason: String },
    #[error("{name} of {dir} is kept at {source_path}, which {what}; run `newt run` again to fetch the model anew")]
    Changed { dir: PathBuf, name: String, source_path: PathBuf, what: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RefError + '_ {
    move |source| RefError::Io { path: path.to_path_buf(), source }
}

/// Modification time of `meta` in ns since the epoch (0 where the platform has none).
pub fn mtime_ns(meta: &fs::Metadata) -> i128 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// The references of `dir`, if it has any.
pub fn read(dir: &Path) -> Result<Option<WeightRefs>, RefError> {
    let path = dir.join(REFS_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(RefError::Io { path, source: e }),
    };
    let refs: WeightRefs =
        serde_json::from_str(&text).map_err(|e| RefError::Bad { path: path.clone(), reason: e.to_string() })?;
    if refs.format != 1 {
        return Err(RefError::Bad { path, reason: format!("format {} (this version reads 1)", refs.format) });
    }
    Ok(Some(refs))
}

/// Writes `refs` as `dir`'s references.
pub fn write(dir: &Path, refs: &WeightRefs) -> Result<(), RefError> {
    let path = dir.join(REFS_FILE);
    let text = serde_json::to_string_pretty(refs).expect("references serialize");
    fs::write(&path, text + "\n").map_err(io_err(&path))
}

/// A model folder's weight files, in it or by reference; the reference file is read once.
#[derive(Debug)]
pub struct Folder {
    dir: PathBuf,
    refs: Vec<WeightRef>,
}

impl Folder {
    /// `dir` and its references (none when it has no [`REFS_FILE`]).
    pub fn open(dir: &Path) -> Result<Self, RefError> {
        Ok(Folder { dir: dir.to_path_buf(), refs: read(dir)?.map(|r| r.files).unwrap_or_default() })
    }

    /// Whether the folder has the weight file `name`, in it or by reference (unchecked).
    pub fn has(&self, name: &str) -> bool {
        self.dir.join(name).is_file() || self.refs.iter().any(|f| f.name == name)
    }

    /// The path to read the weight file `name` from: the file in the folder, else the file its
    /// reference names, once checked (its size and modification time as recorded, or else its
    /// blake3 digest). `None` when the folder has neither.
    pub fn resolve(&self, name: &str) -> Result<Option<PathBuf>, RefError> {
        let local = self.dir.join(name);
        if local.is_file() {
            return Ok(Some(local));
        }
        let Some(r) = self.refs.iter().find(|f| f.name == name) else { return Ok(None) };
        check(&self.dir, r)?;
        Ok(Some(r.source.clone()))
    }
}

fn check(dir: &Path, r: &WeightRef) -> Result<(), RefError> {
    let changed = |what: String| RefError::Changed {
        dir: dir.to_path_buf(),
        name: r.name.clone(),
        source_path: r.source.clone(),
        what,
    };
    let meta = match fs::metadata(&r.source) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(changed("is gone".into())),
        Err(e) => return Err(RefError::Io { path: r.source.clone(), source: e }),
    };
    if meta.len() != r.size {
        return Err(changed(format!("now has {} bytes, not {}", meta.len(), r.size)));
    }
    if mtime_ns(&meta) == r.mtime_ns {
        return Ok(());
    }
    // Touched since: its bytes decide.
    let digest = newt_cache::hash_file(&r.source)
        .map_err(|e| RefError::Io { path: r.source.clone(), source: io::Error::other(e.to_string()) })?;
    if digest.to_string() != r.blake3 {
        return Err(changed("has other contents than when it was fetched".into()));
    }
    Ok(())
}

/// A reference to `source` under `name`, given its digest (the caller hashes: the fetch stage
/// has the digests of its input folder already).
pub fn reference(name: &str, source: &Path, blake3: String) -> Result<WeightRef, RefError> {
    let source = fs::canonicalize(source).map_err(io_err(source))?;
    let meta = fs::metadata(&source).map_err(io_err(&source))?;
    Ok(WeightRef { name: name.to_string(), size: meta.len(), mtime_ns: mtime_ns(&meta), source, blake3 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(p: &Path) -> String {
        blake3::hash(&fs::read(p).unwrap()).to_hex().to_string()
    }

    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src.safetensors");
        fs::write(&src, b"weights v1").unwrap();
        let dir = tmp.path().join("model");
        fs::create_dir(&dir).unwrap();
        let r = reference("model.safetensors", &src, digest(&src)).unwrap();
        write(&dir, &WeightRefs { format: 1, files: vec![r] }).unwrap();
        (tmp, dir, src)
    }

    #[test]
    fn a_reference_resolves_to_its_source_and_a_local_file_wins() {
        let (_tmp, dir, src) = setup();
        let folder = Folder::open(&dir).unwrap();
        assert!(folder.has("model.safetensors"));
        assert!(!folder.has("other.safetensors"));
        assert_eq!(folder.resolve("model.safetensors").unwrap(), Some(fs::canonicalize(&src).unwrap()));
        assert_eq!(folder.resolve("other.safetensors").unwrap(), None);
        fs::write(dir.join("model.safetensors"), b"local").unwrap();
        assert_eq!(folder.resolve("model.safetensors").unwrap(), Some(dir.join("model.safetensors")));
    }

    #[test]
    fn a_changed_or_missing_source_is_refused_and_a_touched_one_is_rehashed() {
        let (_tmp, dir, src) = setup();
        let resolve = |name: &str| Folder::open(&dir).unwrap().resolve(name);
        // Same bytes, newer time: the digest decides, and it still matches.
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        fs::File::options().write(true).open(&src).unwrap().set_modified(later).unwrap();
        assert!(resolve("model.safetensors").unwrap().is_some());
        // Same size, other bytes.
        fs::write(&src, b"weights v2").unwrap();
        let msg = resolve("model.safetensors").unwrap_err().to_string();
        assert!(msg.contains("other contents") && msg.contains("newt run"), "{msg}");
        // Other size.
        fs::write(&src, b"w").unwrap();
        assert!(resolve("model.safetensors").unwrap_err().to_string().contains("now has 1 bytes"));
        fs::remove_file(&src).unwrap();
        assert!(resolve("model.safetensors").unwrap_err().to_string().contains("is gone"));
    }

    #[test]
    fn a_reference_file_of_another_format_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(REFS_FILE), r#"{"format": 2, "files": []}"#).unwrap();
        assert!(read(tmp.path()).unwrap_err().to_string().contains("format 2"));
        fs::write(tmp.path().join(REFS_FILE), "not json").unwrap();
        assert!(read(tmp.path()).is_err());
    }
}
