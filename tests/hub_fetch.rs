//! Hub ids through the `newt` binary, against a Hub lookalike on 127.0.0.1 (never the real
//! Hub): a pipeline with `base_model: acme/tiny-llama` and a Hub dataset plans with its
//! downloads listed, `newt fetch` downloads into the Hugging Face cache, runs are keyed by the
//! commit (offline reruns are hits; a moved `main` re-runs fetch and nothing after it when the
//! files did not change), a gated dataset says what to do, and `huggingface_hub` (Python) and
//! newt read each other's downloads.

#[path = "../stages/hub/tests/support/mock_hub.rs"]
mod mock_hub;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mock_hub::MockHub;

const C1: &str = "1111111111111111111111111111111111111111";
const C2: &str = "2222222222222222222222222222222222222222";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The quickstart's tiny model folder, made by newt itself: (file name, bytes).
fn tiny_model_files() -> Vec<(String, Vec<u8>)> {
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(t.path().join("data")).unwrap();
    std::fs::copy(root().join("pipelines/data/quickstart.jsonl"), t.path().join("data/quickstart.jsonl")).unwrap();
    std::fs::copy(root().join("pipelines/quickstart.yml"), t.path().join("p.yml")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_newt"))
        .args(["run", "p.yml", "--only", "fetch.model", "--json", "--quiet"])
        .current_dir(t.path())
        .env("NEWT_CACHE_DIR", t.path().join("cache"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stage = v["stages"].as_array().unwrap().iter().find(|s| s["id"] == "fetch.model").unwrap();
    let dir = PathBuf::from(stage["path"].as_str().unwrap());
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    files.sort();
    files
}

struct Setup {
    mock: MockHub,
    dir: tempfile::TempDir,
    model: Vec<(String, Vec<u8>)>,
}

impl Setup {
    fn new() -> Setup {
        let mock = MockHub::start();
        let mut model = tiny_model_files();
        model.push(("README.md".into(), b"# tiny\n".to_vec()));
        let refs: Vec<(&str, &[u8])> = model.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
        mock.commit("models/acme/tiny-llama", "main", C1, &refs);
        let rows = std::fs::read(root().join("pipelines/data/quickstart.jsonl")).unwrap();
        mock.commit("datasets/acme/chats", "main", C1, &[("README.md", b"chats"), ("data/train.jsonl", &rows)]);
        let dir = tempfile::tempdir().unwrap();
        let yaml = std::fs::read_to_string(root().join("pipelines/quickstart.yml")).unwrap();
        let start = yaml.find("tiny_model:").unwrap();
        let end = yaml.find("datasets:").unwrap();
        let yaml = format!("{}{}", &yaml[..start], &yaml[end..])
            .replace("base_model: newt:tiny", "base_model: acme/tiny-llama")
            .replace("path: data/quickstart.jsonl", "path: acme/chats")
            .replace("num_epochs: 8", "num_epochs: 1");
        std::fs::write(dir.path().join("p.yml"), yaml).unwrap();
        Setup { mock, dir, model }
    }

    fn hf_cache(&self) -> PathBuf {
        self.dir.path().join("hf")
    }

    fn newt(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_newt"));
        c.args(args)
            .current_dir(self.dir.path())
            .env("NEWT_CACHE_DIR", self.dir.path().join("cache"))
            .env("HF_ENDPOINT", &self.mock.url)
            .env("HF_HUB_CACHE", self.hf_cache())
            .env("NO_COLOR", "1")
            .env_remove("HF_TOKEN")
            .env_remove("HF_HOME")
            .env_remove("HF_HUB_OFFLINE");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.newt(args).output().unwrap()
    }
}

fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}\n{}", String::from_utf8_lossy(&out.stdout));
    err
}

/// stage id → outcome, from `--json`.
fn outcomes(out: &Output) -> Vec<(String, String)> {
    ok(out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_str().unwrap().to_string(), s["outcome"].as_str().unwrap_or("failed").to_string()))
        .collect()
}

