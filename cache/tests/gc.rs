//! Garbage collection: roots are the latest run of each pipeline and the pins.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use common::{entries, key, publish_files, temp_cache};
use newt_cache::{Cache, CacheError, Manifest, RunRecord, RunStage};

fn run_of(stages: &[(&str, &Manifest)]) -> RunRecord {
    RunRecord {
        pipeline_path: "pipelines/quickstart.yml".to_string(),
        stages: stages.iter().map(|(id, m)| (id.to_string(), RunStage { key: m.key, output: m.output })).collect(),
        finished_unix: 1,
    }
}

struct Fixture {
    old_run: Manifest,
    latest_run: Manifest,
    other_pipeline: Manifest,
    pinned_object: Manifest,
    pinned_key: Manifest,
}

/// Five results: one used only by an older run of pipeline p, one by its latest run, one by
/// pipeline q, one whose object is pinned, one whose manifest key is pinned.
fn fixture(cache: &Cache) -> Fixture {
    let f = Fixture {
        old_run: publish_files(cache, key("old"), &[("out", b"old run")]),
        latest_run: publish_files(cache, key("latest"), &[("out", b"latest run")]),
        other_pipeline: publish_files(cache, key("other"), &[("out", b"other pipeline")]),
        pinned_object: publish_files(cache, key("pinned-object"), &[("out", b"pinned object")]),
        pinned_key: publish_files(cache, key("pinned-key"), &[("out", b"pinned key")]),
    };
    cache.record_run("p", &run_of(&[("train", &f.old_run)])).unwrap();
    cache.record_run("p", &run_of(&[("train", &f.latest_run)])).unwrap();
    cache.record_run("q", &run_of(&[("merge", &f.other_pipeline)])).unwrap();
    cache.pin(&f.pinned_object.output, "best-adapter").unwrap();
    cache.pin(&f.pinned_key.key, "baseline").unwrap();
    f
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

#[test]
fn gc_keeps_latest_run_and_pins() {
    let (_dir, cache) = temp_cache();
    let f = fixture(&cache);
    let expected_bytes = file_len(&cache.manifest_path(&f.old_run.key))
        + file_len(&cache.manifest_path(&f.pinned_object.key))
        + b"old run".len() as u64;

    let report = cache.gc(false).unwrap();
    let mut removed = vec![f.old_run.key, f.pinned_object.key];
    removed.sort();
    assert_eq!(report.removed_manifests, removed);
    assert_eq!(report.removed_objects, vec![f.old_run.output]);
    assert_eq!(report.bytes_freed, expected_bytes);
    assert_eq!((report.kept_manifests, report.kept_objects), (3, 4));

    assert!(!cache.lookup(&f.old_run.key).unwrap().is_hit());
    assert!(!cache.object_path(&f.old_run.output).exists());
    for kept in [&f.latest_run, &f.other_pipeline, &f.pinned_key] {
        assert!(cache.lookup(&kept.key).unwrap().is_hit(), "{}", kept.key);
    }
    assert!(cache.object_path(&f.pinned_object.output).is_dir(), "pinned object kept without its manifest");

    // Nothing left to collect; unpinning frees the pinned object next time.
    assert!(cache.gc(false).unwrap().removed_objects.is_empty());
    assert!(cache.unpin("best-adapter").unwrap());
    assert!(!cache.unpin("best-adapter").unwrap());
    assert_eq!(cache.gc(false).unwrap().removed_objects, vec![f.pinned_object.output]);
}

fn snapshot(root: &Path) -> BTreeMap<String, Vec<u8>> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .map(Result::unwrap)
        .map(|e| {
            let body = if e.file_type().is_file() { fs::read(e.path()).unwrap() } else { Vec::new() };
            (e.path().display().to_string(), body)
        })
        .collect()
}

#[test]
fn gc_dry_run_deletes_nothing() {
    let (_dir, cache) = temp_cache();
    fixture(&cache);
    let before = snapshot(cache.root());
    let dry = cache.gc(true).unwrap();
    assert_eq!(snapshot(cache.root()), before);
    assert!(dry.dry_run);
    assert_eq!(dry.removed_manifests.len(), 2);

    let real = cache.gc(false).unwrap();
    assert_eq!(
        (&real.removed_manifests, &real.removed_objects, &real.removed_tmp, real.bytes_freed),
        (&dry.removed_manifests, &dry.removed_objects, &dry.removed_tmp, dry.bytes_freed),
        "the dry run predicts the real one"
    );
}

#[test]
fn gc_refuses_while_a_run_holds_the_cache() {
    let (_dir, cache) = temp_cache();
    fixture(&cache);
    let run = cache.in_use().unwrap();
    assert!(matches!(cache.gc(false), Err(CacheError::Busy { .. })));
    assert!(cache.gc(true).is_ok(), "a dry run only reads");
    drop(run);
    assert_eq!(cache.gc(false).unwrap().removed_objects.len(), 1);
}

