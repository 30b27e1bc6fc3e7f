//! Datasets named by their Hugging Face Hub id: which of the repository's files a `datasets:`
//! entry selects (as Axolotl and `datasets` pick them: `data_files`, `name`, `split`), the
//! Hub's Parquet conversion for repositories that hold only a loading script, and the download.

use std::path::PathBuf;

use newt_config::DatasetConfig;
use newt_hub::{DownloadProgress, Hub, RemoteFile, RepoKind};

use crate::DataError;
use crate::source::{canonical_split, format_of, split_of_components};

/// The revision where the Hub keeps its automatic Parquet conversion of a dataset.
pub const PARQUET_CONVERSION: &str = "refs/convert/parquet";

/// What a Hub dataset entry resolves to: the commit, and the files it reads there.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HubDataset {
    /// The repository id.
    pub id: String,
    /// The revision asked for (`main` by default, or [`PARQUET_CONVERSION`]).
    pub revision: String,
    /// The commit it names.
    pub commit: String,
    /// The selected files, with sizes when known.
    pub files: Vec<(String, Option<u64>)>,
    /// How the commit was found when not from the Hub (offline, unreachable).
    #[serde(skip)]
    pub note: Option<String>,
}

fn hub_err(e: newt_hub::HubError) -> DataError {
    DataError::Config(e.to_string())
}

/// Resolves a Hub dataset entry: its revision's commit and the files it selects. A repository
/// with no data file newt reads (a loading script) falls back to the Hub's Parquet conversion.
pub fn resolve(ds: &DatasetConfig, hub: &Hub) -> Result<HubDataset, DataError> {
    let revision = ds.revision.clone().unwrap_or_else(|| "main".into());
    let r = hub.resolve(RepoKind::Dataset, &ds.path, &revision).map_err(hub_err)?;
    let listing = hub.list(RepoKind::Dataset, &ds.path, &r.commit).map_err(hub_err)?;
    let readable = listing.iter().any(|f| readable(&f.path, ds));
    if readable || ds.data_files.is_some() {
        let files = select_names(&listing, ds)?;
        return Ok(HubDataset { id: ds.path.clone(), revision, commit: r.commit, files, note: r.note });
    }
    // Only a loading script (or nothing newt reads): the Hub's Parquet conversion, whose
    // folders are `<config>/<split>/NNNN.parquet`.
    let conv = hub.resolve(RepoKind::Dataset, &ds.path, PARQUET_CONVERSION).map_err(|e| {
        DataError::Config(format!(
            "dataset `{}` has no data file newt reads (.jsonl, .json, .parquet, .csv, .txt) at {}, and its Parquet \
             conversion is unavailable: {e}",
            ds.path, r.commit
        ))
    })?;
    let listing = hub.list(RepoKind::Dataset, &ds.path, &conv.commit).map_err(hub_err)?;
    let mut scoped = ds.clone();
    scoped.name = Some(ds.name.clone().unwrap_or_else(|| "default".into()));
    let files = select_names(&listing, &scoped)?;
    Ok(HubDataset {
        id: ds.path.clone(),
        revision: PARQUET_CONVERSION.into(),
        commit: conv.commit,
        files,
        note: conv.note,
    })
}

/// Downloads the selected files into the Hugging Face cache (those not there yet) and returns
/// their local paths, in order.
pub fn download(d: &HubDataset, hub: &Hub, progress: &dyn DownloadProgress) -> Result<Vec<PathBuf>, DataError> {
    let files: Vec<RemoteFile> =
        d.files.iter().map(|(path, size)| RemoteFile { path: path.clone(), size: *size }).collect();
    let snapshot = hub.download(RepoKind::Dataset, &d.id, &d.revision, &d.commit, &files, progress).map_err(hub_err)?;
    Ok(d.files.iter().map(|(p, _)| snapshot.join(p)).collect())
}

fn hidden(path: &str) -> bool {
    path.split('/').any(|c| c.starts_with('.'))
}

fn readable(path: &str, ds: &DatasetConfig) -> bool {
    !hidden(path)
        && format_of(std::path::Path::new(path), ds.ds_type.as_deref()).is_ok()
        && (ds.ds_type.is_none() || format_of(std::path::Path::new(path), None).is_ok())
}

