//! Runs a compiled pipeline: keys, cache lookups, locks, concurrent stages, publishing.
//!
//! [`Executor`] is the interface; [`LocalExecutor`] runs stages in this process on tokio, with
//! an optional shared remote cache ([`newt_cache::Remote`]) consulted after a local miss. A
//! dataflow executor (stages as dora-rs nodes on several machines, the cache on shared
//! storage) implements the same trait: it needs only the pipeline, the registry and a cache
//! that every machine sees.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use newt_cache::{
    Cache, CacheError, Damage, Digest, FileEntry, ManifestMeta, Pulled, Pushed, Remote, RemoteMode, RunRecord, RunStage,
};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::compile::{Pipeline, StageNode};
use crate::key::KeyInputs;
use crate::stage::{CancelToken, Progress, Registry, Stage, StageContext};

/// How a stage ended.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Found in the cache.
    Hit,
    /// Found in the remote cache, downloaded and verified.
    Pulled,
    /// Ran and was published.
    Ran,
    /// Failed; the message says why.
    Failed(String),
    /// Not run: an upstream stage failed or the run was cancelled.
    Skipped,
}

/// One line of the end-of-run table.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    /// Stage id.
    pub id: String,
    /// Stage kind.
    pub kind: String,
    /// Hit, ran, failed or skipped.
    pub outcome: Outcome,
    /// Wall time in this run.
    pub seconds: f64,
    /// The stage key.
    pub key: Option<Digest>,
    /// The output digest.
    pub output: Option<Digest>,
    /// The artifact directory.
    pub path: Option<PathBuf>,
    /// The summary stored with the result.
    pub summary: serde_json::Value,
    /// The result's files with their digests (from its manifest): what [`materialize`] checks
    /// its copies against. Empty for a stage that failed or was skipped.
    #[serde(skip)]
    pub files: Vec<FileEntry>,
    /// What the remote cache did with this result (pulled, uploaded, kept another writer's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// One entry per stage, in topological order.
    pub stages: Vec<StageReport>,
    /// Warnings met on the way (corrupt manifests, ...).
    pub warnings: Vec<String>,
    /// Files copied into output_dir.
    pub materialized: Vec<PathBuf>,
    /// The signal that stopped the run (2 for Ctrl-C, 15 for SIGTERM), if one did.
    pub signal: Option<i32>,
}

impl RunReport {
    /// The first failure, if any.
    pub fn failure(&self) -> Option<&StageReport> {
        self.stages.iter().find(|s| matches!(s.outcome, Outcome::Failed(_)))
    }
}

/// Receives what happens during a run (the CLI turns it into progress bars and a log).
pub trait Reporter: Send + Sync {
    /// A stage started running (not called for cache hits).
    fn started(&self, id: &str, kind: &str) -> Arc<dyn Progress>;
    /// A stage finished, one way or another.
    fn finished(&self, report: &StageReport);
    /// A warning to show.
    fn warn(&self, message: &str);
}

/// A reporter that ignores everything.
pub struct SilentReporter;

impl Reporter for SilentReporter {
    fn started(&self, _: &str, _: &str) -> Arc<dyn Progress> {
        Arc::new(crate::stage::NoProgress)
    }
    fn finished(&self, _: &StageReport) {}
    fn warn(&self, _: &str) {}
}

/// Runs pipelines.
pub trait Executor {
    /// Runs every stage (or only `targets` and their upstream stages when given).
    fn run(
        &self,
        pipeline: &Pipeline,
        targets: Option<&[String]>,
    ) -> impl std::future::Future<Output = anyhow::Result<RunReport>> + Send;
}

