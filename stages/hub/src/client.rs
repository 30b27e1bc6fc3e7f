//! Talking to the Hub: revision info, and file downloads into the cache.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_LENGTH, ETAG, LOCATION, RANGE};
use sha2::Digest as _;

use crate::cache::{CachedRepo, cache_dir, is_commit};
use crate::{HubError, RepoKind};

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Files downloaded at once.
const PARALLEL_FILES: usize = 8;
/// Attempts per file (each resumes where the last stopped).
const ATTEMPTS: usize = 4;

/// Where a download reports how far it got (bytes).
pub trait DownloadProgress: Send + Sync {
    /// Bytes to fetch in all (already-cached files excluded).
    fn total(&self, _bytes: u64) {}
    /// `bytes` more arrived (or were found in a partial file being resumed).
    fn advance(&self, _bytes: u64) {}
    /// A file is complete in the cache.
    fn file_done(&self, _path: &str) {}
}

/// Progress that goes nowhere.
pub struct NoProgress;

impl DownloadProgress for NoProgress {}

/// A file of a repository at a commit.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RemoteFile {
    /// Path inside the repository.
    pub path: String,
    /// Size in bytes, when the Hub said.
    pub size: Option<u64>,
}

/// A revision resolved to a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The 40-hex commit.
    pub commit: String,
    /// Set when the answer came from the cache alone: why (offline, unreachable).
    pub note: Option<String>,
}

/// The Hub as the environment configures it.
#[derive(Debug, Clone)]
pub struct Hub {
    endpoint: String,
    token: Option<String>,
    offline: Option<String>,
    cache: PathBuf,
}

#[derive(serde::Deserialize)]
struct RevisionInfo {
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(serde::Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    lfs: Option<Lfs>,
}

#[derive(serde::Deserialize)]
struct Lfs {
    size: Option<u64>,
}

/// Percent-encodes `s` for a URL path; `/` is kept when `keep_slash`.
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An etag as huggingface_hub stores it: no `W/`, no quotes.
fn normalize_etag(raw: &str) -> String {
    raw.trim().trim_start_matches("W/").trim_matches('"').to_string()
}

/// Whether an error is worth another attempt.
fn retryable(e: &HubError) -> bool {
    matches!(e, HubError::Network { .. })
        || matches!(e, HubError::Http { status, .. } if *status >= 500 || *status == 429)
}

/// The token `huggingface-cli login` saved, or HF_TOKEN.
fn token_from_env() -> Option<String> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    if let Some(t) = var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")) {
        return Some(t.trim().to_string());
    }
    let path = var("HF_TOKEN_PATH").map(PathBuf::from).or_else(|| {
        let home = var("HF_HOME").map(PathBuf::from).or_else(|| {
            let xdg = var("XDG_CACHE_HOME").map(PathBuf::from).or_else(|| dirs::home_dir().map(|h| h.join(".cache")));
            xdg.map(|x| x.join("huggingface"))
        });
        home.map(|h| h.join("token"))
    })?;
    fs::read_to_string(path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
}

