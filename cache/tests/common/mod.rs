//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, SystemTime};

use newt_cache::{Cache, Digest, Manifest, ManifestMeta, hash_bytes};

/// A fresh cache in a temp dir (kept alive by the returned guard).
pub fn temp_cache() -> (tempfile::TempDir, Cache) {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(&dir.path().join("cache")).unwrap();
    (dir, cache)
}

/// A stage key for tests.
pub fn key(name: &str) -> Digest {
    hash_bytes("newt-cache tests key", &[name.as_bytes()])
}

/// Manifest metadata with recognizable key inputs.
pub fn meta(key: Digest, stage_id: &str) -> ManifestMeta {
    ManifestMeta {
        stage_id: stage_id.to_string(),
        kind: "command".to_string(),
        key,
        key_inputs: serde_json::json!({ "params": { "learning_rate": 0.0002 }, "stage": stage_id }),
        summary: serde_json::json!({ "rows": 3 }),
        elapsed_ms: 12,
    }
}

/// Stages, writes `files` (relative path, contents) and publishes them under `key`.
pub fn publish_files(cache: &Cache, key: Digest, files: &[(&str, &[u8])]) -> Manifest {
    let staging = cache.staging(&key).unwrap();
    for (rel, contents) in files {
        let path = staging.out_dir().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
    }
    cache.publish(staging, meta(key, "stage"), &[]).unwrap()
}

/// Moves a file's mtime an hour into the past (and so out of the stat cache's racy window).
pub fn age(path: &Path, seconds: u64) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(seconds)).unwrap();
}

/// Names of the entries of a directory.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}