fn outcome<'a>(o: &'a [(String, String)], id: &str) -> &'a str {
    &o.iter().find(|(i, _)| i == id).unwrap().1
}

#[test]
fn hub_model_and_dataset_download_key_by_commit_and_rerun_offline() {
    let s = Setup::new();
    let plan = s.run(&["plan", "p.yml"]);
    ok(&plan);
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(text.contains(&format!("hub: download models/acme/tiny-llama@{C1} (")), "{text}");
    assert!(text.contains(&format!("hub: download datasets/acme/chats@{C1} (1 files")), "{text}");
    assert!(!s.mock.log().iter().any(|l| l.contains("/cdn/") || l.contains("/resolve/")), "plan downloaded");

    let err = ok(&s.run(&["fetch", "p.yml"]));
    assert!(err.contains("hub: download models/acme/tiny-llama"), "{err}");
    let repo = s.hf_cache().join("models--acme--tiny-llama");
    assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap(), C1);
    for (name, bytes) in s.model.iter().filter(|(n, _)| n != "README.md") {
        assert_eq!(&std::fs::read(repo.join("snapshots").join(C1).join(name)).unwrap(), bytes, "{name}");
    }
    assert!(!repo.join("snapshots").join(C1).join("README.md").exists(), "only the files newt reads");

    let first = outcomes(&s.run(&["run", "p.yml", "--json", "--quiet"]));
    assert_eq!(outcome(&first, "fetch.model"), "hit", "newt fetch already ran it");
    assert_eq!(outcome(&first, "train"), "ran");

    // Offline: every key still computes (from the cache's refs) and every stage is a hit.
    let before = s.mock.log().len();
    let offline =
        outcomes(&s.newt(&["run", "p.yml", "--json", "--quiet"]).env("HF_HUB_OFFLINE", "1").output().unwrap());
    assert!(offline.iter().all(|(_, o)| o == "hit"), "{offline:?}");
    assert_eq!(s.mock.log().len(), before, "offline asked the network");

    // `main` moves to a commit that changes only the README: fetch.model's key changes, its
    // output does not, so nothing after it runs, and no weight is downloaded again.
    let refs: Vec<(&str, &[u8])> = s
        .model
        .iter()
        .map(|(n, b)| (n.as_str(), if n == "README.md" { b"# tiny, v2\n".as_slice() } else { b.as_slice() }))
        .collect();
    s.mock.commit("models/acme/tiny-llama", "main", C2, &refs);
    let before = s.mock.log().len();
    let moved = outcomes(&s.run(&["run", "p.yml", "--json", "--quiet"]));
    assert_eq!(outcome(&moved, "fetch.model"), "ran");
    for id in ["tokenize.0", "pack", "train", "evaluate", "merge"] {
        assert_eq!(outcome(&moved, id), "hit", "{id} re-ran after an unchanged download: {moved:?}");
    }
    let new: Vec<String> = s.mock.log()[before..].to_vec();
    assert!(!new.iter().any(|l| l.starts_with("GET /cdn/")), "downloaded again: {new:?}");
    let why = String::from_utf8_lossy(&s.run(&["why", "p.yml", "fetch.model"]).stdout).into_owned();
    assert!(why.contains("cache hit"), "{why}");
}

