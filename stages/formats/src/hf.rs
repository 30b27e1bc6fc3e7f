//! Hugging Face model folders: what one must contain, copying one, reading its config.json, and
//! finding a Hub model id in the local Hugging Face cache (for `tokenizer_config` and
//! `base_model_config` overrides; `base_model` itself is downloaded by the fetch stage through
//! newt-hub).

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::tensors::{INDEX_FILE, SINGLE_FILE};

/// Files of a tokenizer that travel with a model folder.
pub const TOKENIZER_FILES: &[&str] =
    &["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "added_tokens.json"];

/// Files a model folder must have for newt to load it (weights are checked separately: either
/// `model.safetensors` or the index with every shard it names).
pub const REQUIRED_FILES: &[&str] = &["config.json", "tokenizer.json", "tokenizer_config.json"];

/// Files copied when present.
pub const OPTIONAL_FILES: &[&str] = &[
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
    "tokenizer.model",
];

/// Errors about model folders and the Hub cache.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error(transparent)]
    Ref(#[from] crate::weights_ref::RefError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{dir} is not a complete model folder; missing: {}", missing.join(", "))]
    Incomplete { dir: PathBuf, missing: Vec<String> },
    #[error("{path}: {reason}")]
    BadJson { path: PathBuf, reason: String },
    #[error("`{0}` is not a Hugging Face model id (expected `org/name`)")]
    BadId(String),
    #[error(
        "model `{id}` was not found in the local Hugging Face cache; tried:\n  - {}\n\
         hint: put it in `base_model` once (newt downloads it), or run `huggingface-cli download {id}`, \
         or point HF_HOME / HF_HUB_CACHE at a cache that has it",
        tried.join("\n  - ")
    )]
    NotCached { id: String, tried: Vec<String> },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HfError + '_ {
    move |source| HfError::Io { path: path.to_path_buf(), source }
}

/// The weight files of a folder: `model.safetensors`, or the index plus every shard it names.
/// Names that are missing are pushed to `missing`.
fn weight_files(dir: &Path, missing: &mut Vec<String>) -> Result<Vec<String>, HfError> {
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        let v = read_json(&index)?;
        let map = v["weight_map"]
            .as_object()
            .ok_or_else(|| HfError::BadJson { path: index.clone(), reason: "no `weight_map` object".into() })?;
        let mut shards: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
        shards.sort();
        shards.dedup();
        let folder = crate::weights_ref::Folder::open(dir)?;
        for s in &shards {
            if !folder.has(s) {
                missing.push(format!("{s} (listed in {INDEX_FILE})"));
            }
        }
        let mut files = vec![INDEX_FILE.to_string()];
        files.extend(shards);
        return Ok(files);
    }
    if crate::weights_ref::Folder::open(dir)?.has(SINGLE_FILE) {
        return Ok(vec![SINGLE_FILE.to_string()]);
    }
    missing.push(format!("{SINGLE_FILE} or {INDEX_FILE}"));
    Ok(vec![])
}

/// Checks that `dir` is a complete model folder and lists the files newt would copy from it
/// (required, weights, then optional ones present). The error lists everything missing at once.
pub fn model_files(dir: &Path) -> Result<Vec<String>, HfError> {
    if !dir.is_dir() {
        return Err(HfError::Incomplete { dir: dir.to_path_buf(), missing: vec!["the folder itself".into()] });
    }
    let mut missing: Vec<String> =
        REQUIRED_FILES.iter().filter(|f| !dir.join(f).is_file()).map(|f| f.to_string()).collect();
    let weights = weight_files(dir, &mut missing)?;
    if !missing.is_empty() {
        return Err(HfError::Incomplete { dir: dir.to_path_buf(), missing });
    }
    let mut files: Vec<String> = REQUIRED_FILES.iter().map(|f| f.to_string()).collect();
    files.extend(weights);
    files.extend(OPTIONAL_FILES.iter().filter(|f| dir.join(f).is_file()).map(|f| f.to_string()));
    Ok(files)
}

