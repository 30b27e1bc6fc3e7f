//! The shared remote cache against a real S3-compatible server: moto's (from PyPI), started by
//! the test on a free port. Two machines are two project folders with their own local caches
//! and one bucket between them.
//!
//! Needs python3 with `moto[s3]`, flask, flask-cors and boto3 importable (`NEWT_MOTO_PATH` is
//! put on PYTHONPATH for them). `.ci/run` installs them and sets NEWT_REQUIRE_S3=1, which turns a
//! missing one into a failure; elsewhere the test says it skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

#[path = "support/quickstart.rs"]
mod quickstart;
use quickstart::Project;

#[path = "support/moto.rs"]
mod moto;
use moto::{BUCKET, Moto, moto};

/// One machine: the quickstart (1 epoch) in its own folder, with its own cache, sharing `moto`.
struct Machine {
    project: Project,
}

impl Machine {
    fn new(moto: &Moto, writer: &str, mode: &str, trusted: &[&str]) -> Machine {
        let project = Project::with_epochs(1);
        let trusted: Vec<String> = trusted.iter().map(|t| format!("\"{t}\"")).collect();
        let yaml = std::fs::read_to_string(project.path("p.yml")).unwrap();
        let yaml = format!(
            "{yaml}\ncache:\n  remote: s3://{BUCKET}/team\n  endpoint: {}\n  mode: {mode}\n  writer: {writer}\n  \
             trusted_writers: [{}]\n",
            moto.endpoint,
            trusted.join(", ")
        );
        std::fs::write(project.path("p.yml"), yaml).unwrap();
        Machine { project }
    }
    fn newt(&self, args: &[&str]) -> Command {
        let mut c = self.project.newt(args);
        c.env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env("NEWT_CACHE_SECRET", "the team's secret")
            .env_remove("NEWT_CACHE_REMOTE")
            .env_remove("NEWT_CACHE_MODE");
        c
    }
    /// `newt run --json`: each stage's outcome and output digest, and the warnings on stderr.
    fn run(&self) -> (BTreeMap<String, (String, String)>, String) {
        let (outcomes, _, stderr) = self.run_keyed();
        (outcomes, stderr)
    }
    /// [`Machine::run`] with each stage's key.
    fn run_keyed(&self) -> (BTreeMap<String, (String, String)>, BTreeMap<String, String>, String) {
        let out = self.newt(&["run", "p.yml", "--json", "--quiet"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "newt run failed:\n{stderr}");
        (outcomes(&out), keys(&out), stderr)
    }
    fn cache(&self) -> PathBuf {
        self.project.path("cache")
    }
}

fn outcomes(out: &Output) -> BTreeMap<String, (String, String)> {
    let report: Value = serde_json::from_slice(&out.stdout).expect("a JSON run report");
    report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let outcome = match &s["outcome"] {
                Value::String(o) => o.clone(),
                other => other.to_string(),
            };
            (s["id"].as_str().unwrap().to_string(), (outcome, s["output"].as_str().unwrap_or("-").to_string()))
        })
        .collect()
}

fn keys(out: &Output) -> BTreeMap<String, String> {
    let report: Value = serde_json::from_slice(&out.stdout).expect("a JSON run report");
    report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_str().unwrap().to_string(), s["key"].as_str().unwrap_or("-").to_string()))
        .collect()
}

/// Every file under `dir`, relative path → bytes.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().display().to_string(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn all(outcomes: &BTreeMap<String, (String, String)>, want: &str) -> bool {
    outcomes.values().all(|(o, _)| o == want)
}