#[test]
fn a_gated_dataset_says_where_to_accept_its_license() {
    let s = Setup::new();
    s.mock.gate("datasets/acme/chats", "s3cret");
    let out = s.run(&["plan", "p.yml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("gated dataset `acme/chats`"), "{err}");
    assert!(err.contains(&format!("{}/datasets/acme/chats", s.mock.url)) && err.contains("HF_TOKEN"), "{err}");
    let out = s.newt(&["fetch", "p.yml"]).env("HF_TOKEN", "s3cret").output().unwrap();
    ok(&out);
}

#[test]
fn offline_without_the_files_names_the_repository_and_revision() {
    let s = Setup::new();
    let out = s.newt(&["run", "p.yml"]).env("HF_HUB_OFFLINE", "1").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("acme/tiny-llama") && err.contains("`main`") && err.contains("offline"), "{err}");
    assert!(s.mock.log().is_empty(), "offline asked the network: {:?}", s.mock.log());
}

/// Python with `huggingface_hub`, or None (CI installs it: `.ci/run` sets
/// NEWT_REQUIRE_HF_INTEROP=1 once it has).
fn python_with_hub() -> Option<String> {
    let py = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let found = Command::new(&py).args(["-c", "import huggingface_hub"]).output().is_ok_and(|o| o.status.success());
    if found {
        return Some(py);
    }
    assert!(
        std::env::var_os("NEWT_REQUIRE_HF_INTEROP").is_none(),
        "NEWT_REQUIRE_HF_INTEROP is set but `{py} -c 'import huggingface_hub'` fails"
    );
    eprintln!("skipped: huggingface_hub is not importable by {py} (pip install huggingface_hub to run this test)");
    None
}

#[test]
fn huggingface_hub_and_newt_share_the_cache_both_ways() {
    let Some(py) = python_with_hub() else { return };
    let s = Setup::new();
    ok(&s.run(&["fetch", "p.yml"]));
    // newt → huggingface_hub: offline, it finds what newt downloaded, byte for byte.
    let script = root().join("scripts/hub_interop.py");
    let names: Vec<&str> = s.model.iter().map(|(n, _)| n.as_str()).filter(|n| *n != "README.md").collect();
    let out = Command::new(&py)
        .arg(&script)
        .args(["read", "model", "acme/tiny-llama"])
        .args(&names)
        .env("HF_HUB_CACHE", s.hf_cache())
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_HOME")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}\n{text}", String::from_utf8_lossy(&out.stderr));
    for (name, bytes) in s.model.iter().filter(|(n, _)| n != "README.md") {
        assert!(text.contains(&format!("{name} {}", mock_hub::sha256(bytes))), "{name}: {text}");
    }

    // huggingface_hub → newt: Python downloads another repository; newt, offline, uses it.
    let refs: Vec<(&str, &[u8])> = s.model.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
    s.mock.commit("models/acme/other", "main", C2, &refs);
    let out = Command::new(&py)
        .arg(&script)
        .args(["download", "model", "acme/other"])
        .env("HF_HUB_CACHE", s.hf_cache())
        .env("HF_ENDPOINT", &s.mock.url)
        .env_remove("HF_HOME")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\nrequests: {:?}", String::from_utf8_lossy(&out.stderr), s.mock.log());
    let yaml = std::fs::read_to_string(s.dir.path().join("p.yml")).unwrap();
    std::fs::write(s.dir.path().join("p.yml"), yaml.replace("acme/tiny-llama", "acme/other")).unwrap();
    let before = s.mock.log().len();
    let o = outcomes(
        &s.newt(&["run", "p.yml", "--only", "fetch.model", "--json", "--quiet"])
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap(),
    );
    assert_eq!(outcome(&o, "fetch.model"), "ran");
    assert_eq!(s.mock.log().len(), before, "newt downloaded what huggingface_hub had put in the cache");
}

#[test]
fn axolotls_quickstart_form_plans_with_its_downloads_listed() {
    // Axolotl's quickstart shape: a Hub model and a Hub dataset, nothing local.
    let mock = MockHub::start();
    let model = tiny_model_files();
    let refs: Vec<(&str, &[u8])> = model.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
    mock.commit("models/NousResearch/Llama-3.2-1B", "main", C1, &refs);
    let rows = std::fs::read(root().join("pipelines/data/alpaca_format.jsonl")).unwrap();
    mock.commit("datasets/teknium/GPT4-LLM-Cleaned", "main", C2, &[("README.md", b"x"), ("alpaca_gpt4.jsonl", &rows)]);
    let yaml = std::fs::read_to_string(root().join("tests/fixtures/axolotl/01-llama3-lora-alpaca.yml"))
        .unwrap()
        .replace("base_model: newt:tiny", "base_model: NousResearch/Llama-3.2-1B")
        .replace("path: data/alpaca.jsonl\n    ds_type: json", "path: teknium/GPT4-LLM-Cleaned");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("lora-1b.yml"), yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_newt"))
        .args(["plan", "lora-1b.yml"])
        .current_dir(dir.path())
        .env("NEWT_CACHE_DIR", dir.path().join("cache"))
        .env("HF_ENDPOINT", &mock.url)
        .env("HF_HUB_CACHE", dir.path().join("hf"))
        .env_remove("HF_HOME")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("hub: download models/NousResearch/Llama-3.2-1B@{C1} (")), "{text}");
    assert!(text.contains(&format!("hub: download datasets/teknium/GPT4-LLM-Cleaned@{C2} (1 files")), "{text}");
    assert!(text.contains("fetch.model") && text.contains("will run"), "{text}");
}

