//! Checking stored bytes against their digests: on every cache hit (through the stat cache) and
//! for the whole store (`newt cache verify`, which re-reads everything).
//!
//! Why a hit is checked through the stat cache and not by re-reading: a no-op rerun must stay a
//! few `stat` calls even when an output is a 16 GB merged model (`bench/results/
//! cache_external_hash.md`). So each object has a stat record like an external input's
//! ([`crate::external`]): per file, the (device, inode, size, mtime, ctime) it had when its
//! bytes were last read and found equal to the manifest's digest. A hit whose files still have
//! those stats is trusted; any other file is hashed again and compared. Flipping a byte changes
//! mtime and ctime (ctime cannot be set back by `touch`), so it is caught on the next hit; what
//! the stat cache cannot see (a bit rotting on disk, a write by a process that kept a file open
//! and landed in the same clock tick) is what `newt cache verify` and the check that
//! [`crate::export_file`] makes while copying an output out of the store are for. A freshly
//! written file is never trusted by stat within [`crate::RACY_WINDOW_NS`] (it is hashed again),
//! so the first hit a few seconds after a stage ran reads its outputs once more.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::filehash::{FileEntry, hash_tree, relative_path, walk_err};
use crate::fsutil::remove_all;
use crate::{Cache, CacheError, Digest};

/// Whether a check may trust the stat cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reread {
    /// Hash only files whose stat changed since they were last found intact (cache hits).
    Changed,
    /// Hash every file (`newt cache verify`).
    All,
}

/// What is wrong with one entry of a stored object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Damage {
    /// A file the manifest lists is not there (or is not a regular file any more).
    Missing {
        /// Where it should be.
        path: PathBuf,
    },
    /// Something the manifest does not list: an extra file, a link, a special file.
    Unexpected {
        /// The entry.
        path: PathBuf,
    },
    /// The file's size is not the one recorded.
    SizeChanged {
        /// The file.
        path: PathBuf,
        /// Size in the manifest.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },
    /// The file's bytes do not hash to the recorded digest.
    Corrupt {
        /// The file.
        path: PathBuf,
        /// `blake3` in the manifest.
        expected: Digest,
        /// `blake3` of the bytes on disk.
        actual: Digest,
    },
    /// An object no manifest describes, whose tree digest is not its name.
    Misnamed {
        /// The object directory.
        path: PathBuf,
        /// The tree digest of what is there.
        actual: Digest,
    },
}

impl Damage {
    /// What is wrong with the file at `path`, read as `size` bytes hashing to `digest`, measured
    /// against `expected`; `None` when nothing is. For the checks made while copying a file.
    pub(crate) fn of_bytes(path: &Path, expected: &FileEntry, size: u64, digest: Digest) -> Option<Damage> {
        let path = path.to_path_buf();
        if size != expected.size {
            Some(Damage::SizeChanged { path, expected: expected.size, actual: size })
        } else if digest != expected.digest {
            Some(Damage::Corrupt { path, expected: expected.digest, actual: digest })
        } else {
            None
        }
    }
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Damage::Missing { path } => write!(f, "output file {} is missing", path.display()),
            Damage::Unexpected { path } => {
                write!(f, "{} is not part of the result (a link or a file its manifest does not list)", path.display())
            }
            Damage::SizeChanged { path, expected, actual } => {
                write!(f, "output file {} has changed: {actual} bytes where {expected} were stored", path.display())
            }
            Damage::Corrupt { path, expected, actual } => write!(
                f,
                "output file {} is corrupt: its bytes hash to blake3 {actual}, the manifest says {expected}",
                path.display()
            ),
            Damage::Misnamed { path, actual } => {
                write!(f, "object {} holds a tree whose digest is {actual}, not its name", path.display())
            }
        }
    }
}

/// One damaged object found by [`Cache::verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DamagedObject {
    /// The object's name (its expected tree digest).
    pub digest: Digest,
    /// Its directory.
    pub path: PathBuf,
    /// What is wrong, entry by entry.
    pub damage: Vec<Damage>,
    /// Keys of the manifests that point at it (removed with it by a repair).
    pub manifests: Vec<Digest>,
}

