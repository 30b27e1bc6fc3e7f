//! Publishing and looking up stage results.

mod common;

use std::fs;

use common::{entries, key, meta, publish_files, temp_cache};
use newt_cache::{Cache, CacheError, Digest, MANIFEST_FORMAT, hash_tree};

#[test]
fn open_creates_versioned_layout_with_cachedir_tag() {
    let (_dir, cache) = temp_cache();
    let tag = fs::read_to_string(cache.root().join("CACHEDIR.TAG")).unwrap();
    assert!(tag.starts_with("Signature: 8a477f597d28d172789f06886806bc55"));
    for sub in ["objects", "manifests", "tmp", "locks", "stat", "runs", "pins"] {
        assert!(cache.root().join("v1").join(sub).is_dir(), "{sub}");
    }
    // Opening again is harmless.
    Cache::open(cache.root()).unwrap();
}

#[test]
fn publish_then_lookup_roundtrips() {
    let (_dir, cache) = temp_cache();
    let k = key("tokenize");
    assert!(!cache.lookup(&k).unwrap().is_hit(), "fresh cache misses");

    let staging = cache.staging(&k).unwrap();
    fs::create_dir(staging.out_dir().join("data")).unwrap();
    fs::write(staging.out_dir().join("data/train.parquet"), b"PAR1 rows").unwrap();
    fs::write(staging.out_dir().join("stats.json"), b"{}").unwrap();
    let staged_dir = staging.out_dir().to_path_buf();
    let published = cache.publish(staging, meta(k, "tokenize.alpaca"), &["data/train.parquet", "stats.json"]).unwrap();
    assert!(!staged_dir.exists(), "staging directory was moved away");

    let lookup = cache.lookup(&k).unwrap();
    assert!(lookup.warnings.is_empty(), "{:?}", lookup.warnings);
    let manifest = lookup.manifest.expect("hit after publish");
    assert_eq!(manifest, published);
    assert_eq!(manifest.format, MANIFEST_FORMAT);
    assert_eq!(manifest.stage_id, "tokenize.alpaca");
    assert_eq!(manifest.key_inputs["params"]["learning_rate"], 0.0002);
    assert_eq!(
        manifest.files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
        ["data/train.parquet", "stats.json"]
    );

    let object = cache.object_path(&manifest.output);
    assert_eq!(fs::read(object.join("data/train.parquet")).unwrap(), b"PAR1 rows");
    assert_eq!(hash_tree(&object).unwrap().0, manifest.output, "object is named by its tree digest");
    assert_eq!(cache.manifests().unwrap(), vec![manifest]);
}

#[test]
fn identical_outputs_share_one_object() {
    let (_dir, cache) = temp_cache();
    let a = publish_files(&cache, key("a"), &[("out.txt", b"same bytes")]);
    let b = publish_files(&cache, key("b"), &[("out.txt", b"same bytes")]);
    assert_eq!(a.output, b.output);
    assert_eq!(entries(&cache.root().join("v1/objects")), [a.output.to_string()]);
    assert!(entries(&cache.root().join("v1/tmp")).is_empty(), "second staging copy was dropped");
    assert!(cache.lookup(&key("a")).unwrap().is_hit() && cache.lookup(&key("b")).unwrap().is_hit());
}

#[test]
fn republishing_over_a_damaged_object_repairs_it() {
    let (_dir, cache) = temp_cache();
    let m = publish_files(&cache, key("a"), &[("out.txt", b"contents")]);
    fs::remove_file(cache.object_path(&m.output).join("out.txt")).unwrap();
    let lookup = cache.lookup(&key("a")).unwrap();
    assert!(!lookup.is_hit());
    assert!(lookup.warnings[0].contains("missing"), "{:?}", lookup.warnings);

    publish_files(&cache, key("a"), &[("out.txt", b"contents")]);
    assert!(cache.lookup(&key("a")).unwrap().is_hit(), "the re-run result must be usable");
}

