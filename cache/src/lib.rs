//! newt-cache: the content-addressed artifact store under newt's stage graph.
//!
//! It knows nothing of YAML, stages or Burn: it stores directory trees under their blake3 tree
//! digest, and manifests that map a stage key (computed by the caller) to such a tree.
//!
//! ```text
//! <root>/CACHEDIR.TAG            marks the directory for backup tools
//! <root>/v1/objects/<digest>/    published output trees, named by content
//! <root>/v1/manifests/<key>.json written last: the only mark of a cached result
//! <root>/v1/tmp/<key>.<rand>/    staging directories (same filesystem: publish is a rename)
//! <root>/v1/work/<key>/          per-key scratch that survives a killed run (checkpoints)
//! <root>/v1/locks/<key>.lock     per-key OS locks; in-use.lock guards against gc during runs
//! <root>/v1/stat/                stat cache of external inputs and of objects (see `verify`)
//! <root>/v1/runs/, pins/         gc roots: latest run of each pipeline, named pins
//! ```
//!
//! A remote cache ([`Remote`], S3 through `object_store`) mirrors objects and manifests in a
//! bucket; a local miss may be filled from it, verified byte by byte (see `remote.rs`).
//!
//! A run: `in_use()` once; per stage `lookup(key)` → on a miss `lock_key(key)`, `lookup` again
//! (another process may have finished it), `staging(key)`, write into `out_dir()`,
//! `publish(..)`; at the end `record_run`.
//!
//! Objects are read-only (files 0444, directories 0555) and every hit compares them with their
//! digests (through the stat cache, see [`Damage`] and [`Cache::verify`]); copies handed to the
//! user go through [`export_file`], which checks the bytes again and never follows a link at
//! the destination.

mod digest;
mod error;
mod export;
mod external;
mod filehash;
mod fsutil;
mod gc;
mod lock;
mod remote;
mod runs;
mod store;
mod verify;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

pub use digest::{Digest, ParseDigestError, hash_bytes};
pub use error::CacheError;
pub use export::{export_bytes, export_dir, export_file};
pub use external::{CacheStats, RACY_WINDOW_NS};
pub use filehash::{FileEntry, PARALLEL_THRESHOLD, hash_file, hash_tree};
pub use gc::{GcReport, WORK_DIR_GRACE};
pub use lock::{InUse, KeyLock};
pub use remote::{
    LOCAL_REFS_FILE, Pulled, Pushed, REMOTE_FORMAT, Remote, RemoteEntry, RemoteError, RemoteMode, RemoteSpec,
};
pub use runs::{Pin, RunRecord, RunStage};
pub use store::{Lookup, MANIFEST_FORMAT, Manifest, ManifestMeta, Staging};
pub use verify::{BrokenManifest, Damage, DamagedObject, VerifyReport};

use error::io_err;

/// Name of the versioned layout directory under the root; a new layout gets a new name, so
/// old and new newt versions never misread each other's entries.
const LAYOUT: &str = "v1";

const CACHEDIR_TAG: &str = "Signature: 8a477f597d28d172789f06886806bc55\n\
# This file is a cache directory tag created by newt.\n\
# For information about cache directory tags see https://bford.info/cachedir/\n";

/// A handle on one cache directory. Cheap to clone; safe to share between threads, and any
/// number of processes may open the same root.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    v1: PathBuf,
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    files_hashed: AtomicU64,
    bytes_hashed: AtomicU64,
    stat_cache_hits: AtomicU64,
}

impl Cache {
    /// The default root: `$NEWT_CACHE_DIR`, else `$XDG_CACHE_HOME/newt`, else the platform
    /// cache directory (`~/.cache/newt` on Linux), else `newt-cache` in the temp directory.
    pub fn default_root() -> PathBuf {
        let env_dir = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        if let Some(dir) = env_dir("NEWT_CACHE_DIR") {
            return dir;
        }
        if let Some(dir) = env_dir("XDG_CACHE_HOME").filter(|d| d.is_absolute()) {
            return dir.join("newt");
        }
        dirs::cache_dir().map_or_else(|| std::env::temp_dir().join("newt-cache"), |d| d.join("newt"))
    }