/// A manifest that can never be a hit: unreadable, or its object is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BrokenManifest {
    /// The stage key it is stored under.
    pub key: Digest,
    /// The manifest file.
    pub path: PathBuf,
    /// Why it is unusable.
    pub problem: String,
}

/// What [`Cache::verify`] found (and, with `repair`, removed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Whether damaged entries were removed.
    pub repair: bool,
    /// Objects whose every file was read and hashed.
    pub objects_checked: usize,
    /// Files hashed.
    pub files_checked: usize,
    /// Bytes hashed.
    pub bytes_checked: u64,
    /// Objects whose bytes do not match their digests.
    pub damaged_objects: Vec<DamagedObject>,
    /// Manifests that cannot be used.
    pub broken_manifests: Vec<BrokenManifest>,
    /// Paths removed by the repair, in the order removed.
    pub removed: Vec<PathBuf>,
}

impl VerifyReport {
    /// Whether nothing damaged or broken was found.
    pub fn is_clean(&self) -> bool {
        self.damaged_objects.is_empty() && self.broken_manifests.is_empty()
    }
}

impl Cache {
    /// Compares the object at `object` with the files its manifest lists: nothing missing,
    /// nothing extra, no links, same sizes, and the same blake3 digests — hashing every file
    /// with [`Reread::All`], only those whose stat changed since they were last found intact
    /// with [`Reread::Changed`]. Updates the object's stat record. An empty answer means intact.
    pub(crate) fn check_object(
        &self,
        object: &Path,
        files: &[FileEntry],
        reread: Reread,
    ) -> Result<Vec<Damage>, CacheError> {
        let canonical = match fs::canonicalize(object) {
            Ok(p) => p,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Ok(files.iter().map(|f| Damage::Missing { path: object.join(&f.path) }).collect());
            }
            Err(e) => return Err(CacheError::Io { action: "resolve", path: object.to_path_buf(), source: e }),
        };
        let expected: BTreeMap<&str, &FileEntry> = files.iter().map(|f| (f.path.as_str(), f)).collect();
        let mut damage = Vec::new();
        let mut present: Vec<(String, PathBuf, u64)> = Vec::new();
        for entry in walkdir::WalkDir::new(&canonical).min_depth(1).follow_links(false) {
            let entry = entry.map_err(|source| walk_err(&canonical, source))?;
            let ft = entry.file_type();
            if ft.is_dir() {
                continue;
            }
            let shown = object.join(entry.path().strip_prefix(&canonical).unwrap_or(entry.path()));
            let rel = relative_path(&canonical, entry.path())?;
            if !ft.is_file() || !expected.contains_key(rel.as_str()) {
                damage.push(Damage::Unexpected { path: shown });
                continue;
            }
            let size = entry.metadata().map_err(|source| walk_err(&canonical, source))?.len();
            present.push((rel, shown, size));
        }
        let seen: BTreeSet<&str> = present.iter().map(|(rel, _, _)| rel.as_str()).collect();
        for file in files.iter().filter(|f| !seen.contains(f.path.as_str())) {
            damage.push(Damage::Missing { path: object.join(&file.path) });
        }