/// Copies a model folder's files (config, weights and index, tokenizer files, generation
/// config, special tokens map, chat template) into `dst`, created if missing. Nothing is copied
/// when something required is missing. Returns the files written.
pub fn copy_model_dir(src: &Path, dst: &Path) -> Result<Vec<PathBuf>, HfError> {
    fill_model_dir(src, dst, None::<fn(&str, &Path) -> Result<String, HfError>>)
}

/// As [`copy_model_dir`], but the safetensors weights stay where they are: `dst` gets a
/// [`crate::weights_ref`] file naming them, with their digests from `hash` (given the file's
/// name in `src` and the path it is read from). The other files are copied (they are small).
/// Returns the files written.
pub fn reference_model_dir(
    src: &Path,
    dst: &Path,
    hash: impl Fn(&str, &Path) -> Result<String, HfError>,
) -> Result<Vec<PathBuf>, HfError> {
    fill_model_dir(src, dst, Some(hash))
}

fn fill_model_dir(
    src: &Path,
    dst: &Path,
    hash: Option<impl Fn(&str, &Path) -> Result<String, HfError>>,
) -> Result<Vec<PathBuf>, HfError> {
    use crate::weights_ref::{self, WeightRefs};
    let files = model_files(src)?;
    let source = weights_ref::Folder::open(src)?;
    fs::create_dir_all(dst).map_err(io(dst))?;
    let mut out = Vec::with_capacity(files.len());
    let mut refs = Vec::new();
    for f in files {
        let to = dst.join(&f);
        // A weight file `src` itself keeps elsewhere is read from there.
        let from = source.resolve(&f)?.unwrap_or_else(|| src.join(&f));
        match &hash {
            Some(hash) if f.ends_with(".safetensors") => {
                refs.push(weights_ref::reference(&f, &from, hash(&f, &from)?)?)
            }
            // fs::copy follows symlinks (Hub cache snapshots are links into blobs/) and uses
            // copy_file_range, so multi-GB shards are copied in the kernel.
            _ => {
                fs::copy(&from, &to).map_err(io(&to))?;
                out.push(to);
            }
        }
    }
    if !refs.is_empty() {
        weights_ref::write(dst, &WeightRefs { format: 1, files: refs })?;
        out.push(dst.join(weights_ref::REFS_FILE));
    }
    Ok(out)
}

fn read_json(path: &Path) -> Result<Value, HfError> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    serde_json::from_str(&text).map_err(|e| HfError::BadJson { path: path.to_path_buf(), reason: e.to_string() })
}

/// A model folder's config.json.
pub fn read_config_json(dir: &Path) -> Result<Value, HfError> {
    let p = dir.join("config.json");
    if !p.is_file() {
        return Err(HfError::Incomplete { dir: dir.to_path_buf(), missing: vec!["config.json".into()] });
    }
    let v = read_json(&p)?;
    if !v.is_object() {
        return Err(HfError::BadJson { path: p, reason: "not a JSON object".into() });
    }
    Ok(v)
}

/// The Hub cache folder from the environment (newt-hub's rules, which are huggingface_hub's),
/// and which rule picked it.
fn hub_cache_dir(env: impl Fn(&str) -> Option<OsString>) -> Option<(PathBuf, String)> {
    newt_hub::cache::cache_dir_from(env)
}

/// Finds `id` (`org/name`, optionally `org/name@revision`) in the local Hugging Face cache:
/// `models--org--name/snapshots/<commit>`, the commit read from `refs/<revision>` (default
/// `main`) or given directly; with no ref and a single snapshot, that snapshot. The snapshot
/// must hold a config.json. The error lists every place tried.
pub fn resolve_hub_model(id: &str) -> Result<PathBuf, HfError> {
    let (cache, how) = hub_cache_dir(|k| std::env::var_os(k)).ok_or_else(|| HfError::NotCached {
        id: id.to_string(),
        tried: vec!["no HF_HOME, HF_HUB_CACHE or HOME is set".into()],
    })?;
    resolve_in_cache(&cache, &how, id)
}

