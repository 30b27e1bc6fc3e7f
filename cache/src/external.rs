//! Content digests of external inputs (datasets, model weights) with a persistent stat cache,
//! so an unchanged 16 GB weights folder costs a few `stat` calls per run, not a re-hash.
//!
//! One record per input path lives in `v1/stat/<hash of the canonical path>.json`, holding for
//! each file its (device, inode, size, mtime, ctime) and digest. A file whose stat differs is
//! hashed again. A file modified within [`RACY_WINDOW_NS`] of being hashed is not recorded:
//! a later write in the same timestamp tick would otherwise go unnoticed (git's "racy clean").

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use crate::error::io_err;
use crate::filehash::{FileEntry, hash_file_sized, relative_path, tree_digest, walk_err};
use crate::fsutil::{now_ns, write_atomic};
use crate::{Cache, CacheError, Digest, hash_bytes};

/// A file whose mtime is this close to the moment it was hashed is not trusted by the stat
/// cache (it is hashed again next time).
pub const RACY_WINDOW_NS: i64 = 2_000_000_000;

const STAT_FORMAT: u32 = 1;
const STAT_PATH_CONTEXT: &str = "newt-cache 2026 stat record path v1";

/// What identifies an unchanged file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct FileStat {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl FileStat {
    fn of(meta: &fs::Metadata) -> Self {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            FileStat {
                dev: meta.dev(),
                ino: meta.ino(),
                size: meta.size(),
                mtime_ns: meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec()),
                ctime_ns: meta.ctime().saturating_mul(1_000_000_000).saturating_add(meta.ctime_nsec()),
            }
        }
        #[cfg(not(unix))]
        {
            let mtime_ns = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as i64);
            FileStat { dev: 0, ino: 0, size: meta.len(), mtime_ns, ctime_ns: 0 }
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StatEntry {
    stat: FileStat,
    digest: Digest,
}

/// The persisted record of one external input (or of one object of the store, which
/// [`Cache::lookup`] checks the same way).
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct StatRecord {
    format: u32,
    /// The canonical path, for humans and for gc (records of vanished paths are dropped).
    pub(crate) path: String,
    /// Relative path ("" for a single file) to its last trusted stat and digest.
    entries: BTreeMap<String, StatEntry>,
}

impl StatRecord {
    /// An empty record for the same path, to fill with what is trusted now.
    pub(crate) fn fresh(&self) -> StatRecord {
        StatRecord { format: STAT_FORMAT, path: self.path.clone(), entries: BTreeMap::new() }
    }
}

/// Counters of hashing through the stat cache since this [`Cache`] was opened: external inputs
/// ([`Cache::hash_external`]) and the objects a [`Cache::lookup`] checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Files whose contents were read and hashed.
    pub files_hashed: u64,
    /// Bytes read by those hashes.
    pub bytes_hashed: u64,
    /// Files whose digest came from the stat cache without reading them.
    pub stat_cache_hits: u64,
}

impl Cache {
    /// The content digest of an external input: `blake3(contents)` for a file, the tree digest
    /// (as [`crate::hash_tree`]) for a directory. Symbolic links are followed. Unchanged files
    /// (same device, inode, size, mtime, ctime) are not read again, across processes.
    pub fn hash_external(&self, path: &Path) -> Result<Digest, CacheError> {
        Ok(self.hash_external_files(path)?.0)
    }

    /// As [`Cache::hash_external`], with the digest of each file: for a directory its files
    /// (paths relative to it, sorted), for a file one entry with the path "". A stage that reads
    /// an input the executor hashed for its key gets the digests from the stat cache, unread.
    pub fn hash_external_files(&self, path: &Path) -> Result<(Digest, Vec<FileEntry>), CacheError> {
        let canonical = fs::canonicalize(path).map_err(io_err("resolve", path))?;
        let meta = fs::metadata(&canonical).map_err(io_err("read metadata of", &canonical))?;
        let (record_path, old) = self.read_stat_record(&canonical);
        let mut new = old.fresh();

        let (digest, files) = if meta.is_file() {
            let (digest, size) = self.file_digest(&canonical, "", &old, &mut new)?;
            (digest, vec![FileEntry { path: String::new(), size, digest }])
        } else if meta.is_dir() {
            let mut files = Vec::new();
            for entry in walkdir::WalkDir::new(&canonical).min_depth(1).follow_links(true) {
                let entry = entry.map_err(|source| walk_err(&canonical, source))?;
                let ft = entry.file_type();
                if ft.is_dir() {
                    continue;
                }
                if !ft.is_file() {
                    return Err(CacheError::UnsupportedFileType { path: entry.into_path() });
                }
                let rel = relative_path(&canonical, entry.path())?;
                let (digest, size) = self.file_digest(entry.path(), &rel, &old, &mut new)?;
                files.push(FileEntry { path: rel, size, digest });
            }
            files.sort_by(|a, b| a.path.cmp(&b.path));
            (tree_digest(&files), files)
        } else {
            return Err(CacheError::UnsupportedFileType { path: canonical });
        };

        self.write_stat_record(&record_path, &old, &new)?;
        Ok((digest, files))
    }

