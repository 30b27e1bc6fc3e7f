//! Where a dataset's rows come from: the local files a `datasets:` entry names.
//!
//! A path is a file, a folder of files, or a Hugging Face Hub id. Hub ids are looked up in the
//! local Hugging Face cache only: the Hub itself is not reachable from newt, and a dataset found
//! nowhere is an error that lists every place tried. The files returned are what the fetch
//! stage's key hashes (their contents, never their names).

use std::path::{Path, PathBuf};

use newt_config::DatasetConfig;

use crate::DataError;

/// File extensions newt reads, and the format each one means.
const FORMATS: &[(&str, Format)] = &[
    ("jsonl", Format::Json),
    ("json", Format::Json),
    ("ndjson", Format::Json),
    ("parquet", Format::Parquet),
    ("csv", Format::Csv),
    ("txt", Format::Text),
];

/// Split names Hugging Face's file-naming conventions recognise (`train-0000.parquet`,
/// `data/test.jsonl`, `validation/...`).
const SPLITS: &[&str] = &["train", "test", "validation", "valid", "val", "dev", "eval"];

/// A file format newt can read rows from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// JSON Lines, a JSON array of records, or `{"data": [...]}`.
    Json,
    /// Apache Parquet.
    Parquet,
    /// CSV with a header row.
    Csv,
    /// Plain text, one row per line.
    Text,
}

/// The format of `file`: `ds_type` when the dataset sets one, else the file's extension.
pub fn format_of(file: &Path, ds_type: Option<&str>) -> Result<Format, DataError> {
    if let Some(t) = ds_type {
        return match t {
            "json" | "jsonl" => Ok(Format::Json),
            "parquet" => Ok(Format::Parquet),
            "csv" => Ok(Format::Csv),
            "text" | "txt" => Ok(Format::Text),
            other => {
                Err(DataError::Config(format!("`ds_type: {other}` is not supported; use json, parquet, csv or text")))
            }
        };
    }
    let ext = file.extension().and_then(|e| e.to_str()).unwrap_or_default().to_ascii_lowercase();
    FORMATS.iter().find(|(e, _)| *e == ext).map(|(_, f)| *f).ok_or_else(|| {
        DataError::Config(format!(
            "{}: unknown file type `.{ext}`; newt reads .jsonl, .json, .parquet, .csv and .txt (or set `ds_type`)",
            file.display()
        ))
    })
}

/// The local files holding a dataset's rows, sorted: folders expanded, `data_files` and `split`
/// honoured, Hub ids resolved in the local Hugging Face cache.
pub fn source_files(ds: &DatasetConfig, base_dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    if ds.path.starts_with("stage:") {
        return Err(DataError::Config(format!(
            "dataset `{}` is a stage output: pass that artifact's data.parquet to fetch_dataset directly",
            ds.path
        )));
    }
    let mut tried = Vec::new();
    let local = expand_home(&ds.path);
    let local = if local.is_absolute() { local } else { base_dir.join(local) };
    if local.exists() {
        return select(&local, ds);
    }
    tried.push(format!("local path {} (does not exist)", local.display()));
    if looks_like_hub_id(&ds.path) {
        match hub_cache_snapshot(&ds.path, ds.revision.as_deref(), &mut tried) {
            Some(snapshot) => return select(&snapshot, ds),
            None => tried.push("the Hugging Face Hub (not reachable from newt; downloading is not implemented)".into()),
        }
    }
    Err(DataError::NotFound { name: ds.path.clone(), tried })
}

fn expand_home(path: &str) -> PathBuf {
    match path.strip_prefix("~/") {
        Some(rest) => dirs::home_dir().map(|h| h.join(rest)).unwrap_or_else(|| PathBuf::from(path)),
        None => PathBuf::from(path),
    }
}

/// `org/name` (or `name`) with no file extension and no path punctuation.
fn looks_like_hub_id(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    !path.starts_with('.')
        && !path.starts_with('/')
        && (1..=2).contains(&parts.len())
        && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
        && Path::new(path).extension().and_then(|e| e.to_str()).is_none_or(|e| !FORMATS.iter().any(|(f, _)| *f == e))
}

