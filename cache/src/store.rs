//! Stage results: staging directories, publish (verify, hash, move into `objects/`, then write
//! the manifest), and lookup of manifests by key.
//!
//! The manifest is the only mark of a result. An object directory without a manifest, or a
//! staging directory left by a killed process, is never mistaken for one; gc removes both.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::io_err;
use crate::filehash::{FileEntry, hash_tree, tree_digest};
use crate::fsutil::{fsync_dir, now_unix, remove_all, seal_dirs, seal_files, unseal_top, write_atomic};
use crate::lock::InUse;
use crate::verify::Reread;
use crate::{Cache, CacheError, Digest};

/// Version of the manifest layout; a manifest of another version is a miss.
pub const MANIFEST_FORMAT: u32 = 1;

/// What the caller knows about a stage result when publishing it.
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestMeta {
    /// Stage id in the pipeline, e.g. `tokenize.alpaca`.
    pub stage_id: String,
    /// Stage kind, e.g. `tokenize`.
    pub kind: String,
    /// The stage key this result is stored under.
    pub key: Digest,
    /// The structured inputs of the key, stored verbatim so `newt why` can diff them.
    pub key_inputs: serde_json::Value,
    /// Stage statistics (rows, packing efficiency, final loss, ...).
    pub summary: serde_json::Value,
    /// How long the stage ran.
    pub elapsed_ms: u64,
}

/// A published stage result: `manifests/<key>.json`, pointing at `objects/<output>/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`] at the time of writing.
    pub format: u32,
    /// The stage key.
    pub key: Digest,
    /// The tree digest of the output directory (the object's name).
    pub output: Digest,
    /// Stage id in the pipeline.
    pub stage_id: String,
    /// Stage kind.
    pub kind: String,
    /// The key's structured inputs, verbatim.
    pub key_inputs: serde_json::Value,
    /// Stage statistics.
    pub summary: serde_json::Value,
    /// Every file of the output, sorted by path.
    pub files: Vec<FileEntry>,
    /// When the result was published (seconds since the Unix epoch).
    pub created_unix: u64,
    /// How long the stage ran.
    pub elapsed_ms: u64,
    /// Version of newt that wrote it.
    pub newt_version: String,
}

/// The answer of [`Cache::lookup`]: a manifest on a hit, and warnings about anything found
/// broken on the way (a broken result is a miss, never an error).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Lookup {
    /// The valid manifest, or `None` for a miss.
    pub manifest: Option<Manifest>,
    /// Human-readable reasons why an existing manifest was not used.
    pub warnings: Vec<String>,
}

impl Lookup {
    /// Whether this is a cache hit.
    pub fn is_hit(&self) -> bool {
        self.manifest.is_some()
    }
}

/// A fresh directory inside the cache where a stage writes its outputs. Removed when dropped
/// unless published. Create it while holding the key's [`crate::KeyLock`].
#[derive(Debug)]
pub struct Staging {
    key: Digest,
    dir: PathBuf,
    published: bool,
    _in_use: InUse,
}

impl Staging {
    /// The directory the stage writes into (empty when created).
    pub fn out_dir(&self) -> &Path {
        &self.dir
    }

    /// The key this staging area was created for.
    pub fn key(&self) -> Digest {
        self.key
    }

    /// Its directory has moved into the store: dropping it must not remove anything.
    pub(crate) fn mark_published(&mut self) {
        self.published = true;
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            let _ = remove_all(&self.dir);
        }
    }
}

impl Cache {
    /// The manifest stored under `key`, validated: a missing one is `None`; one that is corrupt,
    /// of another format, or whose object is missing, incomplete or holds other bytes than its
    /// digests say is `None` plus a warning (the stage runs again).
    ///
    /// The object's bytes are checked through its stat record: files unchanged (device, inode,
    /// size, mtime, ctime) since they were last found intact are not read again, any other file
    /// is hashed and compared with the manifest. So a no-op rerun stays a few `stat` calls
    /// however big the outputs, and a file edited in place (even with its size and mtime put
    /// back: ctime cannot be) is a miss with a warning. Bit rot that changes no stat is for
    /// [`Cache::verify`], and for the check [`crate::export_file`] makes while copying.
    pub fn lookup(&self, key: &Digest) -> Result<Lookup, CacheError> {
        self.read_manifest(key, Some(Reread::Changed))
    }

    /// [`Cache::lookup`] that checks files and sizes but reads no bytes: for listings and gc,
    /// which must not read a whole store.
    pub(crate) fn lookup_shallow(&self, key: &Digest) -> Result<Lookup, CacheError> {
        self.read_manifest(key, None)
    }