    /// The stat record of `canonical` (a canonical path) and where it lives; an empty record
    /// when there is none or it is unreadable.
    pub(crate) fn read_stat_record(&self, canonical: &Path) -> (PathBuf, StatRecord) {
        let record_path = self
            .stat_dir()
            .join(format!("{}.json", hash_bytes(STAT_PATH_CONTEXT, &[canonical.as_os_str().as_encoded_bytes()])));
        let path_str = canonical.to_string_lossy().into_owned();
        let old = fs::read(&record_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<StatRecord>(&b).ok())
            .filter(|r| r.format == STAT_FORMAT && r.path == path_str)
            .unwrap_or_else(|| StatRecord { format: STAT_FORMAT, path: path_str, entries: BTreeMap::new() });
        (record_path, old)
    }

    /// Writes `new` at `record_path` unless it says the same as `old`.
    pub(crate) fn write_stat_record(
        &self,
        record_path: &Path,
        old: &StatRecord,
        new: &StatRecord,
    ) -> Result<(), CacheError> {
        let changed = new.entries.len() != old.entries.len()
            || new
                .entries
                .iter()
                .any(|(k, v)| old.entries.get(k).is_none_or(|o| o.stat != v.stat || o.digest != v.digest));
        if changed {
            let json = serde_json::to_vec(new).map_err(|source| CacheError::Json {
                action: "write",
                path: record_path.to_path_buf(),
                source,
            })?;
            write_atomic(record_path, &json)?;
        }
        Ok(())
    }

    /// Counters of hashing work done through the stat cache on this handle
    /// ([`Cache::hash_external`], the object checks of [`Cache::lookup`] and [`Cache::verify`]).
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            files_hashed: self.counters.files_hashed.load(Ordering::Relaxed),
            bytes_hashed: self.counters.bytes_hashed.load(Ordering::Relaxed),
            stat_cache_hits: self.counters.stat_cache_hits.load(Ordering::Relaxed),
        }
    }

    /// Digest and size of one file, from `old` when its stat is unchanged; records trusted
    /// results in `new` under `rel`.
    pub(crate) fn file_digest(
        &self,
        path: &Path,
        rel: &str,
        old: &StatRecord,
        new: &mut StatRecord,
    ) -> Result<(Digest, u64), CacheError> {
        let stat = FileStat::of(&fs::metadata(path).map_err(io_err("read metadata of", path))?);
        if let Some(entry) = old.entries.get(rel).filter(|e| e.stat == stat) {
            self.counters.stat_cache_hits.fetch_add(1, Ordering::Relaxed);
            new.entries.insert(rel.to_string(), entry.clone());
            return Ok((entry.digest, stat.size));
        }
        // A file that changes while being read has no single digest; retry a few times.
        for _ in 0..3 {
            let before = FileStat::of(&fs::metadata(path).map_err(io_err("read metadata of", path))?);
            let (digest, bytes) = hash_file_sized(path)?;
            self.counters.files_hashed.fetch_add(1, Ordering::Relaxed);
            self.counters.bytes_hashed.fetch_add(bytes, Ordering::Relaxed);
            let after = FileStat::of(&fs::metadata(path).map_err(io_err("read metadata of", path))?);
            if before != after || bytes != after.size {
                continue;
            }
            if now_ns().saturating_sub(after.mtime_ns) >= RACY_WINDOW_NS {
                new.entries.insert(rel.to_string(), StatEntry { stat: after, digest });
            }
            return Ok((digest, bytes));
        }
        Err(CacheError::InputChanging { path: path.to_path_buf() })
    }

    /// Drops stat records of inputs that no longer exist; returns how many.
    pub(crate) fn prune_stat_records(&self, dry_run: bool) -> Result<usize, CacheError> {
        let dir = self.stat_dir();
        let mut removed = 0;
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let entry = entry.map_err(io_err("list", &dir))?;
            let record = fs::read(entry.path()).ok().and_then(|b| serde_json::from_slice::<StatRecord>(&b).ok());
            let stale = match &record {
                Some(r) => !Path::new(&r.path).exists(),
                // A corrupt record is useless (it is rebuilt on the next hash); a temp file may
                // belong to a write in progress unless it is old.
                None => !crate::fsutil::is_temp_name(&entry.path()) || crate::gc::is_stale_temp(&entry.path()),
            };
            if stale {
                removed += 1;
                if !dry_run {
                    crate::fsutil::remove_all(&entry.path())?;
                }
            }
        }
        Ok(removed)
    }
}
