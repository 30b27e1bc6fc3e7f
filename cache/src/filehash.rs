//! Content digests of files and directory trees.
//!
//! A file's digest is plain `blake3(contents)` (the same as `b3sum`). Files over
//! [`PARALLEL_THRESHOLD`] are hashed on several threads: the file is cut along blake3's own tree
//! (`hazmat::left_subtree_len`), each subtree is hashed from positioned reads, and the chaining
//! values are merged, which yields exactly `blake3::hash`. A tree's digest covers the sorted
//! relative paths, sizes and file digests of its regular files; empty directories and
//! permissions are not part of it.

use std::fs::File;
use std::io::Read;
use std::path::{Component, Path};

use serde::{Deserialize, Serialize};

use crate::error::io_err;
use crate::{CacheError, Digest, hash_bytes};

/// Files larger than this are hashed on several threads.
pub const PARALLEL_THRESHOLD: u64 = 16 << 20;

const TREE_CONTEXT: &str = "newt-cache 2026 tree digest v1";
const READ_BUF: usize = 1 << 20;

/// One regular file of a tree: its path relative to the tree root ('/'-separated, UTF-8), its
/// size and its content digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the tree root, components joined by '/'.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// `blake3(contents)`.
    pub digest: Digest,
}

/// Hashes a stage output directory: every regular file, sorted by relative path. Symbolic links
/// and special files are rejected (outputs must be self-contained). Returns the tree digest and
/// the file list, sorted by path.
pub fn hash_tree(dir: &Path) -> Result<(Digest, Vec<FileEntry>), CacheError> {
    let meta = std::fs::symlink_metadata(dir).map_err(io_err("read metadata of", dir))?;
    if meta.file_type().is_symlink() {
        return Err(CacheError::SymlinkInOutput { path: dir.to_path_buf() });
    }
    if !meta.is_dir() {
        return Err(CacheError::UnsupportedFileType { path: dir.to_path_buf() });
    }
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(dir).min_depth(1).follow_links(false) {
        let entry = entry.map_err(|source| walk_err(dir, source))?;
        let ft = entry.file_type();
        if ft.is_dir() {
            continue;
        }
        if ft.is_symlink() {
            return Err(CacheError::SymlinkInOutput { path: entry.into_path() });
        }
        if !ft.is_file() {
            return Err(CacheError::UnsupportedFileType { path: entry.into_path() });
        }
        let rel = relative_path(dir, entry.path())?;
        let (digest, size) = hash_file_sized(entry.path())?;
        files.push(FileEntry { path: rel, size, digest });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((tree_digest(&files), files))
}

/// The digest of a tree given its files, which must be sorted by path.
pub(crate) fn tree_digest(files: &[FileEntry]) -> Digest {
    debug_assert!(files.windows(2).all(|w| w[0].path < w[1].path));
    let sizes: Vec<[u8; 8]> = files.iter().map(|f| f.size.to_le_bytes()).collect();
    let mut parts: Vec<&[u8]> = Vec::with_capacity(files.len() * 3);
    for (file, size) in files.iter().zip(&sizes) {
        parts.push(file.path.as_bytes());
        parts.push(size);
        parts.push(file.digest.as_bytes());
    }
    hash_bytes(TREE_CONTEXT, &parts)
}

/// `path` relative to `root`, as a '/'-joined UTF-8 string.
pub(crate) fn relative_path(root: &Path, path: &Path) -> Result<String, CacheError> {
    let rel = path.strip_prefix(root).unwrap_or(path);
    let mut out = String::new();
    for component in rel.components() {
        let Component::Normal(name) = component else { continue };
        let name = name.to_str().ok_or_else(|| CacheError::NonUtf8Path { path: path.to_path_buf() })?;
        if !out.is_empty() {
            out.push('/');
        }
        out.push_str(name);
    }
    Ok(out)
}

pub(crate) fn walk_err(root: &Path, source: walkdir::Error) -> CacheError {
    let path = source.path().unwrap_or(root).to_path_buf();
    CacheError::Walk { path, source }
}

/// `blake3(contents)` of one file, on several threads when it is large.
pub fn hash_file(path: &Path) -> Result<Digest, CacheError> {
    hash_file_sized(path).map(|(digest, _)| digest)
}

/// Digest and number of bytes hashed.
pub(crate) fn hash_file_sized(path: &Path) -> Result<(Digest, u64), CacheError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(16);
    hash_file_with(path, PARALLEL_THRESHOLD, threads)
}