#[test]
fn a_second_machine_pulls_every_result_and_never_uses_a_corrupt_one() {
    let Some(moto) = moto() else { return };

    // Machine A runs without the remote, then pushes its latest run explicitly.
    let a = Machine::new(&moto, "ci", "read-write", &[]);
    let out = a.newt(&["run", "p.yml", "--json", "--quiet", "--remote", "off"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ran = outcomes(&out);
    assert!(all(&ran, "ran"), "{ran:?}");
    let push = a.newt(&["cache", "push", "-p", "p.yml"]).output().unwrap();
    let push_out = String::from_utf8_lossy(&push.stdout);
    assert!(push.status.success(), "{push_out}{}", String::from_utf8_lossy(&push.stderr));
    assert!(push_out.contains("uploaded"), "{push_out}");
    assert!(push_out.contains(&format!("{} results, 0 failed", ran.len())), "{push_out}");

    // Machine B, an empty cache, read-only, trusting `ci`: every stage is pulled, none runs, and
    // the artifacts are byte for byte A's.
    let b = Machine::new(&moto, "laptop", "read", &["ci"]);
    let plan = b.newt(&["plan", "p.yml"]).output().unwrap();
    let plan_out = String::from_utf8_lossy(&plan.stdout);
    assert!(plan.status.success(), "{plan_out}{}", String::from_utf8_lossy(&plan.stderr));
    assert_eq!(plan_out.matches("in remote").count(), ran.len(), "plan follows the remote's results:\n{plan_out}");
    let (pulled, stderr) = b.run();
    assert!(all(&pulled, "pulled"), "{pulled:?}\n{stderr}");
    for (id, (_, output)) in &ran {
        assert_eq!(&pulled[id].1, output, "stage {id}: another output digest");
        let rel = format!("v1/objects/{output}");
        assert_eq!(tree(&a.cache().join(&rel)), tree(&b.cache().join(&rel)), "stage {id}: other bytes");
    }
    let (again, _) = b.run();
    assert!(all(&again, "hit"), "a rerun on B is local hits: {again:?}");
    // `cache ls --from-remote` lists each result the remote has, its writer, and that B has it.
    let ls = b.newt(&["cache", "ls", "--from-remote", "-p", "p.yml"]).output().unwrap();
    let ls_out = String::from_utf8_lossy(&ls.stdout);
    assert!(ls.status.success(), "{ls_out}{}", String::from_utf8_lossy(&ls.stderr));
    for (id, (_, output)) in &ran {
        let line = ls_out.lines().find(|l| l.contains(&output[..12])).unwrap_or_else(|| panic!("{id}: {ls_out}"));
        assert!(line.contains(id.as_str()) && line.contains(" local ") && line.ends_with(" ci"), "{line}");
    }
    assert!(ls_out.contains(&format!("({} results)", ran.len())), "{ls_out}");
    // B is read-only: it cannot push.
    let refused = b.newt(&["cache", "push", "-p", "p.yml", "--all"]).output().unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stdout).contains("read-only"), "{refused:?}");

    // A bucket that does not exist: one warning naming the problem, and the run goes on locally.
    let lost = Machine::new(&moto, "laptop", "read", &["ci"]);
    let yaml = std::fs::read_to_string(lost.project.path("p.yml")).unwrap();
    std::fs::write(lost.project.path("p.yml"), yaml.replace(&format!("s3://{BUCKET}/"), "s3://no-such-bucket/"))
        .unwrap();
    let (local, stderr) = lost.run();
    assert!(all(&local, "ran"), "{local:?}");
    assert_eq!(stderr.matches("NoSuchBucket").count(), 1, "{stderr}");
    assert!(stderr.contains("the remote cache is not used in this run"), "{stderr}");

    // A writer outside trusted_writers is not used.
    let c = Machine::new(&moto, "laptop", "read", &["someone-else"]);
    let (untrusted, stderr) = c.run();
    assert!(all(&untrusted, "ran"), "{untrusted:?}");
    assert!(stderr.contains("not in trusted_writers"), "{stderr}");
    let ls = c.newt(&["cache", "ls", "--from-remote", "-p", "p.yml"]).output().unwrap();
    let ls_out = String::from_utf8_lossy(&ls.stdout);
    assert!(ls.status.success(), "{ls_out}");
    let refused =
        ls_out.lines().filter(|l| l.contains("refused") && l.contains("ci: not used: it was written by `ci`")).count();
    assert!(refused >= ran.len(), "each of A's results is listed as refused on C:\n{ls_out}");

    // Damage one file of tokenize's result in the bucket (same size): a new machine detects it,
    // runs tokenize again (and pulls the rest), and being read-write mends the bucket.
    let tokenize = ran.keys().find(|id| id.starts_with("tokenize")).unwrap().clone();
    let prefix = format!("team/v1/objects/{}/", ran[&tokenize].1);
    let damaged = moto.boto(&format!(
        "keys = [o['Key'] for o in s3.list_objects_v2(Bucket=B, Prefix='{prefix}')['Contents']]\n\
         k = sorted(keys, key=lambda k: -s3.head_object(Bucket=B, Key=k)['ContentLength'])[0]\n\
         body = bytearray(s3.get_object(Bucket=B, Key=k)['Body'].read())\n\
         body[len(body) // 2] ^= 0xFF\n\
         s3.put_object(Bucket=B, Key=k, Body=bytes(body))\nprint(k)"
    ));
    assert!(damaged.trim().starts_with(&prefix), "{damaged}");
    let d = Machine::new(&moto, "ci", "read-write", &[]);
    let (mended, stderr) = d.run();
    assert_eq!(mended[&tokenize].0, "ran", "{mended:?}\n{stderr}");
    assert!(stderr.contains("does not match its digest"), "{stderr}");
    assert_eq!(mended[&tokenize].1, ran[&tokenize].1, "tokenize is deterministic");
    for (id, (o, _)) in &mended {
        if id != &tokenize {
            assert_eq!(o, "pulled", "{id}: {mended:?}");
        }
    }
    let e = Machine::new(&moto, "laptop", "read", &["ci"]);
    let (clean, stderr) = e.run();
    assert!(all(&clean, "pulled"), "the bucket was mended: {clean:?}\n{stderr}");

    // `newt inspect STAGE -p` on an empty cache: the stage's current key, pulled (train comes
    // after four stages that are not local either).
    let fresh = Machine::new(&moto, "laptop", "read", &["ci"]);
    let out = fresh.newt(&["inspect", "train", "-p", "p.yml"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&ran["train"].1), "{out:?}");

    // `newt inspect` and `newt query` by digest on an empty cache: pulled on demand.
    let f = Machine::new(&moto, "laptop", "read", &["ci"]);
    let remote = format!("s3://{BUCKET}/team");
    let pack = ran.keys().find(|id| id.starts_with("pack")).unwrap().clone();
    let digest = &ran[&pack].1[..12];
    let env = |c: &mut Command| {
        c.env("NEWT_CACHE_ENDPOINT", &moto.endpoint).env("NEWT_CACHE_TRUSTED", "ci");
    };
    let mut inspect = f.newt(&["inspect", digest, "--remote", &remote]);
    env(&mut inspect);
    let out = inspect.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pulled"), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&ran[&pack].1), "{out:?}");
    let mut query = f.newt(&["query", digest, "select count(*) as rows_in_train from train", "--remote", &remote]);
    env(&mut query);
    let out = query.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("rows_in_train"), "{out:?}");
}