#[test]
fn revision_of_model_picks_a_tag_and_keys_by_its_commit() {
    let s = Setup::new();
    // main moves on; the tag `v1` stays at C1.
    let refs: Vec<(&str, &[u8])> = s.model.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
    s.mock.commit("models/acme/tiny-llama", "v1", C1, &refs);
    s.mock.commit("models/acme/tiny-llama", "main", C2, &refs);
    let yaml = std::fs::read_to_string(s.dir.path().join("p.yml")).unwrap();
    std::fs::write(
        s.dir.path().join("p.yml"),
        yaml.replace("base_model: acme/tiny-llama", "base_model: acme/tiny-llama\nrevision_of_model: v1"),
    )
    .unwrap();
    let plan = s.run(&["plan", "p.yml"]);
    ok(&plan);
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(text.contains(&format!("models/acme/tiny-llama@{C1}")), "{text}");
    // `--json`: progress as events on stderr, one JSON object per line.
    let err = ok(&s.run(&["fetch", "p.yml", "--json"]));
    assert_eq!(std::fs::read_to_string(s.hf_cache().join("models--acme--tiny-llama/refs/v1")).unwrap(), C1);
    let events: Vec<serde_json::Value> = err.lines().map(|l| serde_json::from_str(l).expect(l)).collect();
    let of = |kind: &str, stage: &str| events.iter().filter(|e| e["event"] == kind && e["stage"] == stage).count();
    assert!(events.iter().any(|e| e["event"] == "download" && e["repo"] == format!("models/acme/tiny-llama@{C1}")));
    assert_eq!(of("started", "fetch.model"), 1, "{err}");
    assert!(of("progress", "fetch.model") >= 1, "{err}");
    assert_eq!(of("finished", "fetch.model"), 1, "{err}");
    let total: u64 = s.model.iter().filter(|(n, _)| n != "README.md").map(|(_, b)| b.len() as u64).sum();
    assert!(events.iter().any(|e| e["event"] == "progress" && e["total"] == total), "{err}");
}

#[test]
fn a_dataset_with_only_a_loading_script_reads_the_hubs_parquet_conversion() {
    let s = Setup::new();
    s.mock.commit("datasets/acme/scripted", "main", C1, &[("README.md", b"x"), ("scripted.py", b"# a loading script")]);
    s.mock.commit(
        "datasets/acme/scripted",
        "refs/convert/parquet",
        C2,
        &[("default/train/0000.parquet", b"PAR1 rows"), ("default/test/0000.parquet", b"PAR1 test")],
    );
    let yaml = std::fs::read_to_string(s.dir.path().join("p.yml")).unwrap();
    std::fs::write(s.dir.path().join("p.yml"), yaml.replace("path: acme/chats", "path: acme/scripted")).unwrap();
    let plan = s.run(&["plan", "p.yml"]);
    ok(&plan);
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(text.contains(&format!("hub: download datasets/acme/scripted@{C2} (1 files")), "{text}");
    assert!(s.mock.log().iter().any(|l| l.contains("/revision/refs%2Fconvert%2Fparquet")), "{:?}", s.mock.log());
}
