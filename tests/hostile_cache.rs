//! `newt cache` subcommands given names and digests that do not exist.

use std::process::{Command, Output};

fn newt(cache: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_newt"))
        .args(args)
        .env("NEWT_CACHE_DIR", cache)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

#[test]
fn unpin_of_an_unknown_name_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    let cache = newt_cache::Cache::open(&cache_dir).unwrap();
    let key = newt_cache::hash_bytes("newt hostile test key", &[b"a"]);
    let staging = cache.staging(&key).unwrap();
    std::fs::write(staging.out_dir().join("out.txt"), b"x").unwrap();
    let meta = newt_cache::ManifestMeta {
        stage_id: "a".into(),
        kind: "command".into(),
        key,
        key_inputs: serde_json::json!({}),
        summary: serde_json::json!({}),
        elapsed_ms: 1,
    };
    let m = cache.publish(staging, meta, &[]).unwrap();

    let out = newt(&cache_dir, &["cache", "unpin", "never-pinned"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "unpinning nothing must not succeed: {stderr}");
    assert!(stderr.contains("no pin named `never-pinned`") && stderr.contains("there are none"), "{stderr}");

    let out = newt(&cache_dir, &["cache", "pin", &m.output.short(), "keep"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = newt(&cache_dir, &["cache", "unpin", "kept"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("`kept`") && stderr.contains("pins: keep"), "{stderr}");
    let out = newt(&cache_dir, &["cache", "unpin", "keep"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "unpinned keep");
}
