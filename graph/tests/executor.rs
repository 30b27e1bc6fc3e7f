//! The executor's contract: caching, early cutoff, failures, concurrency.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use newt_cache::Cache;
use newt_graph::compile::{StageNode, build};
use newt_graph::executor::{Executor, LocalExecutor, Outcome, RunReport, SilentReporter, materialize};
use newt_graph::stage::{CancelToken, Registry, Stage, StageContext};

/// Writes `params.value` (or, with `from_input`, its input's bytes re-written) and counts runs.
struct Echo {
    runs: Arc<std::sync::Mutex<BTreeMap<String, usize>>>,
    fail_on: Option<String>,
}

impl Stage for Echo {
    fn kind(&self) -> &'static str {
        "echo"
    }
    fn version(&self) -> u32 {
        1
    }
    fn required_outputs(&self, _: &StageNode) -> Vec<String> {
        vec!["out.txt".into()]
    }
    /// `params.offer`: `[[src, dst], ...]` to copy into output_dir.
    fn materialize(&self, node: &StageNode) -> Vec<(String, String)> {
        serde_json::from_value(node.params["offer"].clone()).unwrap_or_default()
    }
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<serde_json::Value> {
        *self.runs.lock().unwrap().entry(ctx.node.id.clone()).or_default() += 1;
        // `params.scratch`: a path under the work directory to create first (a trailing `/`
        // makes a directory, anything else a file), as a long stage keeps its checkpoints.
        if let Some(scratch) = ctx.node.params["scratch"].as_str() {
            let path = ctx.work_dir.join(scratch);
            if scratch.ends_with('/') {
                std::fs::create_dir_all(&path)?;
            } else {
                std::fs::create_dir_all(path.parent().unwrap())?;
                std::fs::write(&path, "step 3")?;
            }
        }
        if self.fail_on.as_deref() == Some(ctx.node.id.as_str()) {
            anyhow::bail!("boom");
        }
        let mut text = ctx.node.params["value"].as_str().unwrap_or("").to_string();
        for dir in ctx.inputs.values() {
            text.push_str(&std::fs::read_to_string(dir.join("out.txt"))?);
        }
        std::fs::write(ctx.out_dir.join("out.txt"), text)?;
        Ok(serde_json::json!({"len": 1}))
    }
}

fn node(id: &str, value: &str, inputs: &[&str]) -> StageNode {
    StageNode {
        id: id.into(),
        kind: "echo".into(),
        params: serde_json::json!({ "value": value }),
        settings: serde_json::json!({}),
        inputs: inputs.iter().map(|s| s.to_string()).collect(),
        external: Vec::new(),
    }
}

struct Harness {
    dir: tempfile::TempDir,
    runs: Arc<std::sync::Mutex<BTreeMap<String, usize>>>,
}

impl Harness {
    fn new() -> Self {
        Harness { dir: tempfile::tempdir().unwrap(), runs: Default::default() }
    }
    fn executor(&self, fail_on: Option<&str>) -> LocalExecutor {
        let mut reg = Registry::new();
        reg.register(Arc::new(Echo { runs: self.runs.clone(), fail_on: fail_on.map(String::from) }));
        LocalExecutor {
            cache: Arc::new(Cache::open(&self.dir.path().join("cache")).unwrap()),
            registry: Arc::new(reg),
            reporter: Arc::new(SilentReporter),
            cancel: CancelToken::new(),
            base_dir: self.dir.path().to_path_buf(),
            pipeline_id: "test".into(),
            pipeline_path: "test.yml".into(),
            max_parallel: 4,
            remote: None,
            runs_only: None,
        }
    }
    fn run(&self, nodes: Vec<StageNode>, fail_on: Option<&str>) -> Vec<(String, Outcome)> {
        self.run_report(nodes, fail_on).1.stages.into_iter().map(|s| (s.id, s.outcome)).collect()
    }
    fn run_report(&self, nodes: Vec<StageNode>, fail_on: Option<&str>) -> (newt_graph::compile::Pipeline, RunReport) {
        let p = build(nodes).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let r = rt.block_on(self.executor(fail_on).run(&p, None)).unwrap();
        (p, r)
    }
    /// Runs `nodes`, then copies what they offer into `out` as `newt run` does.
    fn run_and_materialize(&self, nodes: Vec<StageNode>, out: &Path) -> anyhow::Result<(RunReport, Vec<PathBuf>)> {
        let (p, r) = self.run_report(nodes, None);
        let written = materialize(&p, &self.executor(None).registry, &r, out)?;
        Ok((r, written))
    }
    fn runs(&self, id: &str) -> usize {
        self.runs.lock().unwrap().get(id).copied().unwrap_or(0)
    }
}

