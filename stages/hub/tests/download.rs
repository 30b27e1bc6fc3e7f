//! newt-hub against a Hub lookalike on 127.0.0.1 (`support/mock_hub.rs`): the cache layout,
//! reuse, resume after a dropped connection and after a killed process, a moved `main`,
//! offline use, gated repositories. No test touches the real Hub.

mod support {
    pub mod mock_hub;
}

use std::path::Path;

use newt_hub::{Hub, HubError, NoProgress, RemoteFile, RepoKind};
use support::mock_hub::{MockHub, git_sha1, sha256};

const C1: &str = "1111111111111111111111111111111111111111";
const C2: &str = "2222222222222222222222222222222222222222";

fn weights() -> Vec<u8> {
    (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect()
}

fn hub_with_model() -> (MockHub, Vec<u8>) {
    let mock = MockHub::start();
    let w = weights();
    mock.commit("models/acme/tiny", "main", C1, &[("config.json", b"{\"a\": 1}"), ("model.safetensors", &w)]);
    (mock, w)
}

fn online(mock: &MockHub, cache: &Path) -> Hub {
    Hub::new(&mock.url, None, None, cache.to_path_buf())
}

fn fetch_all(hub: &Hub, id: &str, revision: &str) -> Result<std::path::PathBuf, HubError> {
    let r = hub.resolve(RepoKind::Model, id, revision)?;
    let files = hub.list(RepoKind::Model, id, &r.commit)?;
    hub.download(RepoKind::Model, id, revision, &r.commit, &files, &NoProgress)
}

fn cdn_gets(mock: &MockHub) -> Vec<String> {
    mock.log().into_iter().filter(|l| l.starts_with("GET /cdn/")).collect()
}

#[test]
fn downloads_into_the_huggingface_cache_layout_and_reuses_it() {
    let (mock, w) = hub_with_model();
    let t = tempfile::tempdir().unwrap();
    let hub = online(&mock, t.path());
    let snap = fetch_all(&hub, "acme/tiny", "main").unwrap();
    let repo = t.path().join("models--acme--tiny");
    assert_eq!(snap, repo.join("snapshots").join(C1));
    assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap(), C1);
    // Blobs are named by etag: sha256 for the LFS file, the git blob hash for the small one.
    assert_eq!(std::fs::read(repo.join("blobs").join(sha256(&w))).unwrap(), w);
    assert!(repo.join("blobs").join(git_sha1(b"{\"a\": 1}")).is_file());
    let link = std::fs::read_link(snap.join("model.safetensors")).unwrap();
    assert_eq!(link, Path::new("../../blobs").join(sha256(&w)));
    assert_eq!(std::fs::read(snap.join("model.safetensors")).unwrap(), w);

    let before = mock.log().len();
    fetch_all(&hub, "acme/tiny", "main").unwrap();
    let again: Vec<String> = mock.log()[before..].to_vec();
    assert!(again.iter().all(|l| l.starts_with("GET /api/")), "cached files were fetched again: {again:?}");
    // A pinned commit whose snapshot is cached asks nothing at all.
    let before = mock.log().len();
    assert_eq!(hub.resolve(RepoKind::Model, "acme/tiny", C1).unwrap().commit, C1);
    assert_eq!(mock.log().len(), before);
}

#[test]
fn a_dropped_connection_resumes_with_a_range_request() {
    let (mock, w) = hub_with_model();
    mock.drop_once(&w);
    let t = tempfile::tempdir().unwrap();
    let snap = fetch_all(&online(&mock, t.path()), "acme/tiny", "main").unwrap();
    assert_eq!(std::fs::read(snap.join("model.safetensors")).unwrap(), w);
    let gets = cdn_gets(&mock);
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert!(gets[1].contains(&format!("bytes={}-", w.len() / 2)), "{gets:?}");
}