    fn read_manifest(&self, key: &Digest, reread: Option<Reread>) -> Result<Lookup, CacheError> {
        let path = self.manifest_path(key);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Lookup::default()),
            Err(e) => return Err(CacheError::Io { action: "read", path, source: e }),
        };
        Ok(match self.validate_manifest(key, &bytes, reread) {
            Ok(manifest) => Lookup { manifest: Some(manifest), warnings: Vec::new() },
            Err(problem) => Lookup {
                manifest: None,
                warnings: vec![format!(
                    "ignoring cached result {}: {problem}; the stage will run again",
                    path.display()
                )],
            },
        })
    }

    fn validate_manifest(&self, key: &Digest, bytes: &[u8], reread: Option<Reread>) -> Result<Manifest, String> {
        let manifest = parse_manifest(key, bytes)?;
        let object = self.object_path(&manifest.output);
        if !object.is_dir() {
            return Err(format!("its output {} is missing", object.display()));
        }
        match reread {
            Some(reread) => {
                let damage = self
                    .check_object(&object, &manifest.files, reread)
                    .map_err(|e| format!("its output could not be checked ({e})"))?;
                if let Some(first) = damage.first() {
                    let more = match damage.len() {
                        1 => String::new(),
                        n => format!(" (and {} more problems)", n - 1),
                    };
                    return Err(format!("{first}{more}"));
                }
            }
            None => {
                for file in &manifest.files {
                    let file_path = object.join(&file.path);
                    match fs::metadata(&file_path) {
                        Ok(m) if m.is_file() && m.len() == file.size => {}
                        Ok(_) => return Err(format!("output file {} has changed", file_path.display())),
                        Err(_) => return Err(format!("output file {} is missing", file_path.display())),
                    }
                }
            }
        }
        Ok(manifest)
    }

    /// A new, empty staging directory for `key`, inside the cache so publishing is a rename.
    pub fn staging(&self, key: &Digest) -> Result<Staging, CacheError> {
        let in_use = self.in_use()?;
        let tmp = self.tmp_dir();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{key}."))
            .rand_bytes(8)
            .tempdir_in(&tmp)
            .map_err(io_err("create a staging directory in", &tmp))?
            .keep();
        Ok(Staging { key: *key, dir, published: false, _in_use: in_use })
    }

    /// Verifies and stores a stage's outputs, then writes its manifest (last, atomically).
    ///
    /// The output directory must exist and contain each path of `required`; every file is made
    /// read-only (0444; a file hard-linked from elsewhere is copied first), hashed (symlinks
    /// are rejected) and fsynced, and the tree moves to `objects/<digest>/`, whose directories
    /// become 0555 (when an intact identical object exists the staging copy is dropped instead).
    pub fn publish(&self, mut staging: Staging, meta: ManifestMeta, required: &[&str]) -> Result<Manifest, CacheError> {
        let out = staging.dir.clone();
        if meta.key != staging.key {
            return Err(CacheError::KeyMismatch { path: out, staging: staging.key, meta: meta.key });
        }
        if !out.is_dir() {
            return Err(CacheError::OutputDirMissing { path: out });
        }
        for req in required {
            let rel = Path::new(req);
            if rel.as_os_str().is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
                return Err(CacheError::InvalidRequiredPath { path: out, required: req.to_string() });
            }
            if fs::symlink_metadata(out.join(rel)).is_err() {
                return Err(CacheError::MissingRequiredOutput { path: out, required: req.to_string() });
            }
        }
        seal_files(&out)?;
        let (output, files) = hash_tree(&out)?;
        sync_tree(&out)?;
        self.place_object(&out, &output, &files)?;
        staging.published = true;

        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            key: meta.key,
            output,
            stage_id: meta.stage_id,
            kind: meta.kind,
            key_inputs: meta.key_inputs,
            summary: meta.summary,
            files,
            created_unix: now_unix(),
            elapsed_ms: meta.elapsed_ms,
            newt_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let path = self.manifest_path(&manifest.key);
        let json = serde_json::to_vec_pretty(&manifest).map_err(|source| CacheError::Json {
            action: "write",
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &json)?;
        Ok(manifest)
    }

    /// Moves the verified staging tree `out` to `objects/<output>`, or drops it when an intact
    /// identical object is already there (checked like a hit: a damaged one left by a corrupt
    /// hit must not survive its stage's re-run). A damaged object of that name is replaced.
    pub(crate) fn place_object(&self, out: &Path, output: &Digest, files: &[FileEntry]) -> Result<(), CacheError> {
        let object = self.object_path(output);
        let intact = |object: &Path| {
            object.is_dir() && self.check_object(object, files, Reread::Changed).is_ok_and(|d| d.is_empty())
        };
        if object.exists() {
            if intact(&object) {
                return remove_all(out);
            }
            self.discard(&object)?;
        }
        if let Err(e) = fs::rename(out, &object) {
            // Another process published the same bytes between our check and the rename.
            if intact(&object) {
                return remove_all(out);
            }
            return Err(CacheError::Io { action: "move a staging directory to", path: object, source: e });
        }
        seal_dirs(&object)?;
        fsync_dir(&self.objects_dir())?;
        fsync_dir(&self.tmp_dir())
    }

    /// Removes a directory in the store by first renaming it into `tmp/` (so a half-deleted
    /// tree is never visible under its own name), then deleting it.
    pub(crate) fn discard(&self, path: &Path) -> Result<(), CacheError> {
        let trash = self.tmp_dir().join(format!("trash.{}", crate::fsutil::now_ns()));
        unseal_top(path);
        match fs::rename(path, &trash) {
            Ok(()) => remove_all(&trash),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CacheError::Io { action: "move to trash", path: path.to_path_buf(), source: e }),
        }
    }

    /// Every valid manifest in the cache, oldest first (for `newt cache ls`). Broken ones are
    /// skipped; [`Cache::lookup`] explains them. Objects are checked for their files and sizes
    /// only (a listing must not read the whole store): [`Cache::lookup`] and [`Cache::verify`]
    /// compare bytes.
    pub fn manifests(&self) -> Result<Vec<Manifest>, CacheError> {
        let mut out = Vec::new();
        for key in self.manifest_keys()? {
            if let Some(m) = self.lookup_shallow(&key)?.manifest {
                out.push(m);
            }
        }
        out.sort_by_key(|m| (m.created_unix, m.key));
        Ok(out)
    }

    /// Keys that have a manifest file (valid or not).
    pub(crate) fn manifest_keys(&self) -> Result<Vec<Digest>, CacheError> {
        Ok(digest_names(&self.manifests_dir(), ".json")?.into_keys().collect())
    }

    /// Objects present in the store.
    pub(crate) fn object_digests(&self) -> Result<Vec<Digest>, CacheError> {
        Ok(digest_names(&self.objects_dir(), "")?.into_keys().collect())
    }

    /// Resolves a hex prefix (as printed by `newt cache ls`) to the one object digest or
    /// manifest key it starts. `Ok(None)` when nothing matches or `prefix` is not hex;
    /// an error when it is ambiguous.
    pub fn find_object(&self, prefix: &str) -> Result<Option<Digest>, CacheError> {
        let prefix = prefix.to_ascii_lowercase();
        if prefix.is_empty() || prefix.len() > 64 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let all: BTreeSet<Digest> = self.object_digests()?.into_iter().chain(self.manifest_keys()?).collect();
        let matches: Vec<Digest> = all.into_iter().filter(|d| d.to_string().starts_with(&prefix)).collect();
        match matches.len() {
            0 => Ok(None),
            1 => Ok(Some(matches[0])),
            count => Err(CacheError::AmbiguousPrefix { prefix, count, path: self.root().to_path_buf() }),
        }
    }
}

