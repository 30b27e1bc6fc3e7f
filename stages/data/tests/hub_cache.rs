//! A Hub dataset id resolves to the local Hugging Face cache (the Hub is not reachable).
//! Alone in its test binary because it sets HF_HUB_CACHE for the process.

use newt_config::{DatasetConfig, DatasetType};
use newt_data::source_files;

#[test]
fn hub_id_resolves_to_the_cached_snapshot_of_main() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("datasets--acme--chats");
    let old = repo.join("snapshots/0000000000000000000000000000000000000000");
    let new = repo.join("snapshots/1111111111111111111111111111111111111111");
    for snap in [&old, &new] {
        std::fs::create_dir_all(snap.join("data")).unwrap();
        std::fs::write(snap.join("data/train-00000-of-00001.parquet"), b"x").unwrap();
        std::fs::write(snap.join("data/test-00000-of-00001.parquet"), b"x").unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "1111111111111111111111111111111111111111").unwrap();
    // SAFETY: this test binary has one test; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("HF_HUB_CACHE", tmp.path()) };

    let mut ds =
        DatasetConfig { path: "acme/chats".into(), type_: Some(DatasetType::ChatTemplate), ..Default::default() };
    let files = source_files(&ds, &tmp.path().join("elsewhere")).unwrap();
    assert_eq!(files, vec![new.join("data/train-00000-of-00001.parquet")]);

    ds.revision = Some("0000000000000000000000000000000000000000".into());
    ds.split = Some("test".into());
    assert_eq!(
        source_files(&ds, &tmp.path().join("elsewhere")).unwrap(),
        vec![old.join("data/test-00000-of-00001.parquet")]
    );

    ds.path = "acme/missing".into();
    let msg = source_files(&ds, tmp.path()).unwrap_err().to_string();
    assert!(msg.contains("datasets--acme--missing") && msg.contains("not reachable"), "{msg}");
}