/// The Hugging Face hub cache folder, as huggingface_hub (and newt-model's `hf`) resolve it:
/// `HF_HUB_CACHE` (or `HUGGINGFACE_HUB_CACHE`), `HF_HOME/hub`, `XDG_CACHE_HOME/huggingface/hub`,
/// or `~/.cache/huggingface/hub`. A variable set to the empty string counts as unset.
fn hub_cache_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return Some(p);
    }
    if let Some(home) = var("HF_HOME") {
        return Some(home.join("hub"));
    }
    let base = var("XDG_CACHE_HOME").or_else(|| dirs::home_dir().map(|h| h.join(".cache")));
    base.map(|b| b.join("huggingface").join("hub"))
}

/// The snapshot folder of a cached dataset repo (`datasets--org--name/snapshots/<commit>`), for
/// `revision` (a commit, or a ref under `refs/`), else `refs/main`, else the only snapshot.
fn hub_cache_snapshot(id: &str, revision: Option<&str>, tried: &mut Vec<String>) -> Option<PathBuf> {
    let Some(cache) = hub_cache_dir() else {
        tried.push("the Hugging Face cache (no home directory to find it in)".into());
        return None;
    };
    let repo = cache.join(format!("datasets--{}", id.replace('/', "--")));
    if !repo.is_dir() {
        tried.push(format!("the Hugging Face cache {} (no such folder)", repo.display()));
        return None;
    }
    let snapshots = repo.join("snapshots");
    let wanted = revision.unwrap_or("main");
    let commit = std::fs::read_to_string(repo.join("refs").join(wanted))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| wanted.to_string());
    let direct = snapshots.join(&commit);
    if direct.is_dir() {
        return Some(direct);
    }
    let all: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect())
        .unwrap_or_default();
    if revision.is_none() && all.len() == 1 {
        return all.into_iter().next();
    }
    tried.push(format!(
        "the Hugging Face cache {} (no snapshot for revision `{wanted}`; {} snapshot(s) present)",
        repo.display(),
        all.len()
    ));
    None
}

/// The data files under `root` that the dataset entry selects.
fn select(root: &Path, ds: &DatasetConfig) -> Result<Vec<PathBuf>, DataError> {
    if root.is_file() {
        return Ok(vec![root.to_path_buf()]);
    }
    if let Some(wanted) = &ds.data_files {
        let mut files = Vec::new();
        for f in wanted.to_vec() {
            let p = root.join(&f);
            if p.is_dir() {
                files.extend(walk(&p)?);
            } else if p.is_file() {
                files.push(p);
            } else {
                return Err(DataError::NotFound {
                    name: ds.path.clone(),
                    tried: vec![format!("data file {} (does not exist)", p.display())],
                });
            }
        }
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let mut root = root.to_path_buf();
    if let Some(name) = &ds.name {
        // Hub repos with several configurations keep each in a folder named after it.
        if root.join(name).is_dir() {
            root = root.join(name);
        }
    }
    let files = walk(&root)?;
    let requested = ds.split.as_deref().unwrap_or("train");
    let split = canonical_split(requested);
    let tagged: Vec<(PathBuf, Option<&str>)> = files.iter().map(|f| (f.clone(), split_of(&root, f))).collect();
    let selected: Vec<PathBuf> = if tagged.iter().any(|(_, s)| s.is_some()) {
        tagged.into_iter().filter(|(_, s)| *s == Some(split)).map(|(f, _)| f).collect()
    } else {
        files
    };
    if selected.is_empty() {
        return Err(DataError::NotFound {
            name: ds.path.clone(),
            tried: vec![format!("files of split `{requested}` with a known extension under {}", root.display())],
        });
    }
    Ok(selected)
}

/// Every readable data file under `dir`, recursively, sorted; hidden entries skipped.
fn walk(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| DataError::io(&d, e))?;
        for entry in entries {
            let path = entry.map_err(|e| DataError::io(&d, e))?.path();
            if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')) {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if format_of(&path, None).is_ok() {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The split a file belongs to by Hugging Face's naming conventions: a folder named after the
/// split, or a file name starting with it (`train.jsonl`, `test-00000-of-00001.parquet`).
fn split_of(root: &Path, file: &Path) -> Option<&'static str> {
    let rel = file.strip_prefix(root).unwrap_or(file);
    rel.iter().filter_map(|c| c.to_str()).find_map(|comp| {
        let stem = comp.split(['.', '-', '_']).next().unwrap_or(comp);
        SPLITS.contains(&stem).then(|| canonical_split(stem))
    })
}

/// `valid`, `val`, `dev` and `eval` all name the validation split.
fn canonical_split(s: &str) -> &'static str {
    match s {
        "train" => "train",
        "test" => "test",
        "validation" | "valid" | "val" | "dev" | "eval" => "validation",
        _ => "other",
    }
}
