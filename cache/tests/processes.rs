//! Cross-process behaviour: the test binary re-runs itself as a child (see `child_process_role`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::key;
use newt_cache::{Cache, CacheError};

const ROLE: &str = "NEWT_CACHE_TEST_CHILD_ROLE";
const ROOT: &str = "NEWT_CACHE_TEST_CHILD_ROOT";
const SIGNALS: &str = "NEWT_CACHE_TEST_CHILD_SIGNALS";

/// Not a test: the body of the child processes spawned below. It does nothing unless spawned.
#[test]
#[ignore = "helper process for the cross-process tests, which spawn it"]
fn child_process_role() {
    let (Ok(role), Some(root), Some(signals)) =
        (std::env::var(ROLE), std::env::var_os(ROOT), std::env::var_os(SIGNALS))
    else {
        return;
    };
    if role == "print_default_root" {
        std::fs::write(Path::new(&signals).join("root"), Cache::default_root().to_string_lossy().as_bytes()).unwrap();
        return;
    }
    let cache = Cache::open(Path::new(&root)).unwrap();
    let signals = PathBuf::from(signals);
    match role.as_str() {
        "stage_then_hang" => {
            let _lock = cache.lock_key(&key("killed")).unwrap();
            let staging = cache.staging(&key("killed")).unwrap();
            std::fs::write(staging.out_dir().join("adapter_model.safetensors"), vec![1u8; 4096]).unwrap();
            std::fs::write(signals.join("staged"), staging.out_dir().to_string_lossy().as_bytes()).unwrap();
            std::thread::sleep(Duration::from_secs(60)); // killed by the parent long before
        }
        "lock_and_report" => {
            let busy = cache.try_lock_key(&key("shared")).unwrap().is_none();
            std::fs::write(signals.join("tried"), if busy { "busy" } else { "free" }).unwrap();
            let _lock = cache.lock_key(&key("shared")).unwrap();
            std::fs::write(signals.join("acquired"), "").unwrap();
        }
        other => panic!("unknown role {other}"),
    }
}

fn spawn_child(role: &str, root: &Path, signals: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_process_role", "--ignored", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(ROOT, root)
        .env(SIGNALS, signals)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_for(path: &Path, child: &mut Child) {
    let start = Instant::now();
    while !path.exists() {
        assert!(child.try_wait().unwrap().is_none(), "child exited before writing {}", path.display());
        assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for {}", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn manifest_written_last_so_crash_before_it_is_a_miss() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(&dir.path().join("cache")).unwrap();
    let signals = dir.path().join("signals");
    std::fs::create_dir(&signals).unwrap();

    let mut child = spawn_child("stage_then_hang", cache.root(), &signals);
    wait_for(&signals.join("staged"), &mut child);
    let staged = PathBuf::from(std::fs::read_to_string(signals.join("staged")).unwrap());
    assert!(staged.join("adapter_model.safetensors").exists());
    assert!(!cache.lookup(&key("killed")).unwrap().is_hit(), "staged outputs are not a result");
    assert!(cache.try_lock_key(&key("killed")).unwrap().is_none(), "the child holds the key");
    assert!(matches!(cache.gc(false), Err(CacheError::Busy { .. })), "gc waits for the live run");

    child.kill().unwrap(); // SIGKILL: no destructor runs
    child.wait().unwrap();

    assert!(staged.exists(), "a killed stage leaves its staging directory behind");
    let lookup = cache.lookup(&key("killed")).unwrap();
    assert!(!lookup.is_hit() && lookup.warnings.is_empty());
    assert!(cache.try_lock_key(&key("killed")).unwrap().is_some(), "the OS released the dead process's lock");
    let report = cache.gc(false).unwrap();
    assert_eq!(report.removed_tmp, vec![staged.clone()]);
    assert!(!staged.exists());
}

#[test]
fn second_process_blocks_on_a_held_key_until_release() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(&dir.path().join("cache")).unwrap();
    let signals = dir.path().join("signals");
    std::fs::create_dir(&signals).unwrap();

    let lock = cache.lock_key(&key("shared")).unwrap();
    let mut child = spawn_child("lock_and_report", cache.root(), &signals);
    wait_for(&signals.join("tried"), &mut child);
    assert_eq!(std::fs::read_to_string(signals.join("tried")).unwrap(), "busy");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!signals.join("acquired").exists(), "the child must wait while the parent holds the key");

    drop(lock);
    let status = child.wait().unwrap();
    assert!(status.success());
    assert!(signals.join("acquired").exists());
}

/// `Cache::default_root()` as seen by a child with `set` in its environment and `unset` removed.
fn default_root_with(set: &[(&str, &str)], unset: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_process_role", "--ignored", "--test-threads=1"])
        .env(ROLE, "print_default_root")
        .env(ROOT, dir.path())
        .env(SIGNALS, dir.path())
        .stdout(std::process::Stdio::null());
    for (k, v) in set {
        cmd.env(k, v);
    }
    for k in unset {
        cmd.env_remove(k);
    }
    assert!(cmd.status().unwrap().success());
    std::fs::read_to_string(dir.path().join("root")).unwrap()
}

#[test]
fn default_root_prefers_newt_cache_dir_then_xdg_cache_home() {
    let both = [("NEWT_CACHE_DIR", "/srv/newt-cache"), ("XDG_CACHE_HOME", "/xdg")];
    assert_eq!(default_root_with(&both, &[]), "/srv/newt-cache");
    assert_eq!(default_root_with(&[("XDG_CACHE_HOME", "/xdg")], &["NEWT_CACHE_DIR"]), "/xdg/newt");
    let fallback = default_root_with(&[("HOME", "/home/someone")], &["NEWT_CACHE_DIR", "XDG_CACHE_HOME"]);
    assert!(fallback.ends_with("/newt"), "{fallback}");
}