/// The in-process executor.
pub struct LocalExecutor {
    /// The artifact store.
    pub cache: Arc<Cache>,
    /// Stage kinds.
    pub registry: Arc<Registry>,
    /// Progress sink.
    pub reporter: Arc<dyn Reporter>,
    /// Cancellation (Ctrl-C).
    pub cancel: CancelToken,
    /// Folder of the pipeline file (relative paths).
    pub base_dir: PathBuf,
    /// Identity of the pipeline (for run records and `newt why`).
    pub pipeline_id: String,
    /// Path of the pipeline file, recorded for `cache ls`.
    pub pipeline_path: String,
    /// How many stages may run at once.
    pub max_parallel: usize,
    /// The shared remote cache: looked up after a local miss, and (read-write) given every
    /// result this run publishes.
    pub remote: Option<Arc<Remote>>,
    /// The stages this executor may run (`None`: all). Any other wanted stage must be found in
    /// the cache (local or remote), or it fails without running: how a dora node runs its one
    /// stage over results other nodes produced, and how the dora driver reads them back.
    pub runs_only: Option<HashSet<String>>,
}

/// The key inputs of a node given its upstream output digests.
pub fn key_inputs(
    stage: &dyn Stage,
    node: &StageNode,
    upstream: &BTreeMap<String, Digest>,
    cache: &Cache,
    base_dir: &Path,
) -> anyhow::Result<(KeyInputs, Vec<PathBuf>)> {
    let external = stage.external_inputs(node, base_dir)?;
    let mut ext = BTreeMap::new();
    for p in &external {
        let d =
            cache.hash_external(p).map_err(|e| anyhow::anyhow!("stage `{}`: input {}: {e}", node.id, p.display()))?;
        let shown = p.strip_prefix(base_dir).unwrap_or(p).display().to_string();
        ext.insert(shown, d.to_string());
    }
    let mut code = BTreeMap::new();
    code.insert("kind".to_string(), node.kind.clone());
    code.insert("stage_version".to_string(), stage.version().to_string());
    code.insert("newt".to_string(), env!("CARGO_PKG_VERSION").to_string());
    let remote = stage
        .remote_inputs(node, base_dir)
        .map_err(|e| anyhow::anyhow!("stage `{}`: {}", node.id, crate::error_chain(&e)))?;
    let inputs = KeyInputs {
        code,
        params: node.params.clone(),
        upstream: upstream.iter().map(|(k, v)| (k.clone(), v.to_string())).collect(),
        external: ext,
        env: stage.environment(node),
        remote,
    };
    Ok((inputs, external))
}

/// The per-key work directory (checkpoints of long stages), kept across failed runs.
pub fn work_dir(cache: &Cache, key: &Digest) -> PathBuf {
    cache.root().join("v1").join("work").join(key.to_string())
}

struct Done {
    id: String,
    report: StageReport,
    warnings: Vec<String>,
}

impl LocalExecutor {
    /// The stages a run of `targets` (all when `None`) needs: the targets and everything upstream.
    pub fn wanted(pipeline: &Pipeline, targets: Option<&[String]>) -> anyhow::Result<HashSet<String>> {
        let Some(targets) = targets else { return Ok(pipeline.order.iter().cloned().collect()) };
        let mut want = HashSet::new();
        let mut stack: Vec<String> = Vec::new();
        for t in targets {
            if pipeline.node(t).is_none() {
                anyhow::bail!("no stage `{t}` in this pipeline (stages: {})", pipeline.order.join(", "));
            }
            stack.push(t.clone());
        }
        while let Some(id) = stack.pop() {
            if want.insert(id.clone()) {
                stack.extend(pipeline.node(&id).expect("known").inputs.iter().cloned());
            }
        }
        Ok(want)
    }
}