/// `*` matches any run of characters but `/`; `**` any run at all.
fn glob(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match p {
            [] => n.is_empty(),
            [b'*', b'*', rest @ ..] => (0..=n.len()).any(|i| go(rest, &n[i..])),
            [b'*', rest @ ..] => (0..=n.len()).take_while(|&i| i == 0 || n[i - 1] != b'/').any(|i| go(rest, &n[i..])),
            [c, rest @ ..] => n.first() == Some(c) && go(rest, &n[1..]),
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// The files of a repository listing that a dataset entry reads, by the rules the local
/// folder reader follows: `data_files` (names, folders or `*` patterns), else the folder named
/// after `name` when there is one, then the files of the requested split (all of them when
/// no file is named after a split).
pub fn select_names(listing: &[RemoteFile], ds: &DatasetConfig) -> Result<Vec<(String, Option<u64>)>, DataError> {
    let not_found = |what: String| DataError::NotFound { name: ds.path.clone(), tried: vec![what] };
    let mut chosen: Vec<&RemoteFile> = Vec::new();
    if let Some(wanted) = &ds.data_files {
        for w in wanted.to_vec() {
            let w = w.trim_start_matches("./").trim_end_matches('/').to_string();
            let hits: Vec<&RemoteFile> = listing
                .iter()
                .filter(|f| f.path == w || f.path.starts_with(&format!("{w}/")) || glob(&w, &f.path))
                .filter(|f| !hidden(&f.path))
                .collect();
            if hits.is_empty() {
                return Err(not_found(format!("data file `{w}` in the Hub repository (no such file)")));
            }
            chosen.extend(hits);
        }
    } else {
        let mut files: Vec<&RemoteFile> = listing.iter().filter(|f| readable(&f.path, ds)).collect();
        let mut strip = String::new();
        if let Some(name) = &ds.name {
            let prefix = format!("{name}/");
            if files.iter().any(|f| f.path.starts_with(&prefix)) {
                files.retain(|f| f.path.starts_with(&prefix));
                strip = prefix;
            }
        }
        let requested = ds.split.as_deref().unwrap_or("train");
        let split = canonical_split(requested);
        let tag = |f: &RemoteFile| split_of_components(f.path[strip.len()..].split('/'));
        if files.iter().any(|f| tag(f).is_some()) {
            files.retain(|f| tag(f) == Some(split));
        }
        if files.is_empty() {
            return Err(not_found(format!(
                "files of split `{requested}` with a known extension in the Hub repository{}",
                ds.name.as_ref().map(|n| format!(" (configuration `{n}`)")).unwrap_or_default()
            )));
        }
        chosen = files;
    }
    let mut out: Vec<(String, Option<u64>)> = chosen.into_iter().map(|f| (f.path.clone(), f.size)).collect();
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(names: &[&str]) -> Vec<RemoteFile> {
        names.iter().map(|n| RemoteFile { path: n.to_string(), size: Some(1) }).collect()
    }

    fn names(v: Vec<(String, Option<u64>)>) -> Vec<String> {
        v.into_iter().map(|(n, _)| n).collect()
    }

    #[test]
    fn selects_as_the_local_reader_does() {
        let l = listing(&[
            ".gitattributes",
            "README.md",
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
            "data/test-00000-of-00001.parquet",
            "loader.py",
        ]);
        let ds = DatasetConfig { path: "acme/chats".into(), ..Default::default() };
        assert_eq!(
            names(select_names(&l, &ds).unwrap()),
            ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
        );
        let test = DatasetConfig { split: Some("test".into()), ..ds.clone() };
        assert_eq!(names(select_names(&l, &test).unwrap()), ["data/test-00000-of-00001.parquet"]);
        let pattern = DatasetConfig {
            data_files: Some(newt_config::StringOrList::One("data/*00001*.parquet".into())),
            ..ds.clone()
        };
        assert_eq!(
            names(select_names(&l, &pattern).unwrap()),
            ["data/test-00000-of-00001.parquet", "data/train-00001-of-00002.parquet"]
        );
        let missing = DatasetConfig { data_files: Some(newt_config::StringOrList::One("nope.jsonl".into())), ..ds };
        assert!(select_names(&l, &missing).unwrap_err().to_string().contains("nope.jsonl"));
    }

    #[test]
    fn configurations_are_folders_as_in_the_parquet_conversion() {
        let l = listing(&["default/train/0000.parquet", "default/test/0000.parquet", "other/train/0000.parquet"]);
        let ds = DatasetConfig { path: "acme/scripted".into(), name: Some("default".into()), ..Default::default() };
        assert_eq!(names(select_names(&l, &ds).unwrap()), ["default/train/0000.parquet"]);
        let other = DatasetConfig { name: Some("other".into()), ..ds };
        assert_eq!(names(select_names(&l, &other).unwrap()), ["other/train/0000.parquet"]);
    }
}
