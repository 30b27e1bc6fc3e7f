//! A Hub dataset id with newt offline: the local Hugging Face cache alone answers, by the ref
//! of the revision asked for, and a revision it lacks is an error naming the cache.

use newt_config::{DatasetConfig, DatasetType};
use newt_data::hub;
use newt_hub::{Hub, NoProgress};

#[test]
fn offline_hub_ids_resolve_to_the_cached_snapshot_of_their_revision() {
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
    let hub = Hub::new("http://127.0.0.1:9", None, Some("HF_HUB_OFFLINE is set".into()), tmp.path().to_path_buf());

    let mut ds =
        DatasetConfig { path: "acme/chats".into(), type_: Some(DatasetType::ChatTemplate), ..Default::default() };
    let d = hub::resolve(&ds, &hub).unwrap();
    assert_eq!(d.commit, "1111111111111111111111111111111111111111");
    assert!(d.note.as_deref().is_some_and(|n| n.contains("offline")), "{:?}", d.note);
    assert_eq!(hub::download(&d, &hub, &NoProgress).unwrap(), vec![new.join("data/train-00000-of-00001.parquet")]);

    ds.revision = Some("0000000000000000000000000000000000000000".into());
    ds.split = Some("test".into());
    let d = hub::resolve(&ds, &hub).unwrap();
    assert_eq!(hub::download(&d, &hub, &NoProgress).unwrap(), vec![old.join("data/test-00000-of-00001.parquet")]);

    ds.path = "acme/missing".into();
    ds.revision = None;
    let msg = hub::resolve(&ds, &hub).unwrap_err().to_string();
    assert!(msg.contains("datasets--acme--missing") && msg.contains("offline"), "{msg}");
}