impl Executor for LocalExecutor {
    async fn run(&self, pipeline: &Pipeline, targets: Option<&[String]>) -> anyhow::Result<RunReport> {
        let want = Self::wanted(pipeline, targets)?;
        // Keeps `newt cache gc` in another process from collecting what this run is using.
        let _in_use = self.cache.in_use()?;
        let device = Arc::new(Semaphore::new(1));
        let slots = Arc::new(Semaphore::new(self.max_parallel.max(1)));
        let mut outputs: HashMap<String, (Digest, Digest, PathBuf)> = HashMap::new();
        let mut reports: HashMap<String, StageReport> = HashMap::new();
        let mut warnings = Vec::new();
        let remote = match &self.remote {
            Some(r) => match r.check().await {
                Ok(()) => Some(r.clone()),
                Err(e) => {
                    warnings.push(format!("the remote cache is not used in this run: {e}"));
                    None
                }
            },
            None => None,
        };
        let mut started: HashSet<String> = HashSet::new();
        let mut failed = false;
        let mut set: JoinSet<Done> = JoinSet::new();
        loop {
            // Launch every ready stage.
            if !failed && !self.cancel.is_cancelled() {
                for id in &pipeline.order {
                    if !want.contains(id) || started.contains(id) {
                        continue;
                    }
                    let node = pipeline.node(id).expect("known").clone();
                    if !node.inputs.iter().all(|i| outputs.contains_key(i)) {
                        continue;
                    }
                    started.insert(id.clone());
                    let stage = self.registry.get(&node.kind).ok_or_else(|| {
                        anyhow::anyhow!(
                            "stage `{}` has kind `{}`, which no registered stage implements (kinds: {})",
                            node.id,
                            node.kind,
                            self.registry.kinds().join(", ")
                        )
                    })?;
                    let upstream: BTreeMap<String, Digest> =
                        node.inputs.iter().map(|i| (i.clone(), outputs[i].1)).collect();
                    let input_dirs: BTreeMap<String, PathBuf> =
                        node.inputs.iter().map(|i| (i.clone(), outputs[i].2.clone())).collect();
                    let task = StageTask {
                        may_run: self.runs_only.as_ref().is_none_or(|r| r.contains(id)),
                        cache: self.cache.clone(),
                        reporter: self.reporter.clone(),
                        cancel: self.cancel.clone(),
                        base_dir: self.base_dir.clone(),
                        device: device.clone(),
                        slots: slots.clone(),
                        remote: remote.clone(),
                    };
                    set.spawn(async move { task.run(stage, node, upstream, input_dirs).await });
                }
            }
            let Some(done) = set.join_next().await else { break };
            let done = done.map_err(|e| anyhow::anyhow!("a stage task panicked: {e}"))?;
            warnings.extend(done.warnings);
            match (&done.report.outcome, done.report.key, done.report.output, done.report.path.clone()) {
                (Outcome::Hit | Outcome::Pulled | Outcome::Ran, Some(k), Some(o), Some(p)) => {
                    outputs.insert(done.id.clone(), (k, o, p));
                }
                _ => failed = true,
            }
            self.reporter.finished(&done.report);
            reports.insert(done.id, done.report);
        }
        let stages: Vec<StageReport> = pipeline
            .order
            .iter()
            .filter(|id| want.contains(*id))
            .map(|id| {
                reports.remove(id).unwrap_or_else(|| StageReport {
                    id: id.clone(),
                    kind: pipeline.node(id).expect("known").kind.clone(),
                    outcome: Outcome::Skipped,
                    seconds: 0.0,
                    key: None,
                    output: None,
                    path: None,
                    summary: serde_json::Value::Null,
                    files: Vec::new(),
                    remote: None,
                })
            })
            .collect();
        // Record what this run used: gc roots, and the baseline of `newt why`.
        let mut record = self.cache.last_run(&self.pipeline_id).ok().flatten().unwrap_or(RunRecord {
            pipeline_path: self.pipeline_path.clone(),
            stages: BTreeMap::new(),
            finished_unix: 0,
        });
        for s in &stages {
            if let (Some(key), Some(output)) = (s.key, s.output) {
                record.stages.insert(s.id.clone(), RunStage { key, output });
            }
        }
        record.pipeline_path = self.pipeline_path.clone();
        record.finished_unix =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        self.cache.record_run(&self.pipeline_id, &record)?;
        Ok(RunReport { stages, warnings, materialized: Vec::new(), signal: self.cancel.signal() })
    }
}

struct StageTask {
    may_run: bool,
    cache: Arc<Cache>,
    reporter: Arc<dyn Reporter>,
    cancel: CancelToken,
    base_dir: PathBuf,
    device: Arc<Semaphore>,
    slots: Arc<Semaphore>,
    remote: Option<Arc<Remote>>,
}