/// Entries of `dir` named `<64 hex><suffix>`, by digest.
pub(crate) fn digest_names(dir: &Path, suffix: &str) -> Result<BTreeMap<Digest, PathBuf>, CacheError> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(hex) = name.strip_suffix(suffix) else { continue };
        if let Ok(d) = hex.parse::<Digest>() {
            out.insert(d, entry.path());
        }
    }
    Ok(out)
}

/// A manifest's bytes, checked for everything that needs no object: JSON, format, key, and a
/// file list that hashes to the output digest (so the list a hit is checked against is the one
/// the object is named by).
pub(crate) fn parse_manifest(key: &Digest, bytes: &[u8]) -> Result<Manifest, String> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("manifest is not valid JSON ({e})"))?;
    match value.get("format").and_then(serde_json::Value::as_u64) {
        Some(f) if f == u64::from(MANIFEST_FORMAT) => {}
        Some(f) => return Err(format!("manifest format {f} is not the format {MANIFEST_FORMAT} this newt reads")),
        None => return Err("manifest has no format version".to_string()),
    }
    let manifest: Manifest = serde_json::from_value(value).map_err(|e| format!("manifest is incomplete ({e})"))?;
    if manifest.key != *key {
        return Err(format!("manifest names key {} instead of {key}", manifest.key.short()));
    }
    let sorted = manifest.files.windows(2).all(|w| w[0].path < w[1].path);
    if !sorted || tree_digest(&manifest.files) != manifest.output {
        return Err(format!("manifest's file list does not hash to its output {}", manifest.output.short()));
    }
    Ok(manifest)
}

/// fsyncs every file and directory of a tree, so that once the manifest is durable, so is
/// everything it points to.
pub(crate) fn sync_tree(dir: &Path) -> Result<(), CacheError> {
    for entry in walkdir::WalkDir::new(dir) {
        let entry = entry.map_err(|source| crate::filehash::walk_err(dir, source))?;
        let path = entry.path();
        if entry.file_type().is_dir() {
            fsync_dir(path)?;
        } else {
            fs::File::open(path).and_then(|f| f.sync_all()).map_err(io_err("fsync", path))?;
        }
    }
    Ok(())
}