/// [`hash_file_sized`] with its tuning exposed, so tests can exercise the parallel path on small
/// files.
pub(crate) fn hash_file_with(
    path: &Path,
    parallel_threshold: u64,
    threads: usize,
) -> Result<(Digest, u64), CacheError> {
    let mut file = File::open(path).map_err(io_err("open", path))?;
    let len = file.metadata().map_err(io_err("read metadata of", path))?.len();
    #[cfg(unix)]
    if len > parallel_threshold && threads > 1 {
        // Leaves of about a quarter of a thread's share keep threads busy when the top split of
        // the blake3 tree is lopsided (the left subtree is a power of two). Leaves are at least
        // one read buffer, or one chunk when tests lower the threshold below that.
        let leaf_target = (len / (threads as u64 * 4)).max(parallel_threshold.min(READ_BUF as u64));
        let hash = parallel::hash(&file, len, leaf_target, threads).map_err(io_err("read", path))?;
        return Ok((hash.into(), len));
    }
    let _ = (parallel_threshold, threads);
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; READ_BUF.min(len.max(1) as usize)];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hasher.finalize().into(), total))
}

#[cfg(unix)]
mod parallel {
    //! Multi-threaded blake3 of one file, built from subtree chaining values.

    use std::fs::File;
    use std::io;
    use std::os::unix::fs::FileExt;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use blake3::hazmat::{
        ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
    };

