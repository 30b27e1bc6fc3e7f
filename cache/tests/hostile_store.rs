//! What a hostile or unlucky filesystem does to stored results: bytes edited in place, files
//! planted in objects, modes, hard links, and `verify` finding and repairing all of it.

mod common;

use std::fs;
use std::path::Path;

use common::{age, key, publish_files, temp_cache};
use newt_cache::{Damage, Digest};

/// Overwrites one byte of `path` (same size), as a bit flip or a careless edit would.
fn flip_byte(path: &Path, at: usize) {
    make_writable(path);
    let mut bytes = fs::read(path).unwrap();
    bytes[at] ^= 0x01;
    fs::write(path, bytes).unwrap();
}

/// Objects are read-only; a test that damages one on purpose has to undo that first (root
/// ignores it, other users do not).
fn make_writable(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
        if let Some(dir) = path.parent() {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
}

const ADAPTER: &[u8] = b"safetensors header and some LoRA weights";

#[test]
fn flipped_byte_in_cached_object_is_a_miss_not_a_hit() {
    let (_dir, cache) = temp_cache();
    let m = publish_files(&cache, key("train"), &[("adapter_model.safetensors", ADAPTER)]);
    assert!(cache.lookup(&key("train")).unwrap().is_hit());
    let file = cache.object_path(&m.output).join("adapter_model.safetensors");
    flip_byte(&file, 7);
    assert_eq!(fs::metadata(&file).unwrap().len(), ADAPTER.len() as u64, "same size");

    let lookup = cache.lookup(&key("train")).unwrap();
    assert!(!lookup.is_hit(), "a flipped byte must not be served as a hit");
    let warning = &lookup.warnings[0];
    assert!(warning.contains("adapter_model.safetensors") && warning.contains("corrupt"), "{warning}");
    assert!(warning.contains(&m.files[0].digest.to_string()), "names the expected digest: {warning}");
    assert!(warning.contains("will run again"), "{warning}");
}

#[test]
fn flipped_byte_with_mtime_put_back_is_still_a_miss() {
    // The stat cache trusts an object it has read once; an edit that restores size and mtime
    // (touch -d) still changes ctime, which no one can set back.
    let (_dir, cache) = temp_cache();
    let m = publish_files(&cache, key("train"), &[("adapter_model.safetensors", ADAPTER)]);
    let file = cache.object_path(&m.output).join("adapter_model.safetensors");
    age(&file, 3600);
    let mtime = fs::metadata(&file).unwrap().modified().unwrap();
    assert!(cache.lookup(&key("train")).unwrap().is_hit());
    let hashed = cache.stats().files_hashed;
    assert!(cache.lookup(&key("train")).unwrap().is_hit());
    assert_eq!(cache.stats().files_hashed, hashed, "the second hit trusts the stat record");

    // Let the clock tick past the ctime the stat record holds (timestamps are coarse).
    std::thread::sleep(std::time::Duration::from_millis(50));
    flip_byte(&file, 0);
    fs::File::options().write(true).open(&file).unwrap().set_modified(mtime).unwrap();
    assert_eq!(fs::metadata(&file).unwrap().modified().unwrap(), mtime);
    let lookup = cache.lookup(&key("train")).unwrap();
    assert!(!lookup.is_hit(), "{lookup:?}");
    assert!(lookup.warnings[0].contains("corrupt"), "{:?}", lookup.warnings);
}

#[test]
fn hit_reads_an_object_once_then_trusts_its_stat() {
    let (_dir, cache) = temp_cache();
    let big = vec![7u8; 1 << 20];
    let m = publish_files(&cache, key("merge"), &[("model.safetensors", &big), ("config.json", b"{}")]);
    for f in &m.files {
        age(&cache.object_path(&m.output).join(&f.path), 3600);
    }
    let before = cache.stats();
    assert!(cache.lookup(&key("merge")).unwrap().is_hit());
    let first = cache.stats();
    assert_eq!(first.files_hashed - before.files_hashed, 2, "the first hit reads the files");
    for _ in 0..3 {
        assert!(cache.lookup(&key("merge")).unwrap().is_hit());
    }
    let later = cache.stats();
    assert_eq!(later.files_hashed, first.files_hashed, "later hits read nothing");
    assert_eq!(later.stat_cache_hits - first.stat_cache_hits, 6);
}

#[test]
fn file_planted_in_an_object_is_a_miss() {
    let (_dir, cache) = temp_cache();
    let m = publish_files(&cache, key("pack"), &[("train.parquet", b"PAR1")]);
    let object = cache.object_path(&m.output);
    make_writable(&object.join("train.parquet"));
    fs::write(object.join("extra.parquet"), b"PAR1 planted rows").unwrap();
    let lookup = cache.lookup(&key("pack")).unwrap();
    assert!(!lookup.is_hit());
    assert!(lookup.warnings[0].contains("extra.parquet"), "{:?}", lookup.warnings);
}

#[test]
fn manifest_whose_file_list_is_not_its_output_is_a_miss() {
    let (_dir, cache) = temp_cache();
    let m = publish_files(&cache, key("a"), &[("out.txt", b"x")]);
    let path = cache.manifest_path(&key("a"));
    let text = fs::read_to_string(&path).unwrap();
    let other = Digest::from(blake3::hash(b"y")).to_string();
    fs::write(&path, text.replace(&m.files[0].digest.to_string(), &other)).unwrap();
    let lookup = cache.lookup(&key("a")).unwrap();
    assert!(!lookup.is_hit());
    assert!(lookup.warnings[0].contains("does not hash to its output"), "{:?}", lookup.warnings);
}

#[test]
fn republishing_over_a_corrupt_object_replaces_it() {
    let (_dir, cache) = temp_cache();
    let m = publish_files(&cache, key("train"), &[("adapter_model.safetensors", ADAPTER)]);
    let file = cache.object_path(&m.output).join("adapter_model.safetensors");
    flip_byte(&file, 3);
    assert!(!cache.lookup(&key("train")).unwrap().is_hit());
    // The stage runs again and produces the same bytes: the damaged object must not be kept
    // on the grounds that an object of that name exists.
    let again = publish_files(&cache, key("train"), &[("adapter_model.safetensors", ADAPTER)]);
    assert_eq!(again.output, m.output);
    assert_eq!(fs::read(&file).unwrap(), ADAPTER);
    assert!(cache.lookup(&key("train")).unwrap().is_hit());
}

#[cfg(unix)]
#[test]
fn objects_are_read_only_whatever_the_source_mode() {
    use std::os::unix::fs::PermissionsExt;
    let (_dir, cache) = temp_cache();
    let staging = cache.staging(&key("fetch.model")).unwrap();
    let sub = staging.out_dir().join("sub");
    fs::create_dir(&sub).unwrap();
    fs::set_permissions(&sub, fs::Permissions::from_mode(0o777)).unwrap();
    for path in [staging.out_dir().join("config.json"), sub.join("weights.bin")] {
        fs::write(&path, b"copied from a model folder").unwrap();
        // What fs::copy keeps from a world-writable source.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
    }
    let m = cache.publish(staging, common::meta(key("fetch.model"), "fetch.model"), &[]).unwrap();
    let object = cache.object_path(&m.output);
    let mode = |p: &Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&object.join("config.json")), 0o444);
    assert_eq!(mode(&object.join("sub/weights.bin")), 0o444);
    assert_eq!(mode(&object.join("sub")), 0o555);
    assert_eq!(mode(&object), 0o555);
    assert!(cache.lookup(&key("fetch.model")).unwrap().is_hit());
}

