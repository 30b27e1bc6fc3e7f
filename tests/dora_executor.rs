//! The dora executor on a real dora cluster: `newt cluster up` (a dora coordinator and two
//! daemons, labelled `cpu` and `gpu`, each its own process, on loopback with zenoh multicast off)
//! and a real S3-compatible server (moto) as the cache every node shares. The quickstart runs
//! with its data stages on the `cpu` daemon and train/evaluate/merge on the `gpu` one (CPU
//! backend) and gives the local executor's results; when the daemon running train is killed
//! mid-run, the run fails naming it, and the rerun on a new cluster finds fetch, tokenize and
//! pack in the cache while train resumes from its last checkpoint.
//!
//! Needs moto like tests/remote_cache.rs (skips without it unless NEWT_REQUIRE_S3 is set).

use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "support/quickstart.rs"]
mod quickstart;
use quickstart::Project;

#[path = "support/moto.rs"]
mod moto;
use moto::{BUCKET, Moto, moto};

/// `newt cluster up` with one daemon per label set; stopped (SIGTERM, then killed) on drop.
struct Cluster {
    child: Child,
    port: u16,
    /// Daemon machine id → pid.
    pids: BTreeMap<String, u32>,
}

impl Cluster {
    fn up(daemons: &[&str]) -> Cluster {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_newt"));
        cmd.args(["cluster", "up", "--port", &port.to_string()]);
        for d in daemons {
            cmd.args(["--daemon", d]);
        }
        // The daemons' machine has the bucket's credentials and the cache's MAC secret (the
        // nodes inherit them; the dataflow never carries secrets).
        cmd.env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env("NEWT_CACHE_SECRET", "the team's secret");
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut ready = None;
        let mut lines = stdout.lines();
        for line in lines.by_ref() {
            let line = line.unwrap();
            if line.starts_with("ready:") {
                ready = Some(line);
                break;
            }
        }
        let ready = ready.expect("`newt cluster up` ended without saying it is ready");
        // Keep draining its stdout.
        std::thread::spawn(move || for _ in lines {});
        // "ready: dora coordinator 127.0.0.1:P; daemons cpu [cpu] pid 12, gpu [gpu] pid 13"
        let mut pids = BTreeMap::new();
        for part in ready.split("daemons ").nth(1).unwrap().split(", ") {
            let id = part.split_whitespace().next().unwrap().to_string();
            let pid = part.rsplit(' ').next().unwrap().parse().unwrap();
            pids.insert(id, pid);
        }
        assert_eq!(pids.len(), daemons.len(), "{ready}");
        Cluster { child, port, pids }
    }
    fn coordinator(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The quickstart (`epochs`) with the shared remote cache, read-write, written as `writer`.
fn project(moto: &Moto, epochs: u32, writer: &str) -> Project {
    let p = Project::with_epochs(epochs);
    let yaml = std::fs::read_to_string(p.path("p.yml")).unwrap();
    let yaml = format!(
        "{yaml}\ncache:\n  remote: s3://{BUCKET}/dora\n  endpoint: {}\n  mode: read-write\n  writer: {writer}\n  \
         trusted_writers: [{writer}]\n",
        moto.endpoint
    );
    std::fs::write(p.path("p.yml"), yaml).unwrap();
    p
}

fn newt(p: &Project, args: &[&str]) -> Command {
    let mut c = p.newt(args);
    c.env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("NEWT_CACHE_SECRET", "the team's secret")
        .env_remove("NEWT_CACHE_REMOTE")
        .env_remove("NEWT_CACHE_MODE")
        .env_remove("NEWT_DORA_COORDINATOR");
    c
}

/// Each stage of a `--json` run report: (outcome, output digest, the note on where it ran).
fn stages(out: &Output) -> BTreeMap<String, (String, String, String)> {
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let outcome = match &s["outcome"] {
                Value::String(o) => o.clone(),
                other => other.to_string(),
            };
            let output = s["output"].as_str().unwrap_or("-").to_string();
            let note = s["remote"].as_str().unwrap_or("").to_string();
            (s["id"].as_str().unwrap().to_string(), (outcome, output, note))
        })
        .collect()
}