#[test]
fn dropped_staging_leaves_nothing() {
    let (_dir, cache) = temp_cache();
    let staging = cache.staging(&key("a")).unwrap();
    fs::write(staging.out_dir().join("partial"), b"half").unwrap();
    let path = staging.out_dir().to_path_buf();
    drop(staging);
    assert!(!path.exists());
    assert!(!cache.lookup(&key("a")).unwrap().is_hit());
}

#[test]
fn object_without_manifest_is_a_miss() {
    // A crash between moving the object in and writing the manifest leaves exactly this.
    let (_dir, cache) = temp_cache();
    let m = publish_files(&cache, key("a"), &[("out.txt", b"x")]);
    fs::remove_file(cache.manifest_path(&key("a"))).unwrap();
    assert!(cache.object_path(&m.output).is_dir());
    let lookup = cache.lookup(&key("a")).unwrap();
    assert!(!lookup.is_hit());
    assert!(lookup.warnings.is_empty(), "no manifest is a plain miss");
}

fn assert_miss_with_warning(cache: &Cache, k: &Digest, needle: &str) {
    let lookup = cache.lookup(k).unwrap();
    assert!(lookup.manifest.is_none(), "expected a miss");
    assert_eq!(lookup.warnings.len(), 1, "{:?}", lookup.warnings);
    assert!(lookup.warnings[0].contains(needle), "warning {:?} should mention {needle:?}", lookup.warnings[0]);
}