fn diamond(b_value: &str) -> Vec<StageNode> {
    vec![node("a", "A", &[]), node("b", b_value, &["a"]), node("c", "C", &["a"]), node("d", "D", &["b", "c"])]
}

fn outcome(v: &[(String, Outcome)], id: &str) -> Outcome {
    v.iter().find(|(i, _)| i == id).unwrap().1.clone()
}

#[test]
fn first_run_executes_every_stage_and_second_is_all_hits() {
    let h = Harness::new();
    let first = h.run(diamond("B"), None);
    assert!(first.iter().all(|(_, o)| *o == Outcome::Ran), "{first:?}");
    let second = h.run(diamond("B"), None);
    assert!(second.iter().all(|(_, o)| *o == Outcome::Hit), "{second:?}");
    assert_eq!(h.runs("a"), 1);
}

#[test]
fn changing_one_param_reruns_that_stage_and_its_dependents_only() {
    let h = Harness::new();
    h.run(diamond("B"), None);
    let r = h.run(diamond("B2"), None);
    assert_eq!(outcome(&r, "a"), Outcome::Hit);
    assert_eq!(outcome(&r, "c"), Outcome::Hit);
    assert_eq!(outcome(&r, "b"), Outcome::Ran);
    assert_eq!(outcome(&r, "d"), Outcome::Ran);
}

#[test]
fn upstream_rerun_with_identical_bytes_does_not_rerun_dependents() {
    let h = Harness::new();
    // b's output is "B"+"A"; a new b whose params differ but whose output is the same bytes:
    // value "" with an input "BA"... simplest: bump a param that does not reach the output.
    let mut nodes = diamond("B");
    h.run(nodes.clone(), None);
    nodes[1].params["unused"] = serde_json::json!(1);
    let r = h.run(nodes, None);
    assert_eq!(outcome(&r, "b"), Outcome::Ran, "b's key changed");
    assert_eq!(outcome(&r, "d"), Outcome::Hit, "b's output bytes did not");
    assert_eq!(h.runs("d"), 1);
}

#[test]
fn failure_names_the_stage_and_keeps_finished_results() {
    let h = Harness::new();
    let r = h.run(diamond("B"), Some("b"));
    assert!(matches!(outcome(&r, "b"), Outcome::Failed(m) if m.contains("boom")));
    assert_eq!(outcome(&r, "d"), Outcome::Skipped);
    let again = h.run(diamond("B"), None);
    assert_eq!(outcome(&again, "a"), Outcome::Hit);
    assert_eq!(outcome(&again, "c"), Outcome::Hit);
    assert_eq!(outcome(&again, "b"), Outcome::Ran);
}

/// The entries of the cache's work root, with the files under each.
fn work_dirs(h: &Harness) -> Vec<Vec<String>> {
    let root = h.dir.path().join("cache/v1/work");
    let mut dirs: Vec<Vec<String>> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| {
            let dir = e.unwrap().path();
            let mut files: Vec<String> = files_under(&dir);
            files.sort();
            files
        })
        .collect();
    dirs.sort();
    dirs
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push(path.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out
}

#[test]
fn a_stage_keeps_its_work_dir_only_while_it_holds_something_to_resume_from() {
    let h = Harness::new();
    let with = |scratch: &str| {
        let mut n = node("t", "T", &[]);
        n.params["scratch"] = serde_json::json!(scratch);
        vec![n]
    };
    // Failed with nothing written (an empty checkpoints directory is nothing): no scratch left.
    let r = h.run(with("checkpoints/"), Some("t"));
    assert!(matches!(outcome(&r, "t"), Outcome::Failed(_)), "{r:?}");
    assert_eq!(work_dirs(&h), Vec::<Vec<String>>::new());
    // Failed after a checkpoint: kept for the next run to resume from.
    let r = h.run(with("checkpoints/checkpoint-3/state"), Some("t"));
    assert!(matches!(outcome(&r, "t"), Outcome::Failed(_)), "{r:?}");
    assert_eq!(work_dirs(&h), vec![vec!["checkpoints/checkpoint-3/state".to_string()]]);
    // The same key finishing: its result is published and its scratch goes with it.
    let r = h.run(with("checkpoints/checkpoint-3/state"), None);
    assert_eq!(outcome(&r, "t"), Outcome::Ran);
    assert_eq!(work_dirs(&h), Vec::<Vec<String>>::new());
    assert_eq!(outcome(&h.run(with("checkpoints/checkpoint-3/state"), None), "t"), Outcome::Hit);
}