impl StageTask {
    async fn run(
        self,
        stage: Arc<dyn Stage>,
        node: StageNode,
        upstream: BTreeMap<String, Digest>,
        inputs: BTreeMap<String, PathBuf>,
    ) -> Done {
        let t0 = Instant::now();
        let id = node.id.clone();
        let kind = node.kind.clone();
        let fail = |msg: String, key: Option<Digest>, warnings: Vec<String>| Done {
            id: id.clone(),
            report: StageReport {
                id: id.clone(),
                kind: kind.clone(),
                outcome: Outcome::Failed(msg),
                seconds: t0.elapsed().as_secs_f64(),
                key,
                output: None,
                path: None,
                summary: serde_json::Value::Null,
                files: Vec::new(),
                remote: None,
            },
            warnings,
        };
        let _slot = self.slots.clone().acquire_owned().await.expect("semaphore open");
        let cache = self.cache.clone();
        let base_dir = self.base_dir.clone();
        let (stage2, node2) = (stage.clone(), node.clone());
        let keyed =
            tokio::task::spawn_blocking(move || key_inputs(stage2.as_ref(), &node2, &upstream, &cache, &base_dir))
                .await;
        let (inputs_k, external) = match keyed {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => return fail(crate::error_chain(&e), None, Vec::new()),
            Err(e) => return fail(format!("panicked while hashing inputs: {e}"), None, Vec::new()),
        };
        let key = inputs_k.key();
        let mut warnings = Vec::new();
        let hit = |m: &newt_cache::Manifest, cache: &Cache| Done {
            id: id.clone(),
            report: StageReport {
                id: id.clone(),
                kind: kind.clone(),
                outcome: Outcome::Hit,
                seconds: t0.elapsed().as_secs_f64(),
                key: Some(key),
                output: Some(m.output),
                path: Some(cache.object_path(&m.output)),
                summary: m.summary.clone(),
                files: m.files.clone(),
                remote: None,
            },
            warnings: Vec::new(),
        };
        match self.cache.lookup(&key) {
            Ok(l) => {
                warnings.extend(l.warnings.iter().map(|w| format!("{id}: {w}")));
                if let Some(m) = l.manifest {
                    let mut d = hit(&m, &self.cache);
                    d.warnings = warnings;
                    return d;
                }
            }
            Err(e) => return fail(format!("cache lookup: {e}"), Some(key), warnings),
        }
        // Another process may be running this very key: wait for its lock, then look again.
        let cache = self.cache.clone();
        let lock = match tokio::task::spawn_blocking(move || cache.lock_key(&key)).await {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => return fail(format!("locking the cache key: {e}"), Some(key), warnings),
            Err(e) => return fail(format!("{e}"), Some(key), warnings),
        };
        if let Ok(l) = self.cache.lookup(&key)
            && let Some(m) = l.manifest
        {
            let mut d = hit(&m, &self.cache);
            d.warnings = warnings;
            return d;
        }
        // Then the remote cache. A result it has but that fails a check is never used: the
        // stage runs, and (read-write) its result mends the remote's files.
        let mut mend_remote = false;
        if let Some(remote) = &self.remote {
            match remote.pull(&self.cache, &key).await {
                Ok(Pulled::Hit(m)) => {
                    let mut d = hit(&m, &self.cache);
                    d.report.outcome = Outcome::Pulled;
                    d.report.seconds = t0.elapsed().as_secs_f64();
                    d.report.remote = Some(format!("pulled from {}", remote.url()));
                    d.warnings = warnings;
                    return d;
                }
                Ok(Pulled::Miss) => {}
                Ok(Pulled::Rejected(why)) => {
                    warnings.push(format!("{id}: not using the result in {}: {why}; the stage runs", remote.url()));
                    mend_remote = true;
                }
                Err(e) => warnings.push(format!("{id}: remote cache lookup failed ({e}); the stage runs")),
            }
        }
        if !self.may_run {
            let where_ = match &self.remote {
                Some(r) => format!("the local cache or {}", r.url()),
                None => "the local cache".to_string(),
            };
            return fail(
                format!("no result for key {} in {where_}, and this run may not run the stage", key.short()),
                Some(key),
                warnings,
            );
        }
        let _device = if stage.uses_device(&node) {
            Some(self.device.clone().acquire_owned().await.expect("semaphore open"))
        } else {
            None
        };
        let progress = self.reporter.started(&id, &kind);
        let staging = match self.cache.staging(&key) {
            Ok(s) => s,
            Err(e) => return fail(format!("staging dir: {e}"), Some(key), warnings),
        };
        let work = work_dir(&self.cache, &key);
        let cache = self.cache.clone();
        let base_dir = self.base_dir.clone();
        let cancel = self.cancel.clone();
        let ki = inputs_k.clone();
        let remote = inputs_k.remote.clone();
        let result = tokio::task::spawn_blocking(move || {
            let ran = (|| {
                std::fs::create_dir_all(&work)?;
                let ctx = StageContext {
                    node: &node,
                    inputs,
                    out_dir: staging.out_dir().to_path_buf(),
                    work_dir: work.clone(),
                    base_dir,
                    external,
                    remote,
                    cache_root: cache.root().to_path_buf(),
                    progress,
                    cancel,
                };
                let summary = stage.run(&ctx)?;
                ctx.check_cancelled()?;
                let required = stage.required_outputs(&node);
                let required: Vec<&str> = required.iter().map(String::as_str).collect();
                let meta = ManifestMeta {
                    stage_id: node.id.clone(),
                    kind: node.kind.clone(),
                    key,
                    key_inputs: serde_json::to_value(&ki)?,
                    summary,
                    elapsed_ms: t0.elapsed().as_millis() as u64,
                };
                let manifest = cache.publish(staging, meta, &required)?;
                anyhow::Ok(manifest)
            })();
            // Still under the key's lock: a published key's scratch goes now (gc would take it
            // later), a failed run's stays only if the stage left something in it to resume from.
            // Neither can fail the stage: gc removes what is left.
            let _ = match &ran {
                Ok(_) => cache.remove_work_dir(&key),
                Err(_) => cache.remove_work_dir_if_empty(&key),
            };
            drop(lock);
            ran
        })
        .await;
        match result {
            Ok(Ok(m)) => {
                let mut remote_note = None;
                if let Some(remote) = self.remote.as_ref().filter(|r| r.mode() == RemoteMode::ReadWrite) {
                    match remote.push(&self.cache, &key, mend_remote).await {
                        Ok(Pushed::Uploaded { files, bytes }) => {
                            remote_note = Some(format!(
                                "uploaded {files} file{} ({bytes} bytes) to {}",
                                if files == 1 { "" } else { "s" },
                                remote.url()
                            ));
                        }
                        Ok(Pushed::AlreadyThere) => remote_note = Some(format!("already in {}", remote.url())),
                        Ok(Pushed::LocalOnly) => {
                            remote_note = Some("not uploaded: it names files of this machine".to_string())
                        }
                        Ok(Pushed::KeptOther { output }) => {
                            remote_note =
                                Some(format!("{} keeps another writer's result {}", remote.url(), output.short()));
                        }
                        Err(e) => warnings.push(format!("{id}: uploading to the remote cache failed: {e}")),
                    }
                }
                Done {
                    id: id.clone(),
                    report: StageReport {
                        id: id.clone(),
                        kind: kind.clone(),
                        outcome: Outcome::Ran,
                        seconds: t0.elapsed().as_secs_f64(),
                        key: Some(key),
                        output: Some(m.output),
                        path: Some(self.cache.object_path(&m.output)),
                        summary: m.summary,
                        files: m.files,
                        remote: remote_note,
                    },
                    warnings,
                }
            }
            Ok(Err(e)) => fail(crate::error_chain(&e), Some(key), warnings),
            Err(e) => {
                let msg = e.try_into_panic().ok().and_then(|p| {
                    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                });
                fail(format!("panicked: {}", msg.unwrap_or_else(|| "unknown panic".into())), Some(key), warnings)
            }
        }
    }
}

