//! OS file locks: one exclusive lock per stage key (two runs never compute the same stage at
//! once) and a cache-wide shared "in use" lock that gc needs exclusively.
//!
//! Locks are `flock`-style (std `File::lock`), so the OS drops them when a process dies. gc may
//! delete the lock file of a key while holding that key's lock; a locker that then finds its
//! locked file no longer at the path retries, so two holders can never lock different inodes.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use crate::error::io_err;
use crate::{Cache, CacheError, Digest};

/// Holds the exclusive lock of one stage key; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct KeyLock {
    key: Digest,
    path: PathBuf,
    _file: File,
}

impl KeyLock {
    /// The key this lock is for.
    pub fn key(&self) -> Digest {
        self.key
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A shared claim on the cache, held for the whole of a run (and by every [`crate::Staging`]):
/// while any exists, gc refuses to run, so it cannot delete an artifact between publishing and
/// the run record that makes it a gc root.
#[derive(Debug)]
pub struct InUse {
    _file: File,
}

impl Cache {
    /// Blocks until this process holds the exclusive lock of `key`. The caller must then call
    /// [`Cache::lookup`] again: the previous holder may have published the result meanwhile.
    pub fn lock_key(&self, key: &Digest) -> Result<KeyLock, CacheError> {
        loop {
            let (file, path) = self.open_lock_file(key)?;
            file.lock().map_err(io_err("lock", &path))?;
            if still_at_path(&file, &path)? {
                return Ok(KeyLock { key: *key, path, _file: file });
            }
        }
    }

    /// Takes the lock of `key` if nobody holds it; `Ok(None)` when another holder has it.
    pub fn try_lock_key(&self, key: &Digest) -> Result<Option<KeyLock>, CacheError> {
        loop {
            let (file, path) = self.open_lock_file(key)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => return Ok(None),
                Err(TryLockError::Error(e)) => return Err(CacheError::Io { action: "lock", path, source: e }),
            }
            if still_at_path(&file, &path)? {
                return Ok(Some(KeyLock { key: *key, path, _file: file }));
            }
        }
    }

    /// Takes a shared claim on the cache (blocks only while a gc is running). Hold it for the
    /// duration of a run so gc cannot remove what the run is producing or reading.
    pub fn in_use(&self) -> Result<InUse, CacheError> {
        let (file, path) = self.open_in_use_file()?;
        file.lock_shared().map_err(io_err("lock (shared)", &path))?;
        Ok(InUse { _file: file })
    }

    /// The exclusive claim gc needs; `Busy` if any run holds [`InUse`].
    pub(crate) fn try_exclusive(&self) -> Result<InUse, CacheError> {
        let (file, path) = self.open_in_use_file()?;
        match file.try_lock() {
            Ok(()) => Ok(InUse { _file: file }),
            Err(TryLockError::WouldBlock) => Err(CacheError::Busy { path: self.root().to_path_buf() }),
            Err(TryLockError::Error(e)) => Err(CacheError::Io { action: "lock", path, source: e }),
        }
    }

    fn open_lock_file(&self, key: &Digest) -> Result<(File, PathBuf), CacheError> {
        let path = self.lock_path(key);
        let file = open_rw(&path)?;
        Ok((file, path))
    }

    fn open_in_use_file(&self) -> Result<(File, PathBuf), CacheError> {
        let path = self.v1().join("in-use.lock");
        Ok((open_rw(&path)?, path))
    }
}

fn open_rw(path: &Path) -> Result<File, CacheError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_err("open lock file", path))
}

/// Whether the locked file is still the one at `path` (gc may have unlinked it before we got
/// the lock, in which case our lock guards nothing and we must retry).
fn still_at_path(file: &File, path: &Path) -> Result<bool, CacheError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let held = file.metadata().map_err(io_err("read metadata of", path))?;
        match std::fs::metadata(path) {
            Ok(now) => Ok(now.dev() == held.dev() && now.ino() == held.ino()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(CacheError::Io { action: "read metadata of", path: path.to_path_buf(), source: e }),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        Ok(true)
    }
}
