//! Copies of stored results outside the store (a pipeline's `output_dir`), written so that
//! nothing found at the destination is followed.
//!
//! A destination directory is not the store: anyone who can write there may have planted
//! links. So a file is never opened at its destination name. Its bytes go to a fresh temp file
//! beside it, created exclusively (`O_CREAT | O_EXCL`, which fails on any existing name, a
//! dangling link included), and the temp file is renamed over the destination: a link there
//! is replaced, not followed. A destination directory that is a link is replaced by a real
//! directory (removing a link loses no data, and writing through it would put newt's outputs,
//! or whatever an attacker's link points at, somewhere the user never named); a regular file
//! where a directory belongs is an error. Only the destination root (`output_dir` itself,
//! which the user names) may be a link.
//!
//! Exported files get the modes of any new file (0666, directories 0777, less the umask):
//! the store's read-only modes are not copied.
//!
//! Bytes are checked against their stored digest while they are copied: a damaged object is
//! never handed to the user, whatever the stat cache believed.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::path::Path;

use crate::error::io_err;
use crate::verify::Damage;
use crate::{CacheError, FileEntry};

const COPY_BUF: usize = 1 << 20;

/// Copies the stored file `from` to `to`, replacing whatever is at `to` (a link is replaced,
/// never followed), after checking its bytes against `expected` (size and blake3). The parent
/// of `to` must exist. On a mismatch nothing is written and the error names the damage.
pub fn export_file(from: &Path, expected: &FileEntry, to: &Path) -> Result<(), CacheError> {
    let meta = fs::symlink_metadata(from).map_err(io_err("read metadata of", from))?;
    if !meta.is_file() {
        return Err(CacheError::Damaged { damage: Damage::Unexpected { path: from.to_path_buf() } });
    }
    let mut src = fs::File::open(from).map_err(io_err("open", from))?;
    let mut tmp = temp_beside(to)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; COPY_BUF.min(expected.size.max(1) as usize)];
    let mut size = 0u64;
    loop {
        let n = src.read(&mut buf).map_err(io_err("read", from))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        tmp.write_all(&buf[..n]).map_err(io_err("write", tmp.path()))?;
        size += n as u64;
    }
    if let Some(damage) = Damage::of_bytes(from, expected, size, hasher.finalize().into()) {
        return Err(CacheError::Damaged { damage });
    }
    persist(tmp, to)
}

/// Writes `bytes` to `path` the same way: a fresh temp file renamed over it.
pub fn export_bytes(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let mut tmp = temp_beside(path)?;
    tmp.write_all(bytes).map_err(io_err("write", tmp.path()))?;
    persist(tmp, path)
}

/// Makes `path` a real directory: creates it if missing, replaces a link (to anything) by an
/// empty directory, keeps an existing directory, and refuses a regular file. Its parent must
/// exist.
pub fn export_dir(path: &Path) -> Result<(), CacheError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => return Ok(()),
        Ok(meta) if meta.file_type().is_symlink() => {
            fs::remove_file(path).map_err(io_err("remove the link", path))?;
        }
        Ok(_) => return Err(CacheError::NotADirectory { path: path.to_path_buf() }),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(CacheError::Io { action: "read metadata of", path: path.to_path_buf(), source: e }),
    }
    // mkdir never follows a link: one planted since the check above makes this fail.
    fs::create_dir(path).map_err(io_err("create directory", path))
}

/// A new file beside `path`, created exclusively with the modes of any new file.
fn temp_beside(path: &Path) -> Result<tempfile::NamedTempFile, CacheError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".newt-tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // The umask applies, as to any file a program creates.
        builder.permissions(fs::Permissions::from_mode(0o666));
    }
    builder.tempfile_in(dir).map_err(io_err("create a temp file in", dir))
}

fn persist(tmp: tempfile::NamedTempFile, to: &Path) -> Result<(), CacheError> {
    tmp.persist(to).map_err(|e| CacheError::Io {
        action: "rename a temp file onto",
        path: to.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}
