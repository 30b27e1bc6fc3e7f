//! Small filesystem helpers shared by the store: atomic writes, directory fsync, sizes, clocks.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::CacheError;
use crate::error::io_err;

/// Writes `bytes` to `path` so that readers see either the old file or the whole new one:
/// a temp file in the same directory, fsynced, renamed over `path`, then the directory fsynced.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let dir = path.parent().expect("cache paths have a parent");
    let mut tmp =
        tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir).map_err(io_err("create a temp file in", dir))?;
    tmp.write_all(bytes).map_err(io_err("write", tmp.path()))?;
    tmp.as_file().sync_all().map_err(io_err("fsync", tmp.path()))?;
    tmp.persist(path).map_err(|e| CacheError::Io {
        action: "rename a temp file onto",
        path: path.to_path_buf(),
        source: e.error,
    })?;
    fsync_dir(dir)
}

/// Makes a directory's entries (creations, renames) durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), CacheError> {
    #[cfg(unix)]
    fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io_err("fsync directory", dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Total size of the regular files under `path` (or of `path` itself), not following links.
pub(crate) fn tree_size(path: &Path) -> u64 {
    walkdir::WalkDir::new(path)
        .follow_links(false)
        .into_iter()
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Removes a file or a directory tree; a path that is already gone is fine.
pub(crate) fn remove_all(path: &Path) -> Result<(), CacheError> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(CacheError::Io { action: "remove", path: path.to_path_buf(), source: e })
        }
        _ => Ok(()),
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Nanoseconds since the Unix epoch.
pub(crate) fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

/// Whether `path` is a temp file of [`write_atomic`].
pub(crate) fn is_temp_name(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(".tmp"))
}