#[test]
fn two_concurrent_runs_execute_each_stage_once() {
    let h = Harness::new();
    let p = build(diamond("B")).unwrap();
    let (e1, e2) = (h.executor(None), h.executor(None));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (r1, r2) = rt.block_on(async { tokio::join!(e1.run(&p, None), e2.run(&p, None)) });
    assert!(r1.unwrap().failure().is_none());
    assert!(r2.unwrap().failure().is_none());
    for id in ["a", "b", "c", "d"] {
        assert_eq!(h.runs(id), 1, "stage {id}");
    }
}

#[test]
fn external_input_contents_key_the_stage() {
    let h = Harness::new();
    let f = h.dir.path().join("data.txt");
    std::fs::write(&f, "one").unwrap();
    let mut n = node("a", "A", &[]);
    n.external.push("data.txt".into());
    assert_eq!(outcome(&h.run(vec![n.clone()], None), "a"), Outcome::Ran);
    assert_eq!(outcome(&h.run(vec![n.clone()], None), "a"), Outcome::Hit);
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&f, "two").unwrap();
    assert_eq!(outcome(&h.run(vec![n], None), "a"), Outcome::Ran);
}

#[test]
fn plan_and_why_explain_a_param_change() {
    let h = Harness::new();
    h.run(diamond("B"), None);
    let p = build(diamond("B2")).unwrap();
    let ex = h.executor(None);
    let plan = newt_graph::why::plan(&p, &ex.registry, &ex.cache, Path::new("."), "test").unwrap();
    let b = plan.iter().find(|e| e.id == "b").unwrap();
    assert!(!b.hit);
    assert_eq!(b.reasons, vec!["params: value: \"B\" → \"B2\"".to_string()]);
    let d = plan.iter().find(|e| e.id == "d").unwrap();
    assert!(d.key.is_none() && d.reasons[0].contains("`b`"), "{:?}", d.reasons);
    assert!(plan.iter().find(|e| e.id == "c").unwrap().hit);
}

/// A stage `a` writing `contents` and offering `out.txt` as `a.txt` and its folder as `a_dir`.
fn offering(contents: &str) -> Vec<StageNode> {
    let mut a = node("a", contents, &[]);
    a.params["offer"] = serde_json::json!([["out.txt", "a.txt"], [".", "a_dir"]]);
    vec![a]
}

/// Overwrites one byte of a stored file (same size), read-only modes notwithstanding.
fn flip_byte(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let mut bytes = std::fs::read(path).unwrap();
    bytes[0] ^= 0x20;
    std::fs::write(path, bytes).unwrap();
}

fn object_file(report: &RunReport, id: &str, rel: &str) -> PathBuf {
    report.stages.iter().find(|s| s.id == id).unwrap().path.clone().unwrap().join(rel)
}

#[cfg(unix)]
#[test]
fn planted_symlink_in_output_dir_is_replaced_not_followed() {
    let h = Harness::new();
    let out = h.dir.path().join("output");
    std::fs::create_dir(&out).unwrap();
    let victim = h.dir.path().join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, out.join("a.txt")).unwrap();
    // The fixed temp name the copy used to write through.
    std::os::unix::fs::symlink(&victim, out.join("a.newt-tmp")).unwrap();
    std::os::unix::fs::symlink(&victim, out.join(".newt-outputs.json")).unwrap();

    h.run_and_materialize(offering("A"), &out).unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious", "nothing written through a link");
    assert!(std::fs::symlink_metadata(out.join("a.txt")).unwrap().is_file());
    assert_eq!(std::fs::read_to_string(out.join("a.txt")).unwrap(), "A");
    assert!(std::fs::symlink_metadata(out.join(".newt-outputs.json")).unwrap().is_file());
}

#[cfg(unix)]
#[test]
fn planted_directory_symlink_in_output_dir_is_replaced_not_followed() {
    let h = Harness::new();
    let out = h.dir.path().join("output");
    std::fs::create_dir(&out).unwrap();
    let elsewhere = h.dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, out.join("a_dir")).unwrap();

    h.run_and_materialize(offering("A"), &out).unwrap();
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0, "no file written into the link's target");
    let meta = std::fs::symlink_metadata(out.join("a_dir")).unwrap();
    assert!(meta.is_dir() && !meta.file_type().is_symlink());
    assert_eq!(std::fs::read_to_string(out.join("a_dir/out.txt")).unwrap(), "A");
}

