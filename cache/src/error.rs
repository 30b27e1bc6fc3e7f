//! The one error type of the cache. Every variant names the path it concerns, so the binary can
//! print it as is.

use std::io;
use std::path::{Path, PathBuf};

use crate::Digest;

/// What can go wrong in the cache. Corrupt manifests are not errors (they are misses with a
/// warning, see [`crate::Lookup`]); these are failures the caller has to report.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A filesystem operation failed.
    #[error("could not {action} {}: {source}", path.display())]
    Io {
        /// What was being attempted, e.g. "create directory".
        action: &'static str,
        /// The path it was attempted on.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Walking a directory tree failed (unreadable entry, symlink loop, ...).
    #[error("could not walk {}: {source}", path.display())]
    Walk {
        /// The entry (or the root) that failed.
        path: PathBuf,
        /// The walk error.
        #[source]
        source: walkdir::Error,
    },
    /// A record the cache wrote (run record, pin, manifest being written) could not be
    /// (de)serialized.
    #[error("could not {action} JSON {}: {source}", path.display())]
    Json {
        /// "read" or "write".
        action: &'static str,
        /// The JSON file.
        path: PathBuf,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// Stage outputs must be regular files and directories; a link could point outside the
    /// store or change after publishing.
    #[error("stage output {} is a symbolic link; outputs must be regular files (copy the target instead)", path.display())]
    SymlinkInOutput {
        /// The link.
        path: PathBuf,
    },
    /// A FIFO, socket or device where a file or directory was expected.
    #[error("{} is neither a regular file nor a directory", path.display())]
    UnsupportedFileType {
        /// The offending entry.
        path: PathBuf,
    },
    /// Relative paths are stored as UTF-8 strings in manifests and digests.
    #[error("path {} is not valid UTF-8", path.display())]
    NonUtf8Path {
        /// The offending path.
        path: PathBuf,
    },
    /// `publish` was given a staging area whose output directory is gone.
    #[error("stage output directory {} does not exist", path.display())]
    OutputDirMissing {
        /// The expected output directory.
        path: PathBuf,
    },
    /// A file the stage promised to produce is not in its output directory.
    #[error("required output `{required}` is missing from {}", path.display())]
    MissingRequiredOutput {
        /// The output directory.
        path: PathBuf,
        /// The relative path that was required.
        required: String,
    },
    /// A required output path that is absolute or climbs out of the output directory.
    #[error("required output `{required}` must be a relative path inside {}", path.display())]
    InvalidRequiredPath {
        /// The output directory.
        path: PathBuf,
        /// The rejected relative path.
        required: String,
    },
    /// The staging area was created for one key and published under another.
    #[error("staging directory {} was created for key {staging} but is published as {meta}", path.display())]
    KeyMismatch {
        /// The staging directory.
        path: PathBuf,
        /// Key the staging area was created for.
        staging: Digest,
        /// Key given in the manifest metadata.
        meta: Digest,
    },
    /// gc (or a repair) needs the cache to itself and another process is using it.
    #[error("cache {} is in use by a running newt process; try again once it has finished", path.display())]
    Busy {
        /// The cache root.
        path: PathBuf,
    },
    /// A digest prefix matched more than one entry.
    #[error("digest prefix `{prefix}` matches {count} entries in cache {}; give more characters", path.display())]
    AmbiguousPrefix {
        /// The prefix as given.
        prefix: String,
        /// How many digests it matched.
        count: usize,
        /// The cache root.
        path: PathBuf,
    },
    /// Pin names become file names, so they are restricted.
    #[error("pin name `{name}` is invalid: use letters, digits, '.', '_' and '-', not starting with '.' (cache {})", path.display())]
    InvalidPinName {
        /// The rejected name.
        name: String,
        /// The cache root.
        path: PathBuf,
    },
    /// A stored file does not hold the bytes its digest names (found while copying it out of
    /// the store).
    #[error("{damage}; `newt cache verify --repair` removes the damaged result, and the next run makes it again")]
    Damaged {
        /// What is wrong.
        damage: crate::Damage,
    },
    /// A result is exported as a directory where a regular file already is.
    #[error("{} exists and is not a directory; move it away so that newt can write its outputs there", path.display())]
    NotADirectory {
        /// The file in the way.
        path: PathBuf,
    },
    /// An external input kept changing while it was hashed, so no digest can describe it.
    #[error("{} kept changing while it was being hashed", path.display())]
    InputChanging {
        /// The changing file.
        path: PathBuf,
    },
}

/// `map_err` helper: `fs::read(&p).map_err(io_err("read", &p))?`.
pub(crate) fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CacheError {
    let path = path.to_path_buf();
    move |source| CacheError::Io { action, path, source }
}
