//! Hashing external inputs through the stat cache.

mod common;

use std::fs;

use common::{age, temp_cache};
use newt_cache::{Cache, Digest, hash_tree};

#[test]
fn hash_external_of_a_file_is_its_blake3() {
    let (dir, cache) = temp_cache();
    let f = dir.path().join("data.jsonl");
    fs::write(&f, b"{\"instruction\": \"hi\"}\n").unwrap();
    assert_eq!(cache.hash_external(&f).unwrap(), Digest::from(blake3::hash(b"{\"instruction\": \"hi\"}\n")));
}

#[test]
fn hash_external_uses_stat_cache() {
    let (dir, cache) = temp_cache();
    let f = dir.path().join("weights.safetensors");
    fs::write(&f, vec![7u8; 100_000]).unwrap();
    age(&f, 3600);

    let first = cache.hash_external(&f).unwrap();
    let second = cache.hash_external(&f).unwrap();
    assert_eq!(first, second);
    let stats = cache.stats();
    assert_eq!((stats.files_hashed, stats.stat_cache_hits), (1, 1), "{stats:?}");
    assert_eq!(stats.bytes_hashed, 100_000);

    // The record persists: another process (another handle) does not re-read the file.
    let other = Cache::open(cache.root()).unwrap();
    assert_eq!(other.hash_external(&f).unwrap(), first);
    assert_eq!((other.stats().files_hashed, other.stats().stat_cache_hits), (0, 1));
}

#[test]
fn a_folders_file_digests_come_from_the_stat_cache_for_a_second_handle() {
    let (dir, cache) = temp_cache();
    let model = dir.path().join("model");
    fs::create_dir(&model).unwrap();
    for (name, bytes) in [("config.json", b"{}".to_vec()), ("model.safetensors", vec![3u8; 50_000])] {
        fs::write(model.join(name), bytes).unwrap();
        age(&model.join(name), 3600);
    }
    // The executor hashes the folder for the stage key...
    let digest = cache.hash_external(&model).unwrap();
    // ...and the stage, on its own handle, gets every file's digest without reading any.
    let stage = Cache::open(cache.root()).unwrap();
    let (again, files) = stage.hash_external_files(&model).unwrap();
    assert_eq!(again, digest);
    let names: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(names, ["config.json", "model.safetensors"]);
    assert_eq!(files[1].digest, Digest::from(blake3::hash(&[3u8; 50_000])));
    assert_eq!(files[1].size, 50_000);
    assert_eq!((stage.stats().files_hashed, stage.stats().stat_cache_hits), (0, 2));
    // A single file is one entry named "".
    let (d, one) = stage.hash_external_files(&model.join("config.json")).unwrap();
    assert_eq!((one.len(), one[0].path.as_str(), one[0].digest), (1, "", d));
}

#[test]
fn changed_mtime_rehashes() {
    let (dir, cache) = temp_cache();
    let f = dir.path().join("train.parquet");
    fs::write(&f, b"version one").unwrap();
    age(&f, 7200);
    let before = cache.hash_external(&f).unwrap();

    // Same size, new contents, different (still old) mtime.
    fs::write(&f, b"version two").unwrap();
    age(&f, 3600);
    let after = cache.hash_external(&f).unwrap();
    assert_ne!(before, after);
    assert_eq!(after, Digest::from(blake3::hash(b"version two")));
    assert_eq!(cache.stats().files_hashed, 2);
}

#[test]
fn touched_but_unchanged_file_rehashes_to_the_same_digest() {
    let (dir, cache) = temp_cache();
    let f = dir.path().join("a.bin");
    fs::write(&f, b"same").unwrap();
    age(&f, 7200);
    let before = cache.hash_external(&f).unwrap();
    age(&f, 3600);
    assert_eq!(cache.hash_external(&f).unwrap(), before, "contents, not mtimes, make the digest");
    assert_eq!(cache.stats().files_hashed, 2, "a changed stat is re-read");
}

#[test]
fn freshly_modified_file_is_not_trusted_by_the_stat_cache() {
    // A write in the same timestamp tick as the hash would keep the stat identical.
    let (dir, cache) = temp_cache();
    let f = dir.path().join("fresh.txt");
    fs::write(&f, b"just written").unwrap();
    cache.hash_external(&f).unwrap();
    cache.hash_external(&f).unwrap();
    assert_eq!((cache.stats().files_hashed, cache.stats().stat_cache_hits), (2, 0));
}

#[test]
fn directory_digest_tracks_added_removed_and_changed_files() {
    let (dir, cache) = temp_cache();
    let model = dir.path().join("model");
    fs::create_dir_all(model.join("sub")).unwrap();
    for (name, body) in [("config.json", &b"{}"[..]), ("sub/model.safetensors", b"weights")] {
        fs::write(model.join(name), body).unwrap();
        age(&model.join(name), 3600);
    }
    let d0 = cache.hash_external(&model).unwrap();
    assert_eq!(d0, hash_tree(&model).unwrap().0, "same tree digest as outputs");
    assert_eq!(cache.hash_external(&model).unwrap(), d0);
    assert_eq!(cache.stats().files_hashed, 2, "second walk re-read nothing");
    assert_eq!(cache.stats().stat_cache_hits, 2);

    fs::write(model.join("tokenizer.json"), b"tok").unwrap();
    age(&model.join("tokenizer.json"), 3600);
    let d1 = cache.hash_external(&model).unwrap();
    assert_ne!(d1, d0);
    assert_eq!(cache.stats().files_hashed, 3, "only the new file was read");

    fs::remove_file(model.join("tokenizer.json")).unwrap();
    assert_eq!(cache.hash_external(&model).unwrap(), d0, "removing it restores the digest");
}

#[cfg(unix)]
#[test]
fn symlinks_in_external_inputs_are_followed() {
    let (dir, cache) = temp_cache();
    let real = dir.path().join("real.bin");
    fs::write(&real, b"target contents").unwrap();
    let linked_dir = dir.path().join("linked");
    fs::create_dir(&linked_dir).unwrap();
    std::os::unix::fs::symlink(&real, linked_dir.join("weights.bin")).unwrap();
    let plain_dir = dir.path().join("plain");
    fs::create_dir(&plain_dir).unwrap();
    fs::write(plain_dir.join("weights.bin"), b"target contents").unwrap();

    assert_eq!(cache.hash_external(&linked_dir).unwrap(), cache.hash_external(&plain_dir).unwrap());
    let link = dir.path().join("link-to-file");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    assert_eq!(cache.hash_external(&link).unwrap(), Digest::from(blake3::hash(b"target contents")));
}

#[test]
fn missing_external_input_is_an_error_naming_it() {
    let (dir, cache) = temp_cache();
    let missing = dir.path().join("nope.jsonl");
    let err = cache.hash_external(&missing).unwrap_err();
    assert!(err.to_string().contains("nope.jsonl"), "{err}");
}