#[cfg(unix)]
#[test]
fn hard_linked_output_is_copied_so_sealing_leaves_the_original_alone() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (dir, cache) = temp_cache();
    let original = dir.path().join("user_weights.bin");
    fs::write(&original, b"the user's own file").unwrap();
    fs::set_permissions(&original, fs::Permissions::from_mode(0o640)).unwrap();
    let staging = cache.staging(&key("a")).unwrap();
    fs::hard_link(&original, staging.out_dir().join("weights.bin")).unwrap();
    let m = cache.publish(staging, common::meta(key("a"), "a"), &[]).unwrap();
    assert_eq!(fs::metadata(&original).unwrap().permissions().mode() & 0o7777, 0o640, "original untouched");
    let stored = fs::metadata(cache.object_path(&m.output).join("weights.bin")).unwrap();
    assert_eq!(stored.nlink(), 1, "the object has its own copy");
    assert_ne!(stored.ino(), fs::metadata(&original).unwrap().ino());
    fs::write(&original, b"the user edits it later").unwrap();
    assert!(cache.lookup(&key("a")).unwrap().is_hit(), "an edit outside does not reach the store");
}

#[test]
fn verify_reports_a_flipped_byte_with_expected_and_actual_digests() {
    let (_dir, cache) = temp_cache();
    let bad = publish_files(&cache, key("train"), &[("adapter_model.safetensors", ADAPTER)]);
    let good = publish_files(&cache, key("tokenize"), &[("tokens.parquet", b"PAR1 tokens")]);
    assert!(cache.verify(false).unwrap().is_clean());

    let file = cache.object_path(&bad.output).join("adapter_model.safetensors");
    flip_byte(&file, 5);
    let flipped = fs::read(&file).unwrap();
    let report = cache.verify(false).unwrap();
    assert!(!report.is_clean());
    assert_eq!(report.objects_checked, 2);
    assert_eq!(report.damaged_objects.len(), 1, "{report:?}");
    let damaged = &report.damaged_objects[0];
    assert_eq!(damaged.digest, bad.output);
    assert_eq!(damaged.manifests, vec![key("train")]);
    assert_eq!(
        damaged.damage,
        vec![Damage::Corrupt {
            path: file.clone(),
            expected: bad.files[0].digest,
            actual: Digest::from(blake3::hash(&flipped)),
        }]
    );
    assert!(report.removed.is_empty(), "without repair nothing is removed");
    assert!(file.exists() && cache.manifest_path(&key("train")).exists());

    let repaired = cache.verify(true).unwrap();
    assert_eq!(repaired.removed, vec![cache.manifest_path(&key("train")), cache.object_path(&bad.output)]);
    let lookup = cache.lookup(&key("train")).unwrap();
    assert!(!lookup.is_hit() && lookup.warnings.is_empty(), "the next run simply runs the stage: {lookup:?}");
    assert!(cache.lookup(&key("tokenize")).unwrap().is_hit(), "intact results stay");
    assert!(cache.object_path(&good.output).is_dir());
    assert!(cache.verify(false).unwrap().is_clean());
}