    /// `blake3::hash` of the first `len` bytes of `file`; `len` must exceed `leaf_target`, which
    /// must be at least one blake3 chunk.
    pub(super) fn hash(file: &File, len: u64, leaf_target: u64, threads: usize) -> io::Result<blake3::Hash> {
        assert!(leaf_target >= blake3::CHUNK_LEN as u64 && len > leaf_target);
        let mut leaves = Vec::new();
        plan(0, len, leaf_target, &mut leaves);
        let cvs: Vec<Mutex<Option<ChainingValue>>> = leaves.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads.min(leaves.len()))
                .map(|_| {
                    scope.spawn(|| -> io::Result<()> {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(&(offset, leaf_len)) = leaves.get(i) else { return Ok(()) };
                            let cv = leaf(file, offset, leaf_len)?;
                            *cvs[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(cv);
                        }
                    })
                })
                .collect();
            workers.into_iter().try_for_each(|w| w.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
        })?;
        let mut cvs =
            cvs.into_iter().map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()).expect("every leaf hashed"));
        let left = left_subtree_len(len);
        let left_cv = merge(left, leaf_target, &mut cvs);
        let right_cv = merge(len - left, leaf_target, &mut cvs);
        Ok(merge_subtrees_root(&left_cv, &right_cv, Mode::Hash))
    }

    /// Splits `[offset, offset+len)` along the blake3 tree until pieces are at most `target`.
    fn plan(offset: u64, len: u64, target: u64, out: &mut Vec<(u64, u64)>) {
        if len > target {
            let left = left_subtree_len(len);
            plan(offset, left, target, out);
            plan(offset + left, len - left, target, out);
        } else {
            out.push((offset, len));
        }
    }

    /// Folds leaf chaining values (in [`plan`] order, same `target`) back into the chaining value
    /// of a subtree of `len` bytes.
    fn merge(len: u64, target: u64, cvs: &mut impl Iterator<Item = ChainingValue>) -> ChainingValue {
        if len > target {
            let left = left_subtree_len(len);
            let l = merge(left, target, cvs);
            let r = merge(len - left, target, cvs);
            merge_subtrees_non_root(&l, &r, Mode::Hash)
        } else {
            cvs.next().expect("one chaining value per leaf")
        }
    }

    fn leaf(file: &File, offset: u64, len: u64) -> io::Result<ChainingValue> {
        let mut hasher = blake3::Hasher::new();
        hasher.set_input_offset(offset);
        let mut buf = vec![0u8; (len as usize).min(super::READ_BUF)];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], pos)?;
            hasher.update(&buf[..n]);
            pos += n as u64;
        }
        Ok(hasher.finalize_non_root())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn parallel_file_hash_equals_blake3_hash_at_tree_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let chunk = blake3::CHUNK_LEN;
        let lens = [
            chunk + 1,
            2 * chunk,
            2 * chunk + 1,
            3 * chunk,
            4 * chunk - 1,
            8 * chunk + 1,
            17 * chunk + 5,
            64 * chunk,
            100_003,
            1 << 20,
            (3 << 20) + 7,
        ];
        for (i, len) in lens.into_iter().enumerate() {
            let data = pseudo_random(len, i as u64 + 7);
            let path = dir.path().join(format!("f{i}"));
            std::fs::write(&path, &data).unwrap();
            let expected = Digest::from(blake3::hash(&data));
            for threads in [2, 3, 8] {
                // Threshold of one chunk forces the parallel path with many small leaves.
                let (digest, size) = hash_file_with(&path, chunk as u64, threads).unwrap();
                assert_eq!(digest, expected, "len {len}, threads {threads}");
                assert_eq!(size, len as u64);
            }
            assert_eq!(hash_file(&path).unwrap(), expected, "default tuning, len {len}");
        }
    }

    #[test]
    fn tree_digest_depends_on_names_and_contents_not_creation_order() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(a.path().join("sub")).unwrap();
        std::fs::write(a.path().join("sub/x.bin"), b"x").unwrap();
        std::fs::write(a.path().join("y.txt"), b"y").unwrap();
        std::fs::write(b.path().join("y.txt"), b"y").unwrap();
        std::fs::create_dir_all(b.path().join("sub")).unwrap();
        std::fs::write(b.path().join("sub/x.bin"), b"x").unwrap();
        let (da, files) = hash_tree(a.path()).unwrap();
        let (db, _) = hash_tree(b.path()).unwrap();
        assert_eq!(da, db);
        assert_eq!(files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(), ["sub/x.bin", "y.txt"]);
        assert_eq!(files[0].digest, Digest::from(blake3::hash(b"x")));

        std::fs::rename(b.path().join("y.txt"), b.path().join("z.txt")).unwrap();
        assert_ne!(hash_tree(b.path()).unwrap().0, da, "a rename changes the digest");
        std::fs::rename(b.path().join("z.txt"), b.path().join("y.txt")).unwrap();
        std::fs::write(b.path().join("y.txt"), b"Y").unwrap();
        assert_ne!(hash_tree(b.path()).unwrap().0, da, "a content change changes the digest");
    }

    #[test]
    fn tree_paths_sort_as_strings_not_per_directory() {
        // Depth-first order would put "a/b" before "a.txt"; string order puts '.' before '/'.
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("a")).unwrap();
        std::fs::write(d.path().join("a/b"), b"1").unwrap();
        std::fs::write(d.path().join("a.txt"), b"2").unwrap();
        let (_, files) = hash_tree(d.path()).unwrap();
        assert_eq!(files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(), ["a.txt", "a/b"]);
    }

    #[cfg(unix)]
    #[test]
    fn symlink_in_output_is_rejected_naming_it() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("real"), b"1").unwrap();
        std::os::unix::fs::symlink(d.path().join("real"), d.path().join("link")).unwrap();
        match hash_tree(d.path()) {
            Err(CacheError::SymlinkInOutput { path }) => assert_eq!(path, d.path().join("link")),
            other => panic!("expected SymlinkInOutput, got {other:?}"),
        }
    }
}