#[test]
fn corrupt_manifest_is_a_miss_with_warning() {
    let (_dir, cache) = temp_cache();
    let k = key("a");
    publish_files(&cache, k, &[("out.txt", b"x")]);
    let path = cache.manifest_path(&k);
    let good = fs::read_to_string(&path).unwrap();

    fs::write(&path, &good[..good.len() / 2]).unwrap();
    assert_miss_with_warning(&cache, &k, "not valid JSON");

    fs::write(&path, b"\x00\xff garbage").unwrap();
    assert_miss_with_warning(&cache, &k, "not valid JSON");

    fs::write(&path, good.replace("\"format\": 1", "\"format\": 99")).unwrap();
    assert_miss_with_warning(&cache, &k, "format 99");

    fs::write(&path, r#"{"format": 1, "key": "nonsense"}"#).unwrap();
    assert_miss_with_warning(&cache, &k, "incomplete");

    fs::write(&path, good.replace(&k.to_string(), &key("other").to_string())).unwrap();
    assert_miss_with_warning(&cache, &k, "instead of");

    fs::write(&path, &good).unwrap();
    assert!(cache.lookup(&k).unwrap().is_hit(), "restoring the manifest restores the hit");
}

#[test]
fn manifest_whose_object_is_gone_is_a_miss_with_warning() {
    let (_dir, cache) = temp_cache();
    let m = publish_files(&cache, key("a"), &[("out.txt", b"x")]);
    fs::remove_dir_all(cache.object_path(&m.output)).unwrap();
    assert_miss_with_warning(&cache, &key("a"), "is missing");
    assert!(cache.manifests().unwrap().is_empty(), "listing skips broken manifests");
}

#[test]
fn manifest_whose_file_changed_size_is_a_miss_with_warning() {
    let (_dir, cache) = temp_cache();
    let m = publish_files(&cache, key("a"), &[("out.txt", b"x")]);
    fs::write(cache.object_path(&m.output).join("out.txt"), b"longer now").unwrap();
    assert_miss_with_warning(&cache, &key("a"), "has changed");
}

#[test]
fn publish_rejects_missing_required_output_naming_it() {
    let (_dir, cache) = temp_cache();
    let staging = cache.staging(&key("a")).unwrap();
    fs::write(staging.out_dir().join("present.txt"), b"x").unwrap();
    let out = staging.out_dir().to_path_buf();
    match cache.publish(staging, meta(key("a"), "s"), &["present.txt", "adapter_model.safetensors"]) {
        Err(CacheError::MissingRequiredOutput { path, required }) => {
            assert_eq!(path, out);
            assert_eq!(required, "adapter_model.safetensors");
        }
        other => panic!("expected MissingRequiredOutput, got {other:?}"),
    }
    assert!(!cache.lookup(&key("a")).unwrap().is_hit());
    assert!(!out.exists(), "failed staging is cleaned up");
}

#[test]
fn publish_rejects_required_paths_outside_the_output() {
    let (_dir, cache) = temp_cache();
    for bad in ["../escape", "/etc/passwd", ""] {
        let staging = cache.staging(&key("a")).unwrap();
        let err = cache.publish(staging, meta(key("a"), "s"), &[bad]).unwrap_err();
        assert!(matches!(err, CacheError::InvalidRequiredPath { .. }), "{bad:?}: {err:?}");
    }
}

#[cfg(unix)]
#[test]
fn publish_rejects_symlinks_in_outputs() {
    let (dir, cache) = temp_cache();
    let outside = dir.path().join("outside.txt");
    fs::write(&outside, b"x").unwrap();
    let staging = cache.staging(&key("a")).unwrap();
    std::os::unix::fs::symlink(&outside, staging.out_dir().join("link.txt")).unwrap();
    let link = staging.out_dir().join("link.txt");
    let err = cache.publish(staging, meta(key("a"), "s"), &[]).unwrap_err();
    assert!(matches!(&err, CacheError::SymlinkInOutput { path } if *path == link), "{err:?}");
    assert!(err.to_string().contains("link.txt"), "{err}");
    assert!(!cache.lookup(&key("a")).unwrap().is_hit());
}

#[test]
fn publish_rejects_a_missing_output_dir_and_a_key_mismatch() {
    let (_dir, cache) = temp_cache();
    let staging = cache.staging(&key("a")).unwrap();
    fs::remove_dir(staging.out_dir()).unwrap();
    let err = cache.publish(staging, meta(key("a"), "s"), &[]).unwrap_err();
    assert!(matches!(err, CacheError::OutputDirMissing { .. }), "{err:?}");

    let staging = cache.staging(&key("a")).unwrap();
    let err = cache.publish(staging, meta(key("b"), "s"), &[]).unwrap_err();
    assert!(matches!(err, CacheError::KeyMismatch { .. }), "{err:?}");
}

#[test]
fn find_object_resolves_unique_prefixes_of_objects_and_keys() {
    let (_dir, cache) = temp_cache();
    let m = publish_files(&cache, key("a"), &[("out.txt", b"x")]);
    let out = m.output.to_string();
    assert_eq!(cache.find_object(&out[..12]).unwrap(), Some(m.output));
    assert_eq!(cache.find_object(&out.to_uppercase()).unwrap(), Some(m.output));
    assert_eq!(cache.find_object(&key("a").short()).unwrap(), Some(key("a")));
    assert_eq!(cache.find_object("train").unwrap(), None, "a stage name is not a digest");
    assert_eq!(cache.find_object("").unwrap(), None);
}

#[test]
fn ambiguous_prefix_is_an_error() {
    let (_dir, cache) = temp_cache();
    // 40 objects: some pair shares a first hex digit (pigeonhole over 16 digits).
    for i in 0..40 {
        publish_files(&cache, key(&format!("k{i}")), &[("f", format!("{i}").as_bytes())]);
    }
    let objects = entries(&cache.root().join("v1/objects"));
    let shared = objects.windows(2).find(|w| w[0][..1] == w[1][..1]).unwrap();
    let err = cache.find_object(&shared[0][..1]).unwrap_err();
    assert!(matches!(err, CacheError::AmbiguousPrefix { .. }), "{err:?}");
    assert_eq!(cache.find_object(&shared[0]).unwrap(), Some(shared[0].parse().unwrap()));
}