#[test]
fn gc_never_removes_a_staging_dir_whose_key_lock_is_held() {
    let (_dir, cache) = temp_cache();
    let k = key("training");
    let staged = cache.root().join("v1/tmp").join(format!("{k}.abc123"));
    fs::create_dir_all(&staged).unwrap();
    fs::write(staged.join("checkpoint.safetensors"), b"half written").unwrap();

    let lock = cache.lock_key(&k).unwrap();
    let report = cache.gc(false).unwrap();
    assert!(report.removed_tmp.is_empty());
    assert!(staged.exists());

    drop(lock);
    let report = cache.gc(false).unwrap();
    assert_eq!(report.removed_tmp, vec![staged.clone()]);
    assert_eq!(report.bytes_freed, b"half written".len() as u64);
    assert!(!staged.exists());
}

#[test]
fn gc_removes_lock_files_of_collected_keys_and_locking_still_works() {
    let (_dir, cache) = temp_cache();
    drop(cache.lock_key(&key("gone")).unwrap());
    let live = publish_files(&cache, key("live"), &[("out", b"x")]);
    drop(cache.lock_key(&live.key).unwrap());
    cache.pin(&live.key, "keep").unwrap();

    cache.gc(false).unwrap();
    assert_eq!(entries(&cache.root().join("v1/locks")), [format!("{}.lock", live.key)]);
    let lock = cache.lock_key(&key("gone")).unwrap();
    assert!(cache.try_lock_key(&key("gone")).unwrap().is_none(), "a recreated lock file still excludes");
    drop(lock);
}

#[test]
fn record_run_keeps_the_latest_key_of_every_stage() {
    let (_dir, cache) = temp_cache();
    let a = publish_files(&cache, key("a"), &[("out", b"a")]);
    let b = publish_files(&cache, key("b"), &[("out", b"b")]);
    cache.record_run("p", &run_of(&[("tokenize", &a), ("train", &a)])).unwrap();
    // A later run that stopped before train.
    cache.record_run("p", &run_of(&[("tokenize", &b)])).unwrap();

    let last = cache.last_run("p").unwrap().unwrap();
    assert_eq!(last.stages.keys().collect::<Vec<_>>(), ["tokenize"]);
    assert_eq!(cache.last_stage("p", "tokenize").unwrap().unwrap().key, b.key);
    assert_eq!(cache.last_stage("p", "train").unwrap().unwrap().key, a.key, "kept for `newt why`");
    assert_eq!(cache.last_run("never-ran").unwrap(), None);
    assert_eq!(cache.runs().unwrap().len(), 1);
}

#[test]
fn pins_are_listed_replaced_and_validated() {
    let (_dir, cache) = temp_cache();
    cache.pin(&key("a"), "best").unwrap();
    cache.pin(&key("b"), "best").unwrap();
    cache.pin(&key("c"), "v1.0_final-2").unwrap();
    let pins = cache.pins().unwrap();
    assert_eq!(
        pins.iter().map(|p| (p.name.as_str(), p.digest)).collect::<Vec<_>>(),
        [("best", key("b")), ("v1.0_final-2", key("c"))]
    );
    for bad in ["", "../x", ".hidden", "a/b", "sp ace"] {
        assert!(matches!(cache.pin(&key("a"), bad), Err(CacheError::InvalidPinName { .. })), "{bad:?}");
    }
}

#[test]
fn corrupt_run_record_stops_gc_instead_of_guessing() {
    let (_dir, cache) = temp_cache();
    let f = fixture(&cache);
    let runs = cache.root().join("v1/runs");
    let record = fs::read_dir(&runs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .unwrap();
    fs::write(&record, b"{ truncated").unwrap();
    let err = cache.gc(false).unwrap_err();
    assert!(matches!(&err, CacheError::Json { path, .. } if *path == record), "{err:?}");
    assert!(cache.lookup(&f.latest_run.key).unwrap().is_hit(), "nothing deleted");
}

#[test]
fn gc_removes_work_dirs_of_finished_keys_and_keeps_resumable_ones() {
    let (_dir, cache) = temp_cache();
    let done = publish_files(&cache, key("done"), &[("out", b"x")]);
    cache.pin(&done.key, "keep").unwrap();
    let finished = cache.work_dir(&done.key).unwrap();
    fs::write(finished.join("checkpoint-10"), b"ckpt").unwrap();
    let resumable = cache.work_dir(&key("killed-training")).unwrap();
    fs::write(resumable.join("checkpoint-20"), b"ckpt").unwrap();
    let in_progress = cache.work_dir(&key("running")).unwrap();
    let lock = cache.lock_key(&key("running")).unwrap();

    let report = cache.gc(false).unwrap();
    assert_eq!(report.removed_work, vec![finished.clone()]);
    assert!(report.removed.contains(&finished));
    assert!(!finished.exists());
    assert!(resumable.join("checkpoint-20").exists(), "a recent unfinished run can still resume");
    assert!(in_progress.exists());
    drop(lock);
}

#[test]
fn gc_report_lists_every_removed_path_and_serializes() {
    let (_dir, cache) = temp_cache();
    let f = fixture(&cache);
    let report = cache.gc(false).unwrap();
    assert!(report.removed.contains(&cache.manifest_path(&f.old_run.key)));
    assert!(report.removed.contains(&cache.object_path(&f.old_run.output)));
    assert_eq!(report.removed.len(), report.removed_manifests.len() + report.removed_objects.len());
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["removed_objects"][0], f.old_run.output.to_string());
}