    /// Opens (creating if needed) the cache at `root`.
    pub fn open(root: &Path) -> Result<Cache, CacheError> {
        let v1 = root.join(LAYOUT);
        let cache = Cache { root: root.to_path_buf(), v1, counters: Arc::default() };
        for dir in [
            cache.objects_dir(),
            cache.manifests_dir(),
            cache.tmp_dir(),
            cache.locks_dir(),
            cache.stat_dir(),
            cache.work_root(),
            cache.runs_dir(),
            cache.pins_dir(),
        ] {
            std::fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        }
        create_if_missing(&root.join("CACHEDIR.TAG"), CACHEDIR_TAG)?;
        // Keeps a cache placed inside a repository (cache_dir: .newt) out of git.
        create_if_missing(&root.join(".gitignore"), "*\n")?;
        Ok(cache)
    }

    /// The cache root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the object (output tree) named `digest` lives; it may not exist.
    pub fn object_path(&self, digest: &Digest) -> PathBuf {
        self.objects_dir().join(digest.to_string())
    }

    /// Where the manifest of `key` lives; it may not exist.
    pub fn manifest_path(&self, key: &Digest) -> PathBuf {
        self.manifests_dir().join(format!("{key}.json"))
    }

    /// A per-key scratch directory (created if needed) that, unlike staging, survives a killed
    /// run: long stages keep resumable checkpoints there. Use it while holding the key's lock.
    /// The executor removes it when the key's result is published, and after a failed run when
    /// no file is in it; gc removes what is left once the key has a result, or after
    /// [`WORK_DIR_GRACE`] without writes.
    pub fn work_dir(&self, key: &Digest) -> Result<PathBuf, CacheError> {
        let dir = self.work_root().join(key.to_string());
        std::fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        Ok(dir)
    }

    /// Removes the work directory of `key` (call after publishing its result).
    pub fn remove_work_dir(&self, key: &Digest) -> Result<(), CacheError> {
        self.discard(&self.work_root().join(key.to_string()))
    }

    /// Removes the work directory of `key` if no file is in it (directories only, or nothing):
    /// after a failed run, a scratch directory with nothing to resume from is not kept.
    pub fn remove_work_dir_if_empty(&self, key: &Digest) -> Result<(), CacheError> {
        let dir = self.work_root().join(key.to_string());
        if crate::fsutil::holds_no_files(&dir) { self.discard(&dir) } else { Ok(()) }
    }

    fn work_root(&self) -> PathBuf {
        self.v1.join("work")
    }
    fn v1(&self) -> &Path {
        &self.v1
    }
    fn objects_dir(&self) -> PathBuf {
        self.v1.join("objects")
    }
    fn manifests_dir(&self) -> PathBuf {
        self.v1.join("manifests")
    }
    fn tmp_dir(&self) -> PathBuf {
        self.v1.join("tmp")
    }
    fn locks_dir(&self) -> PathBuf {
        self.v1.join("locks")
    }
    fn lock_path(&self, key: &Digest) -> PathBuf {
        self.locks_dir().join(format!("{key}.lock"))
    }
    fn stat_dir(&self) -> PathBuf {
        self.v1.join("stat")
    }
    fn runs_dir(&self) -> PathBuf {
        self.v1.join("runs")
    }
    fn pins_dir(&self) -> PathBuf {
        self.v1.join("pins")
    }
}

fn create_if_missing(path: &Path, contents: &str) -> Result<(), CacheError> {
    if path.exists() {
        return Ok(());
    }
    match std::fs::OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(mut f) => std::io::Write::write_all(&mut f, contents.as_bytes()).map_err(io_err("write", path)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(CacheError::Io { action: "create", path: path.to_path_buf(), source: e }),
    }
}
