//! Hub ids in a pipeline: which repository files a `base_model` needs, the progress of a
//! download on the stage's bar, and what `newt plan` / `newt run` list before downloading.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use newt_config::Config;
use newt_graph::Progress;
use newt_hub::{DownloadProgress, Hub, RemoteFile, RepoKind};
use newt_model::hf::{OPTIONAL_FILES, REQUIRED_FILES};

/// The key of a fetch stage's remote input: `models/org/name@<commit>`.
pub const REMOTE_KEY: &str = "hub";
/// The files it reads there (JSON `[[path, size], ...]`).
pub const REMOTE_FILES: &str = "files";
/// The revision, when it is the Hub's Parquet conversion.
pub const REMOTE_CONVERTED: &str = "converted";

/// A `base_model` that names a Hub repository: `org/name`, `org/name@revision`, or
/// `org/name/file.gguf` (one GGUF file of a repository).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubModelRef {
    /// `org/name`.
    pub id: String,
    /// `main` unless given after `@`.
    pub revision: String,
    /// The GGUF file, for the third form.
    pub gguf: Option<String>,
}

impl HubModelRef {
    /// [`HubModelRef::parse`] with `revision_of_model` (an `@revision` in the id wins).
    pub fn of(p: &newt_config::params::FetchModelParams, base_dir: &Path) -> Option<HubModelRef> {
        let mut r = Self::parse(&p.base_model, base_dir)?;
        if let Some(rev) = &p.revision
            && !p.base_model.contains('@')
        {
            r.revision = rev.clone();
        }
        Some(r)
    }

    /// Parses `base_model` when it is a Hub id and no local file or folder has that name.
    pub fn parse(base_model: &str, base_dir: &Path) -> Option<HubModelRef> {
        if base_model.starts_with("newt:")
            || base_model.starts_with('.')
            || base_model.starts_with('/')
            || base_model.starts_with('~')
            || base_dir.join(base_model).exists()
        {
            return None;
        }
        let (path, revision) = match base_model.split_once('@') {
            Some((p, r)) if !r.is_empty() => (p, r.to_string()),
            Some(_) => return None,
            None => (base_model, "main".to_string()),
        };
        let parts: Vec<&str> = path.split('/').collect();
        let (id, gguf) = match parts.as_slice() {
            [org, name] => (format!("{org}/{name}"), None),
            [org, name, file] if file.ends_with(".gguf") => (format!("{org}/{name}"), Some(file.to_string())),
            _ => return None,
        };
        newt_hub::valid_repo_id(&id).then_some(HubModelRef { id, revision, gguf })
    }
}

/// The files of a model repository newt reads: config, tokenizer files, safetensors weights
/// (and their index), generation config and chat template; or the one GGUF file asked for.
pub fn model_files(r: &HubModelRef, listing: &[RemoteFile]) -> anyhow::Result<Vec<RemoteFile>> {
    let has = |name: &str| listing.iter().find(|f| f.path == name).cloned();
    if let Some(g) = &r.gguf {
        return has(g).map(|f| vec![f]).ok_or_else(|| {
            let ggufs: Vec<&str> = listing.iter().map(|f| f.path.as_str()).filter(|p| p.ends_with(".gguf")).collect();
            anyhow::anyhow!("model `{}` has no file `{g}`; its GGUF files: {}", r.id, ggufs.join(", "))
        });
    }
    let mut out = Vec::new();
    let mut missing = Vec::new();
    for name in REQUIRED_FILES {
        match has(name) {
            Some(f) => out.push(f),
            None => missing.push(name.to_string()),
        }
    }
    out.extend(OPTIONAL_FILES.iter().filter_map(|n| has(n)));
    // Top-level safetensors only (sub-folders such as `original/` hold other formats).
    let weights: Vec<RemoteFile> = listing
        .iter()
        .filter(|f| {
            !f.path.contains('/') && (f.path.ends_with(".safetensors") || f.path == "model.safetensors.index.json")
        })
        .cloned()
        .collect();
    if !weights.iter().any(|f| f.path.ends_with(".safetensors")) {
        missing.push("*.safetensors weights (PyTorch .bin checkpoints are not read)".into());
    }
    if !missing.is_empty() {
        anyhow::bail!("model `{}` at `{}` lacks {}", r.id, r.revision, missing.join(", "));
    }
    out.extend(weights);
    Ok(out)
}

/// A fetch stage's remote inputs for a Hub repository at a commit with these files.
pub fn remote_inputs(kind: RepoKind, id: &str, commit: &str, files: &[(String, Option<u64>)]) -> Vec<(String, String)> {
    vec![
        (REMOTE_KEY.into(), format!("{}/{id}@{commit}", kind.cache_prefix())),
        (REMOTE_FILES.into(), serde_json::to_string(files).expect("files serialize")),
    ]
}

