//! Small filesystem helpers shared by the store: atomic writes, directory fsync, sealing
//! objects read-only, removal, sizes, clocks.

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

/// Whether `dir` holds nothing but directories (or is missing). Anything that is not a
/// directory, and any entry that cannot be read, counts as a file: the answer errs towards
/// keeping.
pub(crate) fn holds_no_files(dir: &Path) -> bool {
    walkdir::WalkDir::new(dir).follow_links(false).into_iter().all(|e| match e {
        Ok(e) => e.file_type().is_dir(),
        Err(e) => e.io_error().is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound),
    })
}

/// Mode of a file in a published object: read-only for everyone, whatever the stage's umask or
/// the mode of the file it was copied from (`fs::copy` keeps the source's, e.g. a model folder's
/// 0666).
#[cfg(unix)]
pub(crate) const OBJECT_FILE_MODE: u32 = 0o444;
/// Mode of a directory in a published object (set once it is in `objects/`: renaming a
/// directory into another parent needs write permission on it).
#[cfg(unix)]
pub(crate) const OBJECT_DIR_MODE: u32 = 0o555;

/// Prepares the files of a staging tree for publishing: each regular file gets
/// [`OBJECT_FILE_MODE`], and a file with other hard links (a stage that linked an input instead
/// of copying it) is first replaced by a private copy, so that sealing never changes the mode of
/// a file outside the store and nothing outside can change the object's bytes later. Links and
/// special files are left for [`crate::hash_tree`] to reject.
pub(crate) fn seal_files(dir: &Path) -> Result<(), CacheError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        for entry in walkdir::WalkDir::new(dir).min_depth(1).follow_links(false) {
            let entry = entry.map_err(|source| crate::filehash::walk_err(dir, source))?;
            if !entry.file_type().is_file() {
                continue;
            }
            let path = entry.path();
            let mut meta = entry.metadata().map_err(|source| crate::filehash::walk_err(dir, source))?;
            if meta.nlink() > 1 {
                unshare(path)?;
                meta = fs::symlink_metadata(path).map_err(io_err("read metadata of", path))?;
            }
            if meta.mode() & 0o7777 != OBJECT_FILE_MODE {
                fs::set_permissions(path, fs::Permissions::from_mode(OBJECT_FILE_MODE))
                    .map_err(io_err("make read-only", path))?;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Replaces a hard-linked file by a copy of its bytes with a link count of one.
#[cfg(unix)]
fn unshare(path: &Path) -> Result<(), CacheError> {
    let dir = path.parent().expect("a file inside the staging directory has a parent");
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-unshare-")
        .tempfile_in(dir)
        .map_err(io_err("create a temp file in", dir))?;
    let mut src = fs::File::open(path).map_err(io_err("open", path))?;
    std::io::copy(&mut src, &mut tmp.as_file()).map_err(io_err("copy", path))?;
    tmp.persist(path).map_err(|e| CacheError::Io {
        action: "rename a private copy onto",
        path: path.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

/// Gives every directory of a published object [`OBJECT_DIR_MODE`].
pub(crate) fn seal_dirs(dir: &Path) -> Result<(), CacheError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for entry in walkdir::WalkDir::new(dir).follow_links(false) {
            let entry = entry.map_err(|source| crate::filehash::walk_err(dir, source))?;
            if !entry.file_type().is_dir() {
                continue;
            }
            let meta = entry.metadata().map_err(|source| crate::filehash::walk_err(dir, source))?;
            if meta.permissions().mode() & 0o7777 != OBJECT_DIR_MODE {
                fs::set_permissions(entry.path(), fs::Permissions::from_mode(OBJECT_DIR_MODE))
                    .map_err(io_err("make read-only", entry.path()))?;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Gives the owner write permission on every directory of a tree (not following links), so that
/// a sealed object can be renamed and deleted.
fn unseal_dirs(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for entry in walkdir::WalkDir::new(path).follow_links(false).into_iter().filter_map(Result::ok) {
            if entry.file_type().is_dir()
                && let Ok(meta) = entry.metadata()
                && meta.permissions().mode() & 0o700 != 0o700
            {
                let mode = meta.permissions().mode() | 0o700;
                let _ = fs::set_permissions(entry.path(), fs::Permissions::from_mode(mode));
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Makes the top directory of a sealed tree writable by its owner, which renaming it into
/// another directory needs (its `..` entry changes).
pub(crate) fn unseal_top(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = fs::symlink_metadata(path)
            && meta.is_dir()
            && meta.permissions().mode() & 0o700 != 0o700
        {
            let _ = fs::set_permissions(path, fs::Permissions::from_mode(meta.permissions().mode() | 0o700));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Removes a file or a directory tree (sealed objects included); a path that is already gone is
/// fine.
pub(crate) fn remove_all(path: &Path) -> Result<(), CacheError> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            unseal_dirs(path);
            fs::remove_dir_all(path)
        }
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