#[test]
fn two_machines_writing_the_same_keys_at_once_leave_one_valid_result_each() {
    let Some(moto) = moto() else { return };
    let g = Machine::new(&moto, "gpu-1", "read-write", &["*"]);
    let h = Machine::new(&moto, "gpu-2", "read-write", &["*"]);
    let spawn = |m: &Machine| {
        m.newt(&["run", "p.yml", "--json", "--quiet"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    };
    let (pg, ph) = (spawn(&g), spawn(&h));
    let (og, oh) = (pg.wait_with_output().unwrap(), ph.wait_with_output().unwrap());
    assert!(og.status.success(), "{}", String::from_utf8_lossy(&og.stderr));
    assert!(oh.status.success(), "{}", String::from_utf8_lossy(&oh.stderr));
    let (rg, rh) = (outcomes(&og), outcomes(&oh));
    let (kg, kh) = (keys(&og), keys(&oh));
    // Every key either machine ran has one manifest in the bucket, by one of the two writers.
    // (Training on the CPU is not bit-reproducible between two processes sharing 2 cores, so
    // train's outputs, and the keys of evaluate and merge after it, may differ between them.)
    let listing = moto.boto(
        "import json\nfor o in s3.list_objects_v2(Bucket=B, Prefix='team/v1/manifests/')['Contents']:\n    \
         env = json.loads(s3.get_object(Bucket=B, Key=o['Key'])['Body'].read())\n    print(o['Key'], env['writer'])",
    );
    let in_bucket: BTreeMap<String, String> = listing
        .lines()
        .map(|l| {
            let (path, writer) = l.split_once(' ').unwrap();
            let key = path.trim_start_matches("team/v1/manifests/").trim_end_matches(".json");
            (key.to_string(), writer.to_string())
        })
        .collect();
    let ran: std::collections::BTreeSet<&String> = kg.values().chain(kh.values()).collect();
    assert_eq!(in_bucket.keys().collect::<std::collections::BTreeSet<_>>(), ran, "{listing}");
    assert!(in_bucket.values().all(|w| w == "gpu-1" || w == "gpu-2"), "{listing}");
    // Both ran the data stages at the same moment: one manifest each, and both machines agree.
    for id in kg.keys().filter(|id| id.starts_with("fetch") || id.starts_with("tokenize") || id.starts_with("pack")) {
        assert_eq!(kg[id], kh[id], "{id}");
        assert_eq!(rg[id].1, rh[id].1, "{id}");
    }
    // A third machine pulls every stage, each the result one of the two writers has.
    let k = Machine::new(&moto, "reader", "read", &["gpu-1", "gpu-2"]);
    let (pulled, stderr) = k.run();
    assert!(all(&pulled, "pulled"), "{pulled:?}\n{stderr}");
    for (id, (_, output)) in &pulled {
        assert!(output == &rg[id].1 || output == &rh[id].1, "{id}: {output} is neither writer's");
    }
}