impl Hub {
    /// The Hub the environment names: `HF_ENDPOINT`, the token, `HF_HUB_OFFLINE`, the cache.
    pub fn from_env() -> Result<Hub, HubError> {
        let endpoint =
            std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()).unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let offline = std::env::var("HF_HUB_OFFLINE")
            .ok()
            .filter(|v| ["1", "true", "yes", "on"].contains(&v.to_ascii_lowercase().as_str()))
            .map(|_| "HF_HUB_OFFLINE is set".to_string());
        let (cache, _) = cache_dir().ok_or_else(|| HubError::Io {
            path: PathBuf::from("~/.cache/huggingface/hub"),
            source: std::io::Error::other("no HF_HUB_CACHE, HF_HOME or HOME to find the Hugging Face cache in"),
        })?;
        Ok(Hub::new(&endpoint, token_from_env(), offline, cache))
    }

    /// A Hub at `endpoint` with this token, offline when `offline` says why, caching in `cache`.
    pub fn new(endpoint: &str, token: Option<String>, offline: Option<String>, cache: PathBuf) -> Hub {
        Hub { endpoint: endpoint.trim_end_matches('/').to_string(), token, offline, cache }
    }

    /// The endpoint (no trailing slash).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The Hugging Face cache folder.
    pub fn cache(&self) -> &Path {
        &self.cache
    }

    /// Why newt is offline, when it is.
    pub fn offline(&self) -> Option<&str> {
        self.offline.as_deref()
    }

    /// The cache folder of a repository.
    pub fn repo(&self, kind: RepoKind, id: &str) -> CachedRepo {
        CachedRepo::new(&self.cache, kind, id)
    }

    /// The repository's page (where a gated model's license is accepted).
    pub fn page(&self, kind: RepoKind, id: &str) -> String {
        format!("{}/{}{id}", self.endpoint, kind.url_prefix())
    }

    fn runtime() -> Result<tokio::runtime::Runtime, HubError> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .map_err(|e| HubError::Network { url: "tokio runtime".into(), message: e.to_string() })
    }

    fn client() -> Result<reqwest::Client, HubError> {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("newt/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| HubError::Network { url: "http client".into(), message: e.to_string() })
    }

    /// The request with the token when it goes to the endpoint's own host (never to a CDN).
    fn authed(&self, rb: reqwest::RequestBuilder, url: &str) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) if url.starts_with(&self.endpoint) => rb.bearer_auth(t),
            _ => rb,
        }
    }

    /// The error for a failed answer; the Hub's `X-Error-Code` tells a missing repository
    /// (which it also answers with 401, so as not to reveal private ones) from a gated one.
    fn status_error(&self, kind: RepoKind, id: &str, url: &str, resp: &reqwest::Response, what: String) -> HubError {
        let status = resp.status();
        let code = resp.headers().get("x-error-code").and_then(|v| v.to_str().ok()).unwrap_or_default();
        match status.as_u16() {
            _ if ["RepoNotFound", "RevisionNotFound", "EntryNotFound"].contains(&code) => {
                HubError::NotFound { what, endpoint: self.endpoint.clone() }
            }
            401 | 403 => HubError::Gated {
                noun: kind.noun(),
                id: id.to_string(),
                url: self.page(kind, id),
                with_token: self.token.is_some(),
            },
            404 => HubError::NotFound { what, endpoint: self.endpoint.clone() },
            s => HubError::Http { url: url.to_string(), status: s, detail: String::new() },
        }
    }

    fn offline_error(&self, kind: RepoKind, id: &str, revision: &str, missing: String, why: &str) -> HubError {
        HubError::Offline {
            noun: kind.noun(),
            id: id.to_string(),
            revision: revision.to_string(),
            missing,
            cache: self.repo(kind, id).dir,
            why: why.to_string(),
        }
    }

    async fn revision_info(
        &self,
        client: &reqwest::Client,
        kind: RepoKind,
        id: &str,
        revision: &str,
    ) -> Result<RevisionInfo, HubError> {
        let url = format!(
            "{}/api/{}/{}/revision/{}?blobs=true",
            self.endpoint,
            kind.cache_prefix(),
            encode(id, true),
            encode(revision, false)
        );
        let resp = self
            .authed(client.get(&url), &url)
            .send()
            .await
            .map_err(|e| HubError::Network { url: url.clone(), message: e.to_string() })?;
        if !resp.status().is_success() {
            let what = format!("{} `{id}` at revision `{revision}`", kind.noun());
            return Err(self.status_error(kind, id, &url, &resp, what));
        }
        resp.json::<RevisionInfo>().await.map_err(|e| HubError::Protocol { url, message: e.to_string() })
    }

    /// The commit `revision` names: asked of the Hub, except offline, or for a commit whose
    /// snapshot is already cached (a pinned revision never asks again). When the Hub cannot
    /// be reached, the cache's ref answers and the note says so.
    pub fn resolve(&self, kind: RepoKind, id: &str, revision: &str) -> Result<Resolution, HubError> {
        let repo = self.repo(kind, id);
        if let Some(why) = &self.offline {
            return match repo.commit_of(revision) {
                Some(commit) => Ok(Resolution { commit, note: Some(format!("offline ({why}): the cached snapshot")) }),
                None => Err(self.offline_error(kind, id, revision, "the revision".into(), why)),
            };
        }
        if is_commit(revision) && repo.snapshot(revision).is_dir() {
            return Ok(Resolution { commit: revision.to_string(), note: None });
        }
        let rt = Self::runtime()?;
        let client = Self::client()?;
        match rt.block_on(self.revision_info(&client, kind, id, revision)) {
            Ok(info) => {
                let commit = info.sha.filter(|s| is_commit(s)).ok_or_else(|| HubError::Protocol {
                    url: self.page(kind, id),
                    message: "no commit sha in the revision info".into(),
                })?;
                Ok(Resolution { commit, note: None })
            }
            Err(HubError::Network { url, message }) => match repo.commit_of(revision) {
                Some(commit) => Ok(Resolution {
                    commit,
                    note: Some(format!("the Hub is unreachable ({message}): the cached snapshot")),
                }),
                None => Err(HubError::Network { url, message }),
            },
            Err(e) => Err(e),
        }
    }

    /// The files of the repository at `commit`, with sizes: from the Hub, or offline from the
    /// cached snapshot.
    pub fn list(&self, kind: RepoKind, id: &str, commit: &str) -> Result<Vec<RemoteFile>, HubError> {
        let snapshot = self.repo(kind, id).snapshot(commit);
        let local = || -> Vec<RemoteFile> {
            let mut out = Vec::new();
            let mut stack = vec![snapshot.clone()];
            while let Some(dir) = stack.pop() {
                for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if let (Ok(rel), Ok(meta)) = (p.strip_prefix(&snapshot), fs::metadata(&p)) {
                        out.push(RemoteFile { path: rel.to_string_lossy().into_owned(), size: Some(meta.len()) });
                    }
                }
            }
            out.sort_by(|a, b| a.path.cmp(&b.path));
            out
        };
        if let Some(why) = &self.offline {
            if snapshot.is_dir() {
                return Ok(local());
            }
            return Err(self.offline_error(kind, id, commit, "the snapshot".into(), why));
        }
        let rt = Self::runtime()?;
        let client = Self::client()?;
        match rt.block_on(self.revision_info(&client, kind, id, commit)) {
            Ok(info) => Ok(info
                .siblings
                .into_iter()
                .map(|s| RemoteFile { size: s.lfs.and_then(|l| l.size).or(s.size), path: s.rfilename })
                .collect()),
            Err(HubError::Network { .. }) if snapshot.is_dir() => Ok(local()),
            Err(e) => Err(e),
        }
    }

    /// Makes `files` of the repository at `commit` present in the cache and returns the
    /// snapshot folder; records that `revision` points at `commit`. Files already cached are
    /// not fetched again.
    pub fn download(
        &self,
        kind: RepoKind,
        id: &str,
        revision: &str,
        commit: &str,
        files: &[RemoteFile],
        progress: &dyn DownloadProgress,
    ) -> Result<PathBuf, HubError> {
        let repo = self.repo(kind, id);
        let snapshot = repo.snapshot(commit);
        let todo: Vec<&RemoteFile> = files.iter().filter(|f| !snapshot.join(&f.path).is_file()).collect();
        if let Some(first) = todo.first() {
            if let Some(why) = &self.offline {
                return Err(self.offline_error(kind, id, revision, format!("file `{}`", first.path), why));
            }
            progress.total(todo.iter().filter_map(|f| f.size).sum());
            let rt = Self::runtime()?;
            let client = Self::client()?;
            rt.block_on(
                futures::stream::iter(todo)
                    .map(|f| self.fetch_file(&client, kind, id, commit, f, progress))
                    .buffer_unordered(PARALLEL_FILES)
                    .try_collect::<Vec<()>>(),
            )?;
        }
        if !is_commit(revision) {
            repo.write_ref(revision, commit)?;
        }
        Ok(snapshot)
    }

    async fn fetch_file(
        &self,
        client: &reqwest::Client,
        kind: RepoKind,
        id: &str,
        commit: &str,
        file: &RemoteFile,
        progress: &dyn DownloadProgress,
    ) -> Result<(), HubError> {
        let mut last = None;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
            }
            match self.try_fetch(client, kind, id, commit, file, progress).await {
                Ok(()) => {
                    progress.file_done(&file.path);
                    return Ok(());
                }
                Err(e) if retryable(&e) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    async fn try_fetch(
        &self,
        client: &reqwest::Client,
        kind: RepoKind,
        id: &str,
        commit: &str,
        file: &RemoteFile,
        progress: &dyn DownloadProgress,
    ) -> Result<(), HubError> {
        let url = format!(
            "{}/{}{}/resolve/{commit}/{}",
            self.endpoint,
            kind.url_prefix(),
            encode(id, true),
            encode(&file.path, true)
        );
        let net = |url: &str, e: reqwest::Error| HubError::Network { url: url.to_string(), message: e.to_string() };
        let head = self.authed(client.head(&url), &url).send().await.map_err(|e| net(&url, e))?;
        let status = head.status();
        if !(status.is_success() || status.is_redirection()) {
            let what = format!("file `{}` of {} `{id}` at {commit}", file.path, kind.noun());
            return Err(self.status_error(kind, id, &url, &head, what));
        }
        let header = |name: &str| head.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let etag = header("x-linked-etag")
            .or_else(|| header(ETAG.as_str()))
            .map(|e| normalize_etag(&e))
            .filter(|e| !e.is_empty() && !e.contains('/'))
            .ok_or_else(|| HubError::Protocol { url: url.clone(), message: "no ETag header".into() })?;
        let size = header("x-linked-size")
            .or_else(|| if status.is_success() { header(CONTENT_LENGTH.as_str()) } else { None })
            .and_then(|s| s.parse::<u64>().ok())
            .or(file.size);
        let mut target = url.clone();
        if status.is_redirection() {
            let loc = header(LOCATION.as_str()).ok_or_else(|| HubError::Protocol {
                url: url.clone(),
                message: "a redirect without Location".into(),
            })?;
            target = absolute(&self.endpoint, &loc);
        }

        let repo = self.repo(kind, id);
        let blob = repo.blob(&etag);
        let blobs = blob.parent().expect("blobs/").to_path_buf();
        fs::create_dir_all(&blobs).map_err(HubError::io(&blobs))?;
        // One writer per blob, across processes (huggingface_hub's lock file, so the two tools
        // exclude each other too).
        let locks = self.cache.join(".locks").join(repo.dir.file_name().expect("repo folder"));
        fs::create_dir_all(&locks).map_err(HubError::io(&locks))?;
        let lock_path = locks.join(format!("{etag}.lock"));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(HubError::io(&lock_path))?;
        while lock.try_lock().is_err() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if blob.is_file() {
            progress.advance(size.unwrap_or(0));
            repo.link(commit, &file.path, &etag)?;
            return Ok(());
        }

        let partial = blobs.join(format!("{etag}.incomplete"));
        let mut have = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        if size.is_some_and(|s| have > s) {
            fs::remove_file(&partial).map_err(HubError::io(&partial))?;
            have = 0;
        }
        let mut check = Check::new(&etag, size);
        let mut resp = None;
        for _hop in 0..5 {
            let mut rb = self.authed(client.get(&target), &target);
            if have > 0 {
                rb = rb.header(RANGE, format!("bytes={have}-"));
            }
            let r = rb.send().await.map_err(|e| net(&target, e))?;
            if r.status().is_redirection() {
                let loc = r.headers().get(LOCATION).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
                target = absolute(&target, &loc);
                continue;
            }
            resp = Some(r);
            break;
        }
        let resp = resp.ok_or_else(|| HubError::Protocol { url: url.clone(), message: "too many redirects".into() })?;
        let mut out = match resp.status() {
            StatusCode::PARTIAL_CONTENT if have > 0 => {
                check.feed_file(&partial)?;
                progress.advance(have);
                OpenOptions::new().append(true).open(&partial).map_err(HubError::io(&partial))?
            }
            StatusCode::RANGE_NOT_SATISFIABLE if have > 0 && size == Some(have) => {
                check.feed_file(&partial)?;
                progress.advance(have);
                return self.finish(check, &partial, &blob, &repo, commit, &file.path, &etag);
            }
            s if s.is_success() => File::create(&partial).map_err(HubError::io(&partial))?,
            _ => {
                let what = format!("file `{}` of {} `{id}` at {commit}", file.path, kind.noun());
                return Err(self.status_error(kind, id, &target, &resp, what));
            }
        };
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| net(&target, e))?;
            out.write_all(&chunk).map_err(HubError::io(&partial))?;
            check.feed(&chunk);
            progress.advance(chunk.len() as u64);
        }
        out.flush().map_err(HubError::io(&partial))?;
        drop(out);
        if let Some(s) = size
            && check.len < s
        {
            // The connection ended early: keep the partial file, and resume.
            return Err(HubError::Network {
                url: target,
                message: format!("the connection closed after {} of {s} bytes", check.len),
            });
        }
        self.finish(check, &partial, &blob, &repo, commit, &file.path, &etag)
    }

    /// Checks the completed partial file and gives it its blob name and its snapshot link.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        check: Check,
        partial: &Path,
        blob: &Path,
        repo: &CachedRepo,
        commit: &str,
        path: &str,
        etag: &str,
    ) -> Result<(), HubError> {
        if let Err((expected, got)) = check.verify() {
            let _ = fs::remove_file(partial);
            return Err(HubError::Integrity { file: path.to_string(), expected, got });
        }
        fs::rename(partial, blob).map_err(HubError::io(blob))?;
        repo.link(commit, path, etag)?;
        Ok(())
    }
}