#[cfg(unix)]
#[test]
fn materialized_files_get_normal_creation_modes() {
    use std::os::unix::fs::PermissionsExt;
    let h = Harness::new();
    let out = h.dir.path().join("output");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let (r, _) = h.run_and_materialize(offering("A"), &out).unwrap();
    assert_eq!(mode(&object_file(&r, "a", "out.txt")), 0o444, "the store keeps its copy read-only");
    // What this process gives any new file and folder (0666 / 0777 less the umask).
    std::fs::write(h.dir.path().join("probe"), "").unwrap();
    std::fs::create_dir(h.dir.path().join("probe_dir")).unwrap();
    assert_eq!(mode(&out.join("a.txt")), mode(&h.dir.path().join("probe")));
    assert_eq!(mode(&out.join("a_dir/out.txt")), mode(&h.dir.path().join("probe")));
    assert_eq!(mode(&out.join("a_dir")), mode(&h.dir.path().join("probe_dir")));
}

#[test]
fn flipped_byte_in_cached_object_is_a_miss_not_a_hit() {
    let h = Harness::new();
    let out = h.dir.path().join("output");
    let (first, _) = h.run_and_materialize(offering("adapter weights"), &out).unwrap();
    let stored = object_file(&first, "a", "out.txt");
    flip_byte(&stored);
    assert_eq!(std::fs::metadata(&stored).unwrap().len(), "adapter weights".len() as u64);

    let (second, _) = h.run_and_materialize(offering("adapter weights"), &out).unwrap();
    assert_eq!(second.stages[0].outcome, Outcome::Ran, "a damaged result is run again");
    assert!(second.warnings.iter().any(|w| w.contains("corrupt") && w.contains("out.txt")), "{:?}", second.warnings);
    assert_eq!(h.runs("a"), 2);
    assert_eq!(std::fs::read_to_string(&stored).unwrap(), "adapter weights", "the store holds good bytes again");
    assert_eq!(std::fs::read_to_string(out.join("a.txt")).unwrap(), "adapter weights");
}

#[test]
fn materialize_refuses_an_object_damaged_after_the_lookup() {
    let h = Harness::new();
    let out = h.dir.path().join("output");
    std::fs::create_dir(&out).unwrap();
    let (p, r) = h.run_report(offering("adapter weights"), None);
    flip_byte(&object_file(&r, "a", "out.txt"));
    let err = materialize(&p, &h.executor(None).registry, &r, &out).unwrap_err().to_string();
    assert!(err.contains("corrupt") && err.contains("newt cache verify --repair"), "{err}");
    assert!(!out.join("a.txt").exists(), "damaged bytes never reach output_dir");
}

#[test]
fn an_executor_that_runs_only_some_stages_uses_the_cache_for_the_rest_and_never_runs_them() {
    let h = Harness::new();
    let run_only = |nodes: Vec<StageNode>, only: &[&str]| {
        let p = build(nodes).unwrap();
        let mut ex = h.executor(None);
        ex.runs_only = Some(only.iter().map(|s| s.to_string()).collect());
        let rt = tokio::runtime::Runtime::new().unwrap();
        let r = rt.block_on(ex.run(&p, None)).unwrap();
        r.stages.into_iter().map(|s| (s.id, s.outcome)).collect::<Vec<_>>()
    };
    // An empty cache: `a` may not run, so it fails naming what is missing, and nothing below it runs.
    let r = run_only(diamond("B"), &["b"]);
    assert!(matches!(outcome(&r, "a"), Outcome::Failed(m) if m.contains("may not run")), "{r:?}");
    assert!(r.iter().filter(|(id, _)| id != "a").all(|(_, o)| *o == Outcome::Skipped), "{r:?}");
    assert_eq!(h.runs("a") + h.runs("b"), 0);
    // With `a` and `c` in the cache, a run allowed only `b` and `d` runs exactly those.
    h.run(vec![node("a", "A", &[]), node("c", "C", &["a"])], None);
    let r: BTreeMap<String, Outcome> = run_only(diamond("B"), &["b", "d"]).into_iter().collect();
    assert_eq!(
        r,
        BTreeMap::from([
            ("a".into(), Outcome::Hit),
            ("b".into(), Outcome::Ran),
            ("c".into(), Outcome::Hit),
            ("d".into(), Outcome::Ran)
        ])
    );
    assert_eq!((h.runs("a"), h.runs("b"), h.runs("c"), h.runs("d")), (1, 1, 1, 1));
    // Lookup only (nothing may run): everything is found now.
    let r = run_only(diamond("B"), &[]);
    assert!(r.iter().all(|(_, o)| *o == Outcome::Hit), "{r:?}");
}