/// The (id, commit, files) a fetch stage's remote inputs hold.
pub fn parse_remote(
    remote: &std::collections::BTreeMap<String, String>,
) -> anyhow::Result<Option<(String, String, Vec<RemoteFile>)>> {
    let Some(hub) = remote.get(REMOTE_KEY) else { return Ok(None) };
    let (repo, commit) = hub.rsplit_once('@').ok_or_else(|| anyhow::anyhow!("bad remote input `{hub}`"))?;
    let id = repo.split_once('/').map(|(_, id)| id).unwrap_or(repo).to_string();
    let files: Vec<(String, Option<u64>)> =
        serde_json::from_str(remote.get(REMOTE_FILES).map_or("[]", String::as_str))?;
    let files = files.into_iter().map(|(path, size)| RemoteFile { path, size }).collect();
    Ok(Some((id, commit.to_string(), files)))
}

/// A download drawn on a stage's progress bar (bytes; rate and ETA in the message).
pub struct Downloading<'a> {
    progress: &'a dyn Progress,
    what: String,
    done: AtomicU64,
    total: AtomicU64,
    t0: Instant,
}

impl<'a> Downloading<'a> {
    /// Progress of downloading `what` on `progress`.
    pub fn new(progress: &'a dyn Progress, what: impl Into<String>) -> Self {
        Downloading {
            progress,
            what: what.into(),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            t0: Instant::now(),
        }
    }
}

/// `1.5 GB`.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..1_000 => format!("{bytes} B"),
        1_000..1_000_000 => format!("{:.1} kB", b / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", b / 1e6),
        _ => format!("{:.2} GB", b / 1e9),
    }
}

impl DownloadProgress for Downloading<'_> {
    fn total(&self, bytes: u64) {
        self.total.store(bytes, Ordering::Relaxed);
        self.progress.set_total(bytes);
        self.progress.log(format!("downloading {} ({}) from the Hub", self.what, human(bytes)));
    }
    fn advance(&self, bytes: u64) {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let total = self.total.load(Ordering::Relaxed);
        let rate = done as f64 / self.t0.elapsed().as_secs_f64().max(1e-3);
        self.progress.set_position(done);
        self.progress.set_message(format!("{} / {} at {}/s", human(done), human(total), human(rate as u64)));
    }
    fn file_done(&self, path: &str) {
        self.progress.log(format!("downloaded {path}"));
    }
}

/// One download a run would make: what, how big, and whether it is cached already.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlannedDownload {
    /// `models/org/name@<commit>`.
    pub repo: String,
    /// Files not in the Hugging Face cache yet.
    pub files: usize,
    /// Their bytes (known sizes).
    pub bytes: u64,
    /// Why the answer came from the cache alone, when it did.
    pub note: Option<String>,
}

/// The Hub downloads a pipeline needs (nothing for local files, cached files excluded).
pub fn planned_downloads(config: &Config, base_dir: &Path) -> anyhow::Result<Vec<PlannedDownload>> {
    let mut out = Vec::new();
    let needed: Vec<(RepoKind, String, String, Vec<RemoteFile>, Option<String>)> = {
        let mut v = Vec::new();
        if let Some(r) = HubModelRef::of(&newt_config::params::FetchModelParams::from_config(config), base_dir) {
            let hub = Hub::from_env()?;
            let res = hub.resolve(RepoKind::Model, &r.id, &r.revision)?;
            let files = model_files(&r, &hub.list(RepoKind::Model, &r.id, &res.commit)?)?;
            v.push((RepoKind::Model, r.id.clone(), res.commit, files, res.note));
        }
        for ds in &config.datasets {
            if newt_data::is_hub_dataset(ds, base_dir) {
                let hub = Hub::from_env()?;
                let d = newt_data::hub::resolve(ds, &hub)?;
                let files = d.files.iter().map(|(path, size)| RemoteFile { path: path.clone(), size: *size }).collect();
                v.push((RepoKind::Dataset, d.id, d.commit, files, d.note));
            }
        }
        v
    };
    for (kind, id, commit, files, note) in needed {
        let hub = Hub::from_env()?;
        let snapshot: PathBuf = hub.repo(kind, &id).snapshot(&commit);
        let todo: Vec<&RemoteFile> = files.iter().filter(|f| !snapshot.join(&f.path).is_file()).collect();
        out.push(PlannedDownload {
            repo: format!("{}/{id}@{commit}", kind.cache_prefix()),
            files: todo.len(),
            bytes: todo.iter().filter_map(|f| f.size).sum(),
            note,
        });
    }
    Ok(out)
}