/// `loc` made absolute against `base`'s origin when it is a path.
fn absolute(base: &str, loc: &str) -> String {
    if loc.starts_with("http://") || loc.starts_with("https://") {
        return loc.to_string();
    }
    let origin_end =
        base.find("://").map(|i| i + 3).and_then(|s| base[s..].find('/').map(|j| s + j)).unwrap_or(base.len());
    format!("{}/{}", &base[..origin_end], loc.trim_start_matches('/'))
}

/// What a download must add up to: its size, and the hash its etag names (sha256 for LFS
/// files, the git blob sha1 for others; other etags are checked by size only).
struct Check {
    etag: String,
    size: Option<u64>,
    len: u64,
    sha256: Option<sha2::Sha256>,
    git_sha1: Option<sha1::Sha1>,
}

impl Check {
    fn new(etag: &str, size: Option<u64>) -> Check {
        let hex = etag.bytes().all(|b| b.is_ascii_hexdigit());
        let sha256 = (hex && etag.len() == 64).then(sha2::Sha256::new);
        let git_sha1 = match size {
            Some(s) if hex && etag.len() == 40 => {
                let mut h = sha1::Sha1::new();
                h.update(format!("blob {s}\0").as_bytes());
                Some(h)
            }
            _ => None,
        };
        Check { etag: etag.to_ascii_lowercase(), size, len: 0, sha256, git_sha1 }
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.len += bytes.len() as u64;
        if let Some(h) = &mut self.sha256 {
            h.update(bytes);
        }
        if let Some(h) = &mut self.git_sha1 {
            sha1::Digest::update(h, bytes);
        }
    }

