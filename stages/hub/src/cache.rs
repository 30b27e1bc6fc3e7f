//! The Hugging Face cache on disk, laid out as `huggingface_hub` lays it out, so newt,
//! transformers and `huggingface_hub` share one copy in both directions:
//!
//! ```text
//! <cache>/models--org--name/                 (datasets--org--name/ for datasets)
//!     blobs/<etag>                            file contents, named by the Hub's etag
//!     blobs/<etag>.incomplete                 a download in progress (resumed from its length)
//!     snapshots/<commit>/<path>  ->  ../../blobs/<etag>   (relative links)
//!     refs/<revision>                         the commit a branch or tag pointed at
//! ```

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use crate::{HubError, RepoKind};

/// The Hub cache folder, as `huggingface_hub` resolves it: `HF_HUB_CACHE` (or the older
/// `HUGGINGFACE_HUB_CACHE`), `HF_HOME/hub`, `XDG_CACHE_HOME/huggingface/hub`,
/// `~/.cache/huggingface/hub`. A variable set to the empty string counts as unset. Also says
/// which rule picked it.
pub fn cache_dir() -> Option<(PathBuf, String)> {
    cache_dir_from(|k| {
        std::env::var_os(k).or_else(|| (k == "HOME").then(dirs::home_dir).flatten().map(PathBuf::into_os_string))
    })
}

/// [`cache_dir`] over an explicit environment.
pub fn cache_dir_from(env: impl Fn(&str) -> Option<OsString>) -> Option<(PathBuf, String)> {
    let var = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    for k in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"] {
        if let Some(p) = var(k) {
            return Some((p, format!("from {k}")));
        }
    }
    if let Some(h) = var("HF_HOME") {
        return Some((h.join("hub"), "from HF_HOME".into()));
    }
    if let Some(x) = var("XDG_CACHE_HOME") {
        return Some((x.join("huggingface/hub"), "from XDG_CACHE_HOME".into()));
    }
    let home = var("HOME")?;
    Some((home.join(".cache/huggingface/hub"), "default".into()))
}

/// One repository's folder in a Hub cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedRepo {
    /// `<cache>/models--org--name`.
    pub dir: PathBuf,
}

impl CachedRepo {
    /// The folder of `kind`/`id` under `cache` (it need not exist).
    pub fn new(cache: &Path, kind: RepoKind, id: &str) -> Self {
        CachedRepo { dir: cache.join(format!("{}--{}", kind.cache_prefix(), id.replace('/', "--"))) }
    }

    /// The commit `revision` names locally: a 40-hex commit as it is, else `refs/<revision>`.
    pub fn commit_of(&self, revision: &str) -> Option<String> {
        if is_commit(revision) {
            return Some(revision.to_string());
        }
        let text = fs::read_to_string(self.dir.join("refs").join(revision)).ok()?;
        let commit = text.trim().to_string();
        is_commit(&commit).then_some(commit)
    }

    /// `snapshots/<commit>`.
    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit)
    }

    /// The snapshot folders present.
    pub fn snapshots(&self) -> Vec<PathBuf> {
        fs::read_dir(self.dir.join("snapshots"))
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect())
            .unwrap_or_default()
    }

    /// `blobs/<etag>`.
    pub fn blob(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(etag)
    }

    /// Records that `revision` points at `commit` (nothing for a commit itself).
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<(), HubError> {
        if revision == commit {
            return Ok(());
        }
        let path = self.dir.join("refs").join(revision);
        let parent = path.parent().expect("refs/<revision> has a parent");
        fs::create_dir_all(parent).map_err(HubError::io(parent))?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        fs::write(&tmp, commit).map_err(HubError::io(&tmp))?;
        fs::rename(&tmp, &path).map_err(HubError::io(&path))
    }

    /// Points `snapshots/<commit>/<file>` at `blobs/<etag>` with a relative link, replacing
    /// whatever was there.
    pub fn link(&self, commit: &str, file: &str, etag: &str) -> Result<PathBuf, HubError> {
        let pointer = self.snapshot(commit).join(file);
        let parent = pointer.parent().expect("a snapshot file has a parent");
        fs::create_dir_all(parent).map_err(HubError::io(parent))?;
        // From snapshots/<commit>/<a>/<b> up to the repo folder: one `..` per folder below it.
        let depth = Path::new(file).components().count() + 1;
        let target: PathBuf = std::iter::repeat_n("..", depth).collect::<PathBuf>().join("blobs").join(etag);
        let tmp = pointer.with_file_name(format!(
            ".{}.newt-link-{}",
            pointer.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
            std::process::id()
        ));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&target, &tmp).map_err(HubError::io(&tmp))?;
        fs::rename(&tmp, &pointer).map_err(HubError::io(&pointer))?;
        Ok(pointer)
    }
}

/// A full 40-hex git commit id.
pub fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_dir_follows_huggingface_hubs_rules() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| OsString::from(v))
        };
        assert_eq!(cache_dir_from(env(&[("HF_HUB_CACHE", "/a"), ("HF_HOME", "/b")])).unwrap().0, PathBuf::from("/a"));
        assert_eq!(cache_dir_from(env(&[("HF_HUB_CACHE", ""), ("HF_HOME", "/b")])).unwrap().0, PathBuf::from("/b/hub"));
        assert_eq!(
            cache_dir_from(env(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")])).unwrap().0,
            PathBuf::from("/x/huggingface/hub")
        );
        assert_eq!(cache_dir_from(env(&[("HOME", "/h")])).unwrap().0, PathBuf::from("/h/.cache/huggingface/hub"));
    }

    #[test]
    fn links_are_relative_and_refs_name_commits() {
        let t = tempfile::tempdir().unwrap();
        let repo = CachedRepo::new(t.path(), RepoKind::Dataset, "acme/chats");
        assert!(repo.dir.ends_with("datasets--acme--chats"));
        let commit = "a".repeat(40);
        fs::create_dir_all(repo.dir.join("blobs")).unwrap();
        fs::write(repo.blob("e1"), b"rows").unwrap();
        let p = repo.link(&commit, "data/train.jsonl", "e1").unwrap();
        assert_eq!(fs::read_link(&p).unwrap(), PathBuf::from("../../../blobs/e1"));
        assert_eq!(fs::read(&p).unwrap(), b"rows");
        repo.write_ref("main", &commit).unwrap();
        assert_eq!(repo.commit_of("main"), Some(commit.clone()));
        assert_eq!(repo.commit_of(&commit), Some(commit));
        assert_eq!(repo.commit_of("dev"), None);
    }
}