fn resolve_in_cache(cache: &Path, how: &str, id: &str) -> Result<PathBuf, HfError> {
    let (repo_id, revision) = match id.split_once('@') {
        Some((r, rev)) => (r, Some(rev)),
        None => (id, None),
    };
    if !repo_id.contains('/') || !newt_hub::valid_repo_id(repo_id) {
        return Err(HfError::BadId(id.to_string()));
    }
    let not_cached = |tried: Vec<String>| HfError::NotCached { id: id.to_string(), tried };
    let repo = newt_hub::CachedRepo::new(cache, newt_hub::RepoKind::Model, repo_id).dir;
    let snapshots = repo.join("snapshots");
    if !snapshots.is_dir() {
        return Err(not_cached(vec![format!("{} (cache {how}): no such folder", snapshots.display())]));
    }
    let wanted = revision.unwrap_or("main");
    let ref_file = repo.join("refs").join(wanted);
    let mut tried = Vec::new();
    let commit = match fs::read_to_string(&ref_file) {
        Ok(s) => s.trim().to_string(),
        Err(_) => {
            tried.push(format!("{}: no such ref", ref_file.display()));
            wanted.to_string()
        }
    };
    let snapshot = snapshots.join(&commit);
    let chosen = if snapshot.is_dir() {
        snapshot
    } else {
        tried.push(format!("{}: no such snapshot", snapshot.display()));
        let all: Vec<PathBuf> = fs::read_dir(&snapshots)
            .map_err(io(&snapshots))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        match (revision, &all[..]) {
            (None, [only]) => only.clone(),
            _ => {
                tried.push(format!("{}: {} snapshot(s), none chosen", snapshots.display(), all.len()));
                return Err(not_cached(tried));
            }
        }
    };
    if !chosen.join("config.json").is_file() {
        tried.push(format!("{}: snapshot has no config.json (partial download?)", chosen.display()));
        return Err(not_cached(tried));
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path, text: &str) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    fn model_dir(dir: &Path) {
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
            touch(&dir.join(f), "{}");
        }
        touch(&dir.join("model.safetensors"), "weights");
    }

    #[test]
    fn copy_model_dir_copies_required_weights_and_present_optional_files() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        model_dir(&src);
        touch(&src.join("README.md"), "not copied");
        let dst = t.path().join("dst");
        let out = copy_model_dir(&src, &dst).unwrap();
        let names: Vec<_> = out.iter().map(|p| p.file_name().unwrap().to_str().unwrap().to_string()).collect();
        assert_eq!(
            names,
            ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors", "generation_config.json"]
        );
        assert_eq!(fs::read_to_string(dst.join("model.safetensors")).unwrap(), "weights");
        assert!(!dst.join("README.md").exists());
    }

    #[test]
    fn copy_model_dir_lists_everything_missing_and_copies_nothing() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        touch(&src.join("config.json"), "{}");
        touch(
            &src.join(INDEX_FILE),
            r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#,
        );
        touch(&src.join("model-00001-of-00002.safetensors"), "x");
        let dst = t.path().join("dst");
        let msg = copy_model_dir(&src, &dst).unwrap_err().to_string();
        for want in ["tokenizer.json", "tokenizer_config.json", "model-00002-of-00002.safetensors"] {
            assert!(msg.contains(want), "{msg}");
        }
        assert!(!msg.contains("model-00001"), "{msg}");
        assert!(!dst.exists());
    }

    #[test]
    fn sharded_folders_copy_index_and_every_shard() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        model_dir(&src);
        fs::remove_file(src.join("model.safetensors")).unwrap();
        touch(
            &src.join(INDEX_FILE),
            r#"{"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s1.safetensors"}}"#,
        );
        touch(&src.join("s1.safetensors"), "1");
        touch(&src.join("s2.safetensors"), "2");
        let files = model_files(&src).unwrap();
        assert!(files.ends_with(&[
            INDEX_FILE.into(),
            "s1.safetensors".into(),
            "s2.safetensors".into(),
            "generation_config.json".into()
        ]));
    }

    #[test]
    fn read_config_json_rejects_missing_and_malformed_files() {
        let t = tempfile::tempdir().unwrap();
        assert!(read_config_json(t.path()).unwrap_err().to_string().contains("config.json"));
        touch(&t.path().join("config.json"), "{not json");
        assert!(matches!(read_config_json(t.path()), Err(HfError::BadJson { .. })));
        touch(&t.path().join("config.json"), r#"{"model_type": "llama"}"#);
        assert_eq!(read_config_json(t.path()).unwrap()["model_type"], "llama");
    }

    #[test]
    fn cache_dir_follows_huggingface_hub_precedence() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| OsString::from(v))
        };
        let dir = |pairs| hub_cache_dir(env(pairs)).unwrap().0;
        assert_eq!(dir(&[("HOME", "/h")]), PathBuf::from("/h/.cache/huggingface/hub"));
        assert_eq!(dir(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/x")]), PathBuf::from("/x/huggingface/hub"));
        assert_eq!(dir(&[("HOME", "/h"), ("HF_HOME", "/hf")]), PathBuf::from("/hf/hub"));
        assert_eq!(dir(&[("HF_HOME", "/hf"), ("HF_HUB_CACHE", "/c")]), PathBuf::from("/c"));
        assert!(hub_cache_dir(env(&[])).is_none());
    }

    fn cached_repo(cache: &Path, commits: &[&str], main: Option<&str>) -> PathBuf {
        let repo = cache.join("models--HuggingFaceTB--SmolLM2-135M");
        for c in commits {
            touch(&repo.join("snapshots").join(c).join("config.json"), "{}");
        }
        if let Some(m) = main {
            touch(&repo.join("refs/main"), &format!("{m}\n"));
        }
        repo
    }

    #[test]
    fn hub_ids_resolve_through_refs_main_or_an_explicit_revision() {
        let t = tempfile::tempdir().unwrap();
        let repo = cached_repo(t.path(), &["aaa", "bbb"], Some("bbb"));
        let id = "HuggingFaceTB/SmolLM2-135M";
        assert_eq!(resolve_in_cache(t.path(), "test", id).unwrap(), repo.join("snapshots/bbb"));
        assert_eq!(resolve_in_cache(t.path(), "test", &format!("{id}@aaa")).unwrap(), repo.join("snapshots/aaa"));
        let msg = resolve_in_cache(t.path(), "test", &format!("{id}@ccc")).unwrap_err().to_string();
        assert!(msg.contains("refs/ccc") && msg.contains("snapshots/ccc") && msg.contains("2 snapshot"), "{msg}");
    }

    #[test]
    fn a_single_snapshot_without_refs_is_used_and_a_missing_repo_says_where_it_looked() {
        let t = tempfile::tempdir().unwrap();
        let repo = cached_repo(t.path(), &["only"], None);
        assert_eq!(
            resolve_in_cache(t.path(), "test", "HuggingFaceTB/SmolLM2-135M").unwrap(),
            repo.join("snapshots/only")
        );
        let msg = resolve_in_cache(t.path(), "from HF_HOME", "org/absent").unwrap_err().to_string();
        assert!(
            msg.contains("models--org--absent") && msg.contains("from HF_HOME") && msg.contains("newt downloads it"),
            "{msg}"
        );
        assert!(matches!(resolve_in_cache(t.path(), "test", "../etc"), Err(HfError::BadId(_))));
        assert!(matches!(resolve_in_cache(t.path(), "test", "noslash"), Err(HfError::BadId(_))));
    }

    #[test]
    fn a_snapshot_without_config_json_is_not_a_model() {
        let t = tempfile::tempdir().unwrap();
        let repo = t.path().join("models--o--m");
        fs::create_dir_all(repo.join("snapshots/abc")).unwrap();
        touch(&repo.join("refs/main"), "abc");
        let msg = resolve_in_cache(t.path(), "test", "o/m").unwrap_err().to_string();
        assert!(msg.contains("no config.json"), "{msg}");
    }
}