    fn feed_file(&mut self, path: &Path) -> Result<(), HubError> {
        let mut f = File::open(path).map_err(HubError::io(path))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(HubError::io(path))?;
            if n == 0 {
                return Ok(());
            }
            self.feed(&buf[..n]);
        }
    }

    fn verify(self) -> Result<(), (String, String)> {
        if let Some(s) = self.size
            && s != self.len
        {
            return Err((format!("{s} bytes"), format!("{} bytes", self.len)));
        }
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        if let Some(h) = self.sha256 {
            let got = hex(&h.finalize());
            if got != self.etag {
                return Err((format!("sha256 {}", self.etag), format!("sha256 {got}")));
            }
        }
        if let Some(h) = self.git_sha1 {
            let got = hex(&sha1::Digest::finalize(h));
            if got != self.etag {
                return Err((format!("git blob {}", self.etag), format!("git blob {got}")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_encode_revisions_but_keep_file_paths() {
        assert_eq!(encode("refs/convert/parquet", false), "refs%2Fconvert%2Fparquet");
        assert_eq!(encode("data/train-00000.parquet", true), "data/train-00000.parquet");
        assert_eq!(encode("a b", true), "a%20b");
        assert_eq!(absolute("http://h:1/x/resolve/c/f", "/cdn/blob"), "http://h:1/cdn/blob");
        assert_eq!(absolute("http://h:1/x", "https://cdn/b"), "https://cdn/b");
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
    }

    #[test]
    fn checks_sha256_and_git_blob_hashes() {
        let data = b"hello\n";
        // `git hash-object` of "hello\n".
        let mut c = Check::new("ce013625030ba8dba906f756967f9e9ca394464a", Some(6));
        c.feed(data);
        assert!(c.verify().is_ok());
        let sha = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
        let mut c = Check::new(sha, Some(6));
        c.feed(b"hellO\n");
        assert!(c.verify().is_err());
        let mut c = Check::new(sha, Some(7));
        c.feed(data);
        assert_eq!(c.verify().unwrap_err().0, "7 bytes");
    }
}