fn on_gpu(id: &str) -> bool {
    matches!(id, "train" | "evaluate" | "merge")
}

#[test]
fn the_quickstart_runs_on_two_daemons_with_the_local_executors_digests() {
    let Some(moto) = moto() else { return };
    // The reference: the local executor, its own cache, no remote.
    let local = Project::with_epochs(1);
    let out = local.newt(&["run", "p.yml", "--json", "--quiet"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reference = stages(&out);

    let cluster = Cluster::up(&["cpu", "gpu"]);
    assert_eq!(cluster.pids.keys().collect::<Vec<_>>(), ["cpu", "gpu"]);
    let p = project(&moto, 1, "ci");
    // `newt plan --executor dora` prints the dataflow it would start.
    let plan = newt(&p, &["plan", "p.yml", "--executor", "dora"]).output().unwrap();
    let dataflow: Value = serde_yaml::from_slice(&plan.stdout).unwrap_or_else(|e| {
        panic!("{e}\n{}\n{}", String::from_utf8_lossy(&plan.stdout), String::from_utf8_lossy(&plan.stderr))
    });
    let nodes = dataflow["nodes"].as_array().unwrap();
    // One node per stage, and the collector that hears from all of them.
    assert_eq!(nodes.len(), reference.len() + 1);
    let collector = nodes.iter().find(|n| n["id"] == "newt-collect").expect("the collector node");
    assert_eq!(collector["inputs"].as_object().unwrap().len(), reference.len());
    let train = nodes.iter().find(|n| n["id"] == "train").unwrap();
    assert_eq!(train["deploy"]["labels"]["gpu"], "true");
    assert!(train["inputs"]["pack"] == "pack/done", "{train}");

    let out =
        newt(&p, &["run", "p.yml", "--executor", "dora", "--coordinator", &cluster.coordinator(), "--json", "--quiet"])
            .output()
            .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let dora = stages(&out);
    assert_eq!(dora.keys().collect::<Vec<_>>(), reference.keys().collect::<Vec<_>>());
    for (id, (outcome, output, note)) in &dora {
        assert_eq!(outcome, "ran", "{id}: {outcome} ({note})\n{stderr}");
        // train's result holds its metrics log, with wall-clock timings: its digest differs
        // between any two runs; its adapter is compared byte for byte below.
        if id != "train" {
            assert_eq!(output, &reference[id].1, "{id}: the dora run's result differs from the local executor's");
        }
        let machine = if on_gpu(id) { "gpu" } else { "cpu" };
        assert_eq!(note, &format!("ran on {machine}"), "{id} ran elsewhere");
    }
    // The adapter reached output_dir, byte for byte the local executor's.
    let adapter = |p: &Project| std::fs::read(p.path("outputs/quickstart/adapter_model.safetensors")).unwrap();
    assert!(adapter(&p) == adapter(&local), "the dora run's adapter differs from the local executor's");

    // A second machine with an empty cache and the same bucket: every result is pulled, none runs.
    let other = project(&moto, 1, "ci");
    let out = newt(&other, &["run", "p.yml", "--json", "--quiet"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (id, (outcome, output, _)) in stages(&out) {
        assert_eq!(outcome, "pulled", "{id}");
        assert_eq!(output, dora[&id].1, "{id}");
    }
}

#[test]
fn killing_the_train_daemon_mid_run_then_rerunning_resumes_train_and_hits_the_data_stages() {
    let Some(moto) = moto() else { return };
    let p = project(&moto, 30, "ci");
    let yaml = std::fs::read_to_string(p.path("p.yml")).unwrap();
    std::fs::write(p.path("p.yml"), format!("{yaml}logging_steps: 1\nsave_steps: 1\n")).unwrap();
    let pipeline = std::fs::canonicalize(p.path("p.yml")).unwrap();
    let run = |cluster: &Cluster| {
        newt(&p, &["run", "p.yml", "--executor", "dora", "--coordinator", &cluster.coordinator(), "--json", "--quiet"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    {
        let cluster = Cluster::up(&["cpu", "gpu"]);
        let child = run(&cluster);
        // Train's first checkpoint in the cache's work folder; then the daemon that runs it,
        // and its node, are killed.
        let work = p.path("cache/v1/work");
        let t0 = Instant::now();
        while !walk(&work).iter().any(|f| f.contains("/checkpoint-")) {
            assert!(t0.elapsed() < Duration::from_secs(300), "no train checkpoint appeared under {work:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(Command::new("kill").args(["-KILL", &cluster.pids["gpu"].to_string()]).status().unwrap().success());
        let _ =
            Command::new("pkill").args(["-KILL", "-f", &format!("stage-node {} train", pipeline.display())]).status();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "the run whose train daemon was killed succeeded:\n{stderr}");
        let first = stages(&out);
        assert!(first["train"].0.contains("daemon `gpu` left the cluster"), "{:?}\n{stderr}", first["train"]);
    }
    // A new cluster (the old one lost its gpu daemon), and the rerun.
    let cluster = Cluster::up(&["cpu", "gpu"]);
    let out = run(&cluster).wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let again = stages(&out);
    for id in ["fetch.model", "fetch.0", "tokenize.0", "pack"] {
        assert_eq!(again[id].0, "hit", "{id}: {:?}", again[id]);
    }
    assert_eq!(again["train"].0, "ran");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let train = report["stages"].as_array().unwrap().iter().find(|s| s["id"] == "train").unwrap();
    let from = train["summary"]["resumed_from"].as_u64().unwrap_or_else(|| panic!("train did not resume: {train}"));
    assert!(from >= 1, "resumed from step {from}");
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            out.push(p.display().to_string());
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

#[test]
fn a_failing_stage_skips_its_dependents_with_the_reason_and_deploy_places_a_stage_by_machine() {
    let Some(moto) = moto() else { return };
    let p = project(&moto, 1, "ci");
    let yaml = std::fs::read_to_string(p.path("p.yml")).unwrap();
    let extra = "stages:\n  - name: check\n    kind: command\n    inputs: [pack]\n    run: \"echo the data is bad >&2; exit 3\"\n    \
                 outputs: [ok.txt]\n  - name: after\n    kind: command\n    inputs: [check]\n    run: \"touch $NEWT_OUT/x\"\n    \
                 outputs: [x]\ndeploy:\n  check: {machine: gpu}\n";
    std::fs::write(p.path("p.yml"), format!("{yaml}{extra}")).unwrap();
    let plan = newt(&p, &["plan", "p.yml", "--executor", "dora"]).output().unwrap();
    assert!(plan.status.success(), "{}", String::from_utf8_lossy(&plan.stderr));
    let dataflow: Value = serde_yaml::from_slice(&plan.stdout).unwrap();
    let node = |id: &str| dataflow["nodes"].as_array().unwrap().iter().find(|n| n["id"] == id).unwrap().clone();
    assert_eq!(node("check")["deploy"]["machine"], "gpu");
    assert_eq!(node("after")["deploy"]["labels"]["cpu"], "true");

    let cluster = Cluster::up(&["cpu", "gpu"]);
    let out = newt(
        &p,
        &[
            "run",
            "p.yml",
            "--only",
            "after",
            "--executor",
            "dora",
            "--coordinator",
            &cluster.coordinator(),
            "--json",
            "--quiet",
        ],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let r = stages(&out);
    assert!(r["check"].0.contains("failed"), "{:?}\n{stderr}", r["check"]);
    assert_eq!(r["after"].0, "skipped", "{:?}", r["after"]);
    assert!(r["after"].2.contains("upstream stage `check` failed"), "{:?}", r["after"]);
    assert_eq!(r["pack"].0, "ran", "{:?}", r["pack"]);
}