#[test]
fn a_killed_download_leaves_an_incomplete_blob_that_the_next_one_continues() {
    let (mock, w) = hub_with_model();
    let t = tempfile::tempdir().unwrap();
    let blobs = t.path().join("models--acme--tiny/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let third = w.len() / 3;
    std::fs::write(blobs.join(format!("{}.incomplete", sha256(&w))), &w[..third]).unwrap();
    assert!(!blobs.join(sha256(&w)).exists(), "a partial file never has the blob's name");
    let snap = fetch_all(&online(&mock, t.path()), "acme/tiny", "main").unwrap();
    assert_eq!(std::fs::read(snap.join("model.safetensors")).unwrap(), w);
    let gets = cdn_gets(&mock);
    assert_eq!(gets, vec![format!("GET /cdn/{} bytes={third}-", sha256(&w))]);
    assert!(!blobs.join(format!("{}.incomplete", sha256(&w))).exists());
}

#[test]
fn a_moved_main_resolves_to_the_new_commit_and_fetches_only_what_changed() {
    let (mock, w) = hub_with_model();
    let t = tempfile::tempdir().unwrap();
    let hub = online(&mock, t.path());
    fetch_all(&hub, "acme/tiny", "main").unwrap();
    mock.commit("models/acme/tiny", "main", C2, &[("config.json", b"{\"a\": 2}"), ("model.safetensors", &w)]);
    let before = cdn_gets(&mock).len();
    let snap = fetch_all(&hub, "acme/tiny", "main").unwrap();
    assert!(snap.ends_with(C2));
    assert_eq!(std::fs::read_to_string(t.path().join("models--acme--tiny/refs/main")).unwrap(), C2);
    assert_eq!(cdn_gets(&mock).len(), before, "the unchanged weights were downloaded again");
    assert_eq!(std::fs::read(snap.join("config.json")).unwrap(), b"{\"a\": 2}");
}

#[test]
fn offline_the_cache_answers_and_a_missing_file_is_named() {
    let (mock, _) = hub_with_model();
    let t = tempfile::tempdir().unwrap();
    fetch_all(&online(&mock, t.path()), "acme/tiny", "main").unwrap();
    let off = Hub::new(&mock.url, None, Some("HF_HUB_OFFLINE is set".into()), t.path().to_path_buf());
    let before = mock.log().len();
    let r = off.resolve(RepoKind::Model, "acme/tiny", "main").unwrap();
    assert_eq!(r.commit, C1);
    assert!(r.note.unwrap().contains("offline"));
    let files = off.list(RepoKind::Model, "acme/tiny", C1).unwrap();
    assert_eq!(files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(), ["config.json", "model.safetensors"]);
    off.download(RepoKind::Model, "acme/tiny", "main", C1, &files, &NoProgress).unwrap();
    assert_eq!(mock.log().len(), before, "offline asked the network");

    let missing = [RemoteFile { path: "tokenizer.json".into(), size: None }];
    let e = off.download(RepoKind::Model, "acme/tiny", "main", C1, &missing, &NoProgress).unwrap_err().to_string();
    for part in ["acme/tiny", "`main`", "tokenizer.json", "offline", "models--acme--tiny"] {
        assert!(e.contains(part), "`{part}` not in: {e}");
    }
    let e = off.resolve(RepoKind::Model, "acme/other", "main").unwrap_err().to_string();
    assert!(e.contains("acme/other") && e.contains("offline"), "{e}");
}

#[test]
fn an_unreachable_hub_falls_back_to_the_cache_and_says_so() {
    let (mock, _) = hub_with_model();
    let t = tempfile::tempdir().unwrap();
    fetch_all(&online(&mock, t.path()), "acme/tiny", "main").unwrap();
    // Nothing listens on port 9 of the loopback.
    let gone = Hub::new("http://127.0.0.1:9", None, None, t.path().to_path_buf());
    let r = gone.resolve(RepoKind::Model, "acme/tiny", "main").unwrap();
    assert_eq!(r.commit, C1);
    assert!(r.note.unwrap().contains("unreachable"));
}

#[test]
fn gated_and_missing_repositories_say_what_to_do() {
    let (mock, _) = hub_with_model();
    mock.gate("models/acme/tiny", "s3cret");
    let t = tempfile::tempdir().unwrap();
    let e = fetch_all(&online(&mock, t.path()), "acme/tiny", "main").unwrap_err();
    assert!(matches!(e, HubError::Gated { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&format!("{}/acme/tiny", mock.url)) && msg.contains("HF_TOKEN"), "{msg}");
    assert!(!msg.contains("401"), "no HTTP text: {msg}");

    let wrong = Hub::new(&mock.url, Some("nope".into()), None, t.path().to_path_buf());
    assert!(
        fetch_all(&wrong, "acme/tiny", "main").unwrap_err().to_string().contains("the token you set has no access")
    );
    let right = Hub::new(&mock.url, Some("s3cret".into()), None, t.path().to_path_buf());
    fetch_all(&right, "acme/tiny", "main").unwrap();

    let e = fetch_all(&right, "acme/typo", "main").unwrap_err().to_string();
    assert!(e.contains("acme/typo") && e.contains("not found"), "{e}");
}

#[test]
fn datasets_use_the_datasets_prefix_everywhere() {
    let mock = MockHub::start();
    mock.commit("datasets/acme/chats", "main", C1, &[("data/train.jsonl", b"{\"text\": \"hi\"}\n")]);
    let t = tempfile::tempdir().unwrap();
    let hub = online(&mock, t.path());
    let r = hub.resolve(RepoKind::Dataset, "acme/chats", "main").unwrap();
    let files = hub.list(RepoKind::Dataset, "acme/chats", &r.commit).unwrap();
    let snap = hub.download(RepoKind::Dataset, "acme/chats", "main", &r.commit, &files, &NoProgress).unwrap();
    assert_eq!(snap, t.path().join("datasets--acme--chats/snapshots").join(C1));
    assert!(snap.join("data/train.jsonl").is_file());
    assert!(mock.log().iter().any(|l| l.starts_with("GET /api/datasets/acme/chats/revision/main")));
    assert!(mock.log().iter().any(|l| l.starts_with("HEAD /datasets/acme/chats/resolve/")));
}