        let (record_path, old) = self.read_stat_record(&canonical);
        let nothing_trusted = old.fresh();
        let trusted = if reread == Reread::All { &nothing_trusted } else { &old };
        let mut new = old.fresh();
        for (rel, shown, size) in &present {
            let want = expected[rel.as_str()];
            if *size != want.size {
                damage.push(Damage::SizeChanged { path: shown.clone(), expected: want.size, actual: *size });
                continue;
            }
            let (actual, _) = self.file_digest(&canonical.join(rel), rel, trusted, &mut new)?;
            if actual != want.digest {
                damage.push(Damage::Corrupt { path: shown.clone(), expected: want.digest, actual });
            }
        }
        self.write_stat_record(&record_path, &old, &new)?;
        Ok(damage)
    }

    /// Reads every object of the store and compares it with its digest: the files its
    /// manifests list (or, for an object no manifest describes, its tree digest against its
    /// name). Also reports manifests that are unreadable or whose object is gone.
    ///
    /// With `repair`, removes each damaged object together with the manifests that point at it,
    /// and each broken manifest, so that the next run runs those stages again. A repair needs
    /// the cache to itself, like gc ([`CacheError::Busy`] while a run holds it).
    pub fn verify(&self, repair: bool) -> Result<VerifyReport, CacheError> {
        let _exclusive = if repair { Some(self.try_exclusive()?) } else { None };
        let before = self.stats();
        let mut report = VerifyReport { repair, ..VerifyReport::default() };

        // Object digest → the keys (and file lists) of the manifests pointing at it.
        let mut users: BTreeMap<Digest, Vec<(Digest, Vec<FileEntry>)>> = BTreeMap::new();
        for (key, path) in crate::store::digest_names(&self.manifests_dir(), ".json")? {
            let parsed = match fs::read(&path) {
                Ok(bytes) => crate::store::parse_manifest(&key, &bytes),
                Err(e) if e.kind() == ErrorKind::NotFound => continue, // removed meanwhile
                Err(e) => return Err(CacheError::Io { action: "read", path, source: e }),
            };
            match parsed {
                Ok(m) => users.entry(m.output).or_default().push((key, m.files)),
                Err(problem) => report.broken_manifests.push(BrokenManifest { key, path, problem }),
            }
        }
        let objects = crate::store::digest_names(&self.objects_dir(), "")?;
        for (output, manifests) in &users {
            if !objects.contains_key(output) {
                for (key, _) in manifests {
                    report.broken_manifests.push(BrokenManifest {
                        key: *key,
                        path: self.manifest_path(key),
                        problem: format!("its output {} is missing", self.object_path(output).display()),
                    });
                }
            }
        }
        for (digest, path) in &objects {
            report.objects_checked += 1;
            let manifests = users.get(digest).map(Vec::as_slice).unwrap_or_default();
            let damage = match manifests.first() {
                // Every manifest of one object lists the same files: parse_manifest checks that
                // they hash to the object's name.
                Some((_, files)) => self.check_object(path, files, Reread::All)?,
                None => match hash_tree(path) {
                    Ok((actual, files)) => {
                        report.files_checked += files.len();
                        report.bytes_checked += files.iter().map(|f| f.size).sum::<u64>();
                        if actual == *digest {
                            Vec::new()
                        } else {
                            vec![Damage::Misnamed { path: path.clone(), actual }]
                        }
                    }
                    Err(CacheError::SymlinkInOutput { path } | CacheError::UnsupportedFileType { path }) => {
                        vec![Damage::Unexpected { path }]
                    }
                    Err(e) => return Err(e),
                },
            };
            if !damage.is_empty() {
                report.damaged_objects.push(DamagedObject {
                    digest: *digest,
                    path: path.clone(),
                    damage,
                    manifests: manifests.iter().map(|(key, _)| *key).collect(),
                });
            }
        }
        let after = self.stats();
        report.files_checked += (after.files_hashed - before.files_hashed) as usize;
        report.bytes_checked += after.bytes_hashed - before.bytes_hashed;

        if repair {
            // Manifests first: a manifest without its object is a miss, never a wrong hit.
            let doomed_manifests: BTreeSet<Digest> = report
                .damaged_objects
                .iter()
                .flat_map(|o| o.manifests.iter().copied())
                .chain(report.broken_manifests.iter().map(|m| m.key))
                .collect();
            for key in doomed_manifests {
                let path = self.manifest_path(&key);
                remove_all(&path)?;
                report.removed.push(path);
            }
            for object in &report.damaged_objects {
                self.discard(&object.path)?;
                report.removed.push(object.path.clone());
            }
        }
        Ok(report)
    }
}
