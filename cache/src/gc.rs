//! Garbage collection. Roots are the latest run of each pipeline and the pins; everything
//! else in `manifests/` and `objects/` goes, as do staging directories whose key is not locked
//! (left by killed runs), work directories of finished or long-abandoned keys, lock files of
//! removed keys, and stat records of vanished inputs.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::error::io_err;
use crate::fsutil::{is_temp_name, remove_all, tree_size};
use crate::{Cache, CacheError, Digest};

/// A temp file younger than this may belong to a write in progress and is left alone.
const TEMP_FILE_GRACE: Duration = Duration::from_secs(3600);

/// The work directory of an unfinished key (resumable checkpoints of a killed run) is kept this
/// long after its last write.
pub const WORK_DIR_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);

/// What gc removed (or, in a dry run, would remove).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Whether nothing was actually deleted.
    pub dry_run: bool,
    /// Every path removed, in the order removed (the detail is in the fields below).
    pub removed: Vec<PathBuf>,
    /// Manifests removed, by key.
    pub removed_manifests: Vec<Digest>,
    /// Objects removed, by digest.
    pub removed_objects: Vec<Digest>,
    /// Staging directories and temp files removed.
    pub removed_tmp: Vec<PathBuf>,
    /// Work directories removed (their key was published, or they were abandoned).
    pub removed_work: Vec<PathBuf>,
    /// Stat-cache records removed (their input path no longer exists).
    pub removed_stat_records: usize,
    /// Bytes of file contents freed.
    pub bytes_freed: u64,
    /// Manifests kept.
    pub kept_manifests: usize,
    /// Objects kept.
    pub kept_objects: usize,
}

impl Cache {
    /// Deletes everything not reachable from the latest run of each pipeline or from a pin.
    /// With `dry_run`, only reports. A real gc needs the cache to itself and fails with
    /// [`CacheError::Busy`] while a run holds [`Cache::in_use`].
    pub fn gc(&self, dry_run: bool) -> Result<GcReport, CacheError> {
        let _exclusive = if dry_run { None } else { Some(self.try_exclusive()?) };
        let mut report = GcReport { dry_run, ..GcReport::default() };

        let mut keep_keys = BTreeSet::new();
        let mut keep_objects = BTreeSet::new();
        for run in self.runs()?.values() {
            for stage in run.stages.values() {
                keep_keys.insert(stage.key);
                keep_objects.insert(stage.output);
            }
        }
        for pin in self.pins()? {
            keep_keys.insert(pin.digest);
            keep_objects.insert(pin.digest);
        }

        for (key, path) in crate::store::digest_names(&self.manifests_dir(), ".json")? {
            if keep_keys.contains(&key) {
                report.kept_manifests += 1;
                // A kept manifest keeps its object, even if the run recorded another output.
                if let Some(m) = self.lookup_shallow(&key)?.manifest {
                    keep_objects.insert(m.output);
                }
            } else {
                report.bytes_freed += tree_size(&path);
                report.removed_manifests.push(key);
                report.removed.push(path.clone());
                if !dry_run {
                    remove_all(&path)?;
                }
            }
        }
        for (digest, path) in crate::store::digest_names(&self.objects_dir(), "")? {
            if keep_objects.contains(&digest) {
                report.kept_objects += 1;
            } else {
                report.bytes_freed += tree_size(&path);
                report.removed_objects.push(digest);
                report.removed.push(path.clone());
                if !dry_run {
                    self.discard(&path)?;
                }
            }
        }
        self.gc_tmp(dry_run, &mut report)?;
        for dir in [self.manifests_dir(), self.runs_dir(), self.pins_dir()] {
            self.gc_temp_files(&dir, dry_run, &mut report)?;
        }
        report.removed_stat_records = self.prune_stat_records(dry_run)?;
        // Keys that still have a manifest once this gc is done.
        let removed: BTreeSet<Digest> = report.removed_manifests.iter().copied().collect();
        let live: BTreeSet<Digest> = self.manifest_keys()?.into_iter().filter(|k| !removed.contains(k)).collect();
        self.gc_work(&live, dry_run, &mut report)?;
        if !dry_run {
            self.gc_lock_files(&live)?;
        }
        Ok(report)
    }

    /// Staging directories of killed runs (their key lock is free) and trash.
    fn gc_tmp(&self, dry_run: bool, report: &mut GcReport) -> Result<(), CacheError> {
        let dir = self.tmp_dir();
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let path = entry.map_err(io_err("list", &dir))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            let key = name.split_once('.').and_then(|(hex, _)| hex.parse::<Digest>().ok());
            // Holding the key lock while deleting keeps a new run of that key from starting
            // into a directory that is being removed.
            let _lock = match key {
                Some(key) => match self.try_lock_key(&key)? {
                    Some(lock) => Some(lock),
                    None => continue, // a live stage is writing there
                },
                None if name.starts_with("trash.") => None,
                None => continue, // not ours
            };
            report.bytes_freed += tree_size(&path);
            report.removed_tmp.push(path.clone());
            report.removed.push(path.clone());
            if !dry_run {
                remove_all(&path)?;
            }
        }
        Ok(())
    }

    /// Work directories whose key is not locked and either has a result (after this gc) or
    /// has not been written to for [`WORK_DIR_GRACE`].
    fn gc_work(&self, live: &BTreeSet<Digest>, dry_run: bool, report: &mut GcReport) -> Result<(), CacheError> {
        for (key, path) in crate::store::digest_names(&self.work_root(), "")? {
            let Some(_lock) = self.try_lock_key(&key)? else { continue };
            if !live.contains(&key) && newest_mtime_age(&path).is_some_and(|age| age < WORK_DIR_GRACE) {
                continue;
            }
            report.bytes_freed += tree_size(&path);
            report.removed_work.push(path.clone());
            report.removed.push(path.clone());
            if !dry_run {
                self.discard(&path)?;
            }
        }
        Ok(())
    }

    /// Temp files of atomic writes interrupted long ago.
    fn gc_temp_files(&self, dir: &Path, dry_run: bool, report: &mut GcReport) -> Result<(), CacheError> {
        for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
            let path = entry.map_err(io_err("list", dir))?.path();
            if is_temp_name(&path) && is_stale_temp(&path) {
                report.bytes_freed += tree_size(&path);
                report.removed_tmp.push(path.clone());
                report.removed.push(path.clone());
                if !dry_run {
                    remove_all(&path)?;
                }
            }
        }
        Ok(())
    }

    /// Lock files of keys without a manifest. Each is deleted while its lock is held, which
    /// [`Cache::lock_key`] detects (it re-checks the inode after locking).
    fn gc_lock_files(&self, live: &BTreeSet<Digest>) -> Result<(), CacheError> {
        for (key, path) in crate::store::digest_names(&self.locks_dir(), ".lock")? {
            if live.contains(&key) {
                continue;
            }
            if let Some(_lock) = self.try_lock_key(&key)? {
                remove_all(&path)?;
            }
        }
        Ok(())
    }
}

/// Time since the newest modification of anything in a tree (the directory itself included).
fn newest_mtime_age(path: &Path) -> Option<Duration> {
    let newest = walkdir::WalkDir::new(path)
        .into_iter()
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max()?;
    Some(SystemTime::now().duration_since(newest).unwrap_or_default())
}

/// Whether a temp file is old enough that no writer can still be working on it.
pub(crate) fn is_stale_temp(path: &Path) -> bool {
    fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age > TEMP_FILE_GRACE)
}
