//! Where a dataset's rows come from: the local files a `datasets:` entry names.
//!
//! A path is a file or a folder of files (a Hugging Face Hub id is fetched by [`crate::hub`]).
//! A dataset found nowhere is an error that lists every place tried. The files returned are
//! what the fetch stage's key hashes (their contents, never their names).

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
/// honoured. A Hub id (not a local path) is not local: see [`is_hub_dataset`] and [`crate::hub`].
pub fn source_files(ds: &DatasetConfig, base_dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    if ds.path.starts_with("stage:") {
        return Err(DataError::Config(format!(
            "dataset `{}` is a stage output: pass that artifact's data.parquet to fetch_dataset directly",
            ds.path
        )));
    }
    let local = local_path(ds, base_dir);
    if local.exists() {
        return select(&local, ds);
    }
    let mut tried = vec![format!("local path {} (does not exist)", local.display())];
    if looks_like_hub_id(&ds.path) {
        tried.push("the Hugging Face Hub (it is an id: the fetch stage downloads it)".into());
    }
    Err(DataError::NotFound { name: ds.path.clone(), tried })
}

/// The entry's path resolved against `base_dir` (`~/` expanded).
fn local_path(ds: &DatasetConfig, base_dir: &Path) -> PathBuf {
    let local = expand_home(&ds.path);
    if local.is_absolute() { local } else { base_dir.join(local) }
}

/// Whether the entry names a Hub dataset: no local file or folder by that name, and an
/// `org/name` (or `name`) shaped id.
pub fn is_hub_dataset(ds: &DatasetConfig, base_dir: &Path) -> bool {
    !ds.path.starts_with("stage:") && !local_path(ds, base_dir).exists() && looks_like_hub_id(&ds.path)
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

/// Every readable data file under `dir`, recursively, sorted; hidden entries skipped. Links
/// are followed, and a link back to a folder above it (a loop) is an error naming it, never an
/// endless walk.
fn walk(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let hidden = |e: &walkdir::DirEntry| e.depth() > 0 && e.file_name().to_str().is_some_and(|n| n.starts_with('.'));
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(dir).follow_links(true).into_iter().filter_entry(|e| !hidden(e)) {
        let entry = entry.map_err(|e| {
            let path = e.path().unwrap_or(dir).to_path_buf();
            match e.loop_ancestor() {
                Some(a) => DataError::io(
                    path,
                    std::io::Error::other(format!("a symbolic link loop (it leads back to {})", a.display())),
                ),
                None => DataError::io(path, e.into_io_error().unwrap_or_else(|| std::io::Error::other("unreadable"))),
            }
        })?;
        if entry.file_type().is_file() && format_of(entry.path(), None).is_ok() {
            out.push(entry.into_path());
        }
    }
    out.sort();
    Ok(out)
}

/// The split a file belongs to by Hugging Face's naming conventions: a folder named after the
/// split, or a file name starting with it (`train.jsonl`, `test-00000-of-00001.parquet`).
fn split_of(root: &Path, file: &Path) -> Option<&'static str> {
    let rel = file.strip_prefix(root).unwrap_or(file);
    split_of_components(rel.iter().filter_map(|c| c.to_str()))
}

/// [`split_of`] over the components of a relative path.
pub(crate) fn split_of_components<'a>(mut components: impl Iterator<Item = &'a str>) -> Option<&'static str> {
    components.find_map(|comp| {
        let stem = comp.split(['.', '-', '_']).next().unwrap_or(comp);
        SPLITS.contains(&stem).then(|| canonical_split(stem))
    })
}

/// `valid`, `val`, `dev` and `eval` all name the validation split.
pub(crate) fn canonical_split(s: &str) -> &'static str {
    match s {
        "train" => "train",
        "test" => "test",
        "validation" | "valid" | "val" | "dev" | "eval" => "validation",
        _ => "other",
    }
}