/// Copies the files stages offer (adapter, merged model, metrics) into `output_dir`.
///
/// `output_dir/.newt-outputs.json` records which artifact digest each destination was copied
/// from, so a rerun whose results did not change copies nothing (a merged 8B model is 16 GB).
///
/// Every file goes through [`newt_cache::export_file`]: its bytes are checked against the
/// digest in its manifest while they are copied (a damaged cached result is an error, never a
/// file in `output_dir`), and it is written to a fresh temp file renamed over the destination,
/// so a link planted in `output_dir` (at a file, a directory such as `merged`, or the record) is
/// replaced, never followed. New files and directories get ordinary modes (0666 / 0777 less the
/// umask), not the store's read-only ones. `output_dir` itself may be a link: the user names it.
pub fn materialize(
    pipeline: &Pipeline,
    registry: &Registry,
    report: &RunReport,
    output_dir: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    let record_path = output_dir.join(".newt-outputs.json");
    let mut record: BTreeMap<String, String> =
        std::fs::read_to_string(&record_path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    let mut written = Vec::new();
    for s in &report.stages {
        let (Some(path), Some(output), Some(node)) = (&s.path, s.output, pipeline.node(&s.id)) else { continue };
        let Some(stage) = registry.get(&node.kind) else { continue };
        let files: BTreeMap<&str, &FileEntry> = s.files.iter().map(|f| (f.path.as_str(), f)).collect();
        for (src, dst) in stage.materialize(node) {
            let from = path.join(&src);
            if std::fs::symlink_metadata(&from).is_err() {
                continue;
            }
            let to = output_dir.join(&dst);
            let stamp = format!("{output}/{src}");
            // A link at the destination is never what newt wrote there.
            let ours = std::fs::symlink_metadata(&to).is_ok_and(|m| !m.file_type().is_symlink());
            if ours && record.get(&dst) == Some(&stamp) {
                continue;
            }
            std::fs::create_dir_all(output_dir)
                .map_err(|e| anyhow::anyhow!("output_dir {}: cannot create it: {e}", output_dir.display()))?;
            let mut parent = output_dir.to_path_buf();
            for part in Path::new(&dst).parent().into_iter().flat_map(Path::components) {
                parent.push(part);
                newt_cache::export_dir(&parent)?;
            }
            copy_tree(&from, &to, path, &files)?;
            record.insert(dst, stamp);
            written.push(to);
        }
    }
    if !written.is_empty() {
        newt_cache::export_bytes(&record_path, (serde_json::to_string_pretty(&record)? + "\n").as_bytes())?;
    }
    Ok(written)
}

/// Copies `from` (a file or folder inside the object `root`) to `to`, each file checked against
/// its entry in `files`.
fn copy_tree(from: &Path, to: &Path, root: &Path, files: &BTreeMap<&str, &FileEntry>) -> anyhow::Result<()> {
    if std::fs::symlink_metadata(from)?.is_dir() {
        newt_cache::export_dir(to)?;
        let mut entries = std::fs::read_dir(from)?.collect::<Result<Vec<_>, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            copy_tree(&e.path(), &to.join(e.file_name()), root, files)?;
        }
        return Ok(());
    }
    let rel = from.strip_prefix(root).unwrap_or(from).components().filter_map(|c| match c {
        std::path::Component::Normal(name) => Some(name.to_string_lossy()),
        _ => None,
    });
    let rel = rel.collect::<Vec<_>>().join("/");
    let Some(expected) = files.get(rel.as_str()) else {
        // Not in the manifest: planted in the store after publishing.
        return Err(CacheError::Damaged { damage: Damage::Unexpected { path: from.to_path_buf() } }.into());
    };
    newt_cache::export_file(from, expected, to)?;
    Ok(())
}
