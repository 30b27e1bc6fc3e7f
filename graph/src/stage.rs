//! The `Stage` trait that built-in and user stages implement, and the registry of kinds.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use crate::compile::StageNode;

/// A cooperative cancellation flag shared by the executor and the running stages, with the
/// signal that set it (if one did), so the caller can exit with 128 + its number.
#[derive(Debug, Clone, Default)]
pub struct CancelToken {
    flag: Arc<AtomicBool>,
    signal: Arc<AtomicI32>,
}

impl CancelToken {
    /// A fresh, un-cancelled token.
    pub fn new() -> Self {
        Self::default()
    }
    /// Asks every holder to stop at its next check.
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst)
    }
    /// Cancels because the process received signal `signo` (2 for SIGINT, 15 for SIGTERM);
    /// the first signal is the one remembered.
    pub fn cancel_by_signal(&self, signo: i32) {
        let _ = self.signal.compare_exchange(0, signo, Ordering::SeqCst, Ordering::SeqCst);
        self.cancel();
    }
    /// The signal that cancelled the run, if one did.
    pub fn signal(&self) -> Option<i32> {
        Some(self.signal.load(Ordering::SeqCst)).filter(|&s| s != 0)
    }
    /// Whether cancellation was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
    /// The shared flag, for libraries that take a plain `Arc<AtomicBool>`.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }
}

/// Where a running stage reports how far it got (the CLI draws it as a progress bar).
pub trait Progress: Send + Sync {
    /// Sets the amount of work (rows, steps, tensors) when known.
    fn set_total(&self, total: u64);
    /// Sets the amount done so far.
    fn set_position(&self, pos: u64);
    /// A short status line: `loss 1.23  lr 2e-4  31.2k tok/s`.
    fn set_message(&self, msg: String);
    /// A line worth keeping in the log above the bars (a warning, a summary).
    fn println(&self, line: String);
    /// A periodic status line (`logging_steps`) for logs that are not a terminal, where no
    /// bar is drawn; a bar already shows it on a terminal, so the default drops it.
    fn log(&self, _line: String) {}
}

/// A progress sink that drops everything (tests, `--quiet`).
pub struct NoProgress;

impl Progress for NoProgress {
    fn set_total(&self, _: u64) {}
    fn set_position(&self, _: u64) {}
    fn set_message(&self, _: String) {}
    fn println(&self, _: String) {}
}

/// Everything a stage may read while it runs. It writes only into `out_dir` (and `work_dir`).
pub struct StageContext<'a> {
    /// The node being run: id, kind, params, inputs.
    pub node: &'a StageNode,
    /// Output directory of each upstream stage, by stage id (read-only artifacts).
    pub inputs: BTreeMap<String, PathBuf>,
    /// A fresh, empty directory: everything the stage produces goes here.
    pub out_dir: PathBuf,
    /// A directory that survives failed runs of the same key (training checkpoints live here).
    pub work_dir: PathBuf,
    /// The folder relative paths in the pipeline are resolved against.
    pub base_dir: PathBuf,
    /// The external files whose contents entered the key, resolved.
    pub external: Vec<PathBuf>,
    /// The remote inputs that entered the key ([`Stage::remote_inputs`]).
    pub remote: BTreeMap<String, String>,
    /// The cache root (for kernel caches and the like; never for artifacts).
    pub cache_root: PathBuf,
    /// Progress for this stage.
    pub progress: Arc<dyn Progress>,
    /// Set when the run is cancelled (Ctrl-C, or a failure elsewhere).
    pub cancel: CancelToken,
}

impl StageContext<'_> {
    /// The output directory of the single upstream stage with this id.
    pub fn input(&self, id: &str) -> anyhow::Result<&Path> {
        self.inputs
            .get(id)
            .map(PathBuf::as_path)
            .ok_or_else(|| anyhow::anyhow!("stage `{}` has no input `{id}`", self.node.id))
    }
    /// Fails with a cancellation error when the run was cancelled.
    pub fn check_cancelled(&self) -> anyhow::Result<()> {
        if self.cancel.is_cancelled() {
            anyhow::bail!("cancelled");
        }
        Ok(())
    }
}

/// A kind of stage: how its key is formed and how it runs.
///
/// The executor computes the key from the node's params (the kind's typed params, serialized
/// by whoever built the node), `version()`, the upstream output digests,
/// the contents of `external_inputs`, `environment` and `remote_inputs`. A stage must not read anything else that
/// changes its output.
pub trait Stage: Send + Sync {
    /// The kind name used in the graph (`fetch_dataset`, `tokenize`, `train`, ...).
    fn kind(&self) -> &'static str;
    /// Bumped whenever the stage's code changes what it writes.
    fn version(&self) -> u32;
    /// Files whose contents key the stage. Default: the node's declared `external` paths.
    fn external_inputs(&self, node: &StageNode, base_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
        Ok(node.external.iter().map(|p| base_dir.join(p)).collect())
    }
    /// Environment that changes the output (backend, dtype, GPU arch).
    fn environment(&self, _node: &StageNode) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
    /// Inputs that live elsewhere, resolved to immutable identities (a Hub id and revision →
    /// `models/org/name@<commit>`): they enter the key as they are, and `run` reads them from
    /// [`StageContext::remote`] so it fetches exactly what was keyed. May use the network.
    fn remote_inputs(&self, _node: &StageNode, _base_dir: &Path) -> anyhow::Result<BTreeMap<String, String>> {
        Ok(BTreeMap::new())
    }
    /// Files that must exist in the output for it to count as a result.
    fn required_outputs(&self, _node: &StageNode) -> Vec<String> {
        Vec::new()
    }
    /// Whether the stage holds the GPU while it runs (GPU stages run one at a time).
    fn uses_device(&self, _node: &StageNode) -> bool {
        false
    }
    /// Output files copied into `output_dir` after a run: (path in the artifact, path under output_dir).
    fn materialize(&self, _node: &StageNode) -> Vec<(String, String)> {
        Vec::new()
    }
    /// Does the work. Returns a summary stored in the manifest (counts, efficiency, metrics).
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<serde_json::Value>;
}

/// Maps kind names to stage implementations.
#[derive(Default, Clone)]
pub struct Registry {
    kinds: HashMap<String, Arc<dyn Stage>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds (or replaces) a kind.
    pub fn register(&mut self, stage: Arc<dyn Stage>) {
        self.kinds.insert(stage.kind().to_string(), stage);
    }
    /// The stage of a kind.
    pub fn get(&self, kind: &str) -> Option<Arc<dyn Stage>> {
        self.kinds.get(kind).cloned()
    }
    /// All registered kind names, sorted.
    pub fn kinds(&self) -> Vec<String> {
        let mut v: Vec<_> = self.kinds.keys().cloned().collect();
        v.sort();
        v
    }
}