#[test]
fn verify_rereads_files_the_stat_cache_trusts() {
    let (_dir, cache) = temp_cache();
    let m = publish_files(&cache, key("a"), &[("one", b"1"), ("two", b"22")]);
    for f in &m.files {
        age(&cache.object_path(&m.output).join(&f.path), 3600);
    }
    assert!(cache.lookup(&key("a")).unwrap().is_hit());
    let report = cache.verify(false).unwrap();
    assert_eq!(report.files_checked, 2);
    assert_eq!(report.bytes_checked, 3);
}

#[test]
fn verify_reports_and_repairs_manifests_whose_object_is_gone_and_stray_objects() {
    let (_dir, cache) = temp_cache();
    let gone = publish_files(&cache, key("gone"), &[("out.txt", b"gone")]);
    let stray = publish_files(&cache, key("stray"), &[("out.txt", b"stray")]);
    let object = cache.object_path(&gone.output);
    make_writable(&object.join("out.txt"));
    fs::remove_dir_all(&object).unwrap();
    // An object no manifest describes, whose bytes no longer match its name.
    fs::remove_file(cache.manifest_path(&key("stray"))).unwrap();
    flip_byte(&cache.object_path(&stray.output).join("out.txt"), 0);

    let report = cache.verify(false).unwrap();
    assert_eq!(report.broken_manifests.len(), 1, "{report:?}");
    assert_eq!(report.broken_manifests[0].key, key("gone"));
    assert!(report.broken_manifests[0].problem.contains("missing"));
    assert_eq!(report.damaged_objects.len(), 1);
    assert!(matches!(report.damaged_objects[0].damage[0], Damage::Misnamed { .. }), "{report:?}");

    let repaired = cache.verify(true).unwrap();
    assert!(repaired.removed.contains(&cache.manifest_path(&key("gone"))));
    assert!(repaired.removed.contains(&cache.object_path(&stray.output)));
    assert!(cache.verify(false).unwrap().is_clean());
}

#[test]
fn verify_repair_refuses_while_a_run_holds_the_cache() {
    let (_dir, cache) = temp_cache();
    publish_files(&cache, key("a"), &[("out.txt", b"x")]);
    let _run = cache.in_use().unwrap();
    assert!(matches!(cache.verify(true), Err(newt_cache::CacheError::Busy { .. })));
    assert!(cache.verify(false).unwrap().is_clean(), "a read-only check is fine during a run");
}
