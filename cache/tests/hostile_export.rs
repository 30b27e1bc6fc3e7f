//! Copying stored results out of the store into a directory someone else may have prepared:
//! links planted there are replaced, never followed; damaged bytes never leave the store;
//! copies get ordinary modes.
#![cfg(unix)]

mod common;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use common::{entries, key, publish_files, temp_cache};
use newt_cache::{CacheError, Damage, Digest, FileEntry, export_bytes, export_dir, export_file};

/// A published one-file result: (its file in the store, its manifest entry).
fn stored(cache: &newt_cache::Cache, contents: &[u8]) -> (std::path::PathBuf, FileEntry) {
    let m = publish_files(cache, key("train"), &[("adapter_model.safetensors", contents)]);
    (cache.object_path(&m.output).join("adapter_model.safetensors"), m.files[0].clone())
}

/// The mode this process gives a file it creates (0666 less the umask; 0644 under the usual
/// umask 022, where a copy forced to 0666 is told apart).
fn creation_mode(dir: &Path) -> u32 {
    let probe = dir.join("probe");
    fs::File::create(&probe).unwrap();
    let mode = fs::metadata(&probe).unwrap().permissions().mode() & 0o7777;
    fs::remove_file(probe).unwrap();
    mode
}

#[test]
fn planted_symlink_at_the_destination_is_replaced_not_followed() {
    let (dir, cache) = temp_cache();
    let (from, entry) = stored(&cache, b"adapter bytes");
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    let victim = dir.path().join("victim");
    fs::write(&victim, b"precious").unwrap();
    let to = out.join("adapter_model.safetensors");
    symlink(&victim, &to).unwrap();
    // The temp name the old copy used, planted too.
    symlink(&victim, out.join("adapter_model.newt-tmp")).unwrap();

    export_file(&from, &entry, &to).unwrap();
    assert_eq!(fs::read(&victim).unwrap(), b"precious", "the link's target was not written");
    assert!(fs::symlink_metadata(&to).unwrap().is_file(), "the link itself was replaced");
    assert_eq!(fs::read(&to).unwrap(), b"adapter bytes");
}

#[test]
fn dangling_symlink_at_the_destination_is_replaced_not_followed() {
    let (dir, cache) = temp_cache();
    let (from, entry) = stored(&cache, b"adapter bytes");
    let target = dir.path().join("would-be-created");
    let to = dir.path().join("adapter_model.safetensors");
    symlink(&target, &to).unwrap();
    export_file(&from, &entry, &to).unwrap();
    assert!(!target.exists(), "nothing created through the link");
    assert_eq!(fs::read(&to).unwrap(), b"adapter bytes");
}

#[test]
fn symlinked_destination_directory_is_replaced_by_a_real_one() {
    let (dir, _cache) = temp_cache();
    let elsewhere = dir.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    fs::write(elsewhere.join("keep.txt"), b"not newt's").unwrap();
    let merged = dir.path().join("merged");
    symlink(&elsewhere, &merged).unwrap();

    export_dir(&merged).unwrap();
    let meta = fs::symlink_metadata(&merged).unwrap();
    assert!(meta.is_dir() && !meta.file_type().is_symlink());
    assert_eq!(entries(&merged), Vec::<String>::new());
    assert_eq!(entries(&elsewhere), ["keep.txt"], "the link's target is untouched");
    export_dir(&merged).unwrap(); // an existing real directory is kept
}

#[test]
fn regular_file_where_a_directory_belongs_is_an_error() {
    let (dir, _cache) = temp_cache();
    let path = dir.path().join("merged");
    fs::write(&path, b"user data").unwrap();
    assert!(matches!(export_dir(&path), Err(CacheError::NotADirectory { .. })));
    assert_eq!(fs::read(&path).unwrap(), b"user data");
}

#[test]
fn exported_files_get_creation_modes_not_the_stores() {
    let (dir, cache) = temp_cache();
    let (from, entry) = stored(&cache, b"adapter bytes");
    assert_eq!(fs::metadata(&from).unwrap().permissions().mode() & 0o7777, 0o444, "stored read-only");
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    let expected = creation_mode(&out);
    let to = out.join("adapter_model.safetensors");
    export_file(&from, &entry, &to).unwrap();
    assert_eq!(fs::metadata(&to).unwrap().permissions().mode() & 0o7777, expected);
    export_bytes(&out.join("record.json"), b"{}").unwrap();
    assert_eq!(fs::metadata(out.join("record.json")).unwrap().permissions().mode() & 0o7777, expected);
}

#[test]
fn damaged_bytes_are_never_exported() {
    let (dir, cache) = temp_cache();
    let (from, entry) = stored(&cache, b"adapter bytes");
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("adapter_model.safetensors"), b"the previous good copy").unwrap();
    let wrong = FileEntry { digest: Digest::from(blake3::hash(b"other bytes")), ..entry.clone() };
    match export_file(&from, &wrong, &out.join("adapter_model.safetensors")) {
        Err(CacheError::Damaged { damage: Damage::Corrupt { path, expected, actual } }) => {
            assert_eq!(path, from);
            assert_eq!(expected, wrong.digest);
            assert_eq!(actual, entry.digest);
        }
        other => panic!("expected a Corrupt error, got {other:?}"),
    }
    assert_eq!(fs::read(out.join("adapter_model.safetensors")).unwrap(), b"the previous good copy");
    assert_eq!(entries(&out), ["adapter_model.safetensors"], "no temp file left behind");
    let err = export_file(&from, &wrong, &out.join("x")).unwrap_err().to_string();
    assert!(err.contains("newt cache verify --repair"), "{err}");
}

#[test]
fn export_bytes_replaces_a_planted_symlink() {
    let (dir, _cache) = temp_cache();
    let victim = dir.path().join("victim");
    fs::write(&victim, b"precious").unwrap();
    let record = dir.path().join(".newt-outputs.json");
    symlink(&victim, &record).unwrap();
    export_bytes(&record, b"{}\n").unwrap();
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
    assert_eq!(fs::read(&record).unwrap(), b"{}\n");
}
