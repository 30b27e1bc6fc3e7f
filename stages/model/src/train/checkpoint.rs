//! Training checkpoints: written into a temp dir and renamed into place, so a directory named
//! `checkpoint-<step>` is always complete; the newest `keep` are kept.
//!
//! ```text
//! <checkpoint_dir>/checkpoint-<step>/
//!   trainable.safetensors   f32 trainable parameters, by module path
//!   optimizer.safetensors   "<path>.exp_avg", "<path>.exp_avg_sq" (f32)
//!   metrics.jsonl           the metrics records up to this step
//!   state.json              step, data position, seed, plan, per-param optimizer steps (last)
//! ```

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use super::TrainError;
use super::adamw::MomentsHost;
use super::config::TrainPlan;
use super::metrics::MetricsRecord;
use super::params::HostTensor;

/// Version of the on-disk layout.
pub const CHECKPOINT_FORMAT: u32 = 1;
const PREFIX: &str = "checkpoint-";
const TMP_PREFIX: &str = ".tmp-checkpoint-";

/// Where training stands after `step` optimizer steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Layout version ([`CHECKPOINT_FORMAT`]).
    pub format: u32,
    /// Optimizer steps done; the schedule resumes at this step.
    pub step: usize,
    /// Epoch of the next micro-batch.
    pub epoch: usize,
    /// Index of the next micro-batch within that epoch.
    pub micro_batch: usize,
    /// Run seed. The RNG is not saved because it is a pure function of it: epoch order =
    /// f(seed, epoch), backend RNG reseeded per step with f(seed, step).
    pub seed: u64,
    /// Rows in the training data when the checkpoint was written.
    pub rows: usize,
    /// The step plan, compared on resume.
    pub plan: TrainPlan,
    /// Training loss of the last step (for display).
    pub last_loss: Option<f64>,
}

/// A checkpoint read back from disk.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Its directory.
    pub dir: PathBuf,
    /// Position and plan.
    pub state: CheckpointState,
    /// Trainable parameter values by path.
    pub params: BTreeMap<String, HostTensor>,
    /// Optimizer moments by path.
    pub optimizer: BTreeMap<String, MomentsHost>,
    /// Metrics logged up to this checkpoint.
    pub metrics: Vec<MetricsRecord>,
}

/// Writes a checkpoint atomically, then prunes all but the newest `keep` (at least 1).
pub fn save(
    checkpoint_dir: &Path,
    state: &CheckpointState,
    params: &BTreeMap<String, HostTensor>,
    optimizer: &BTreeMap<String, MomentsHost>,
    metrics: &[MetricsRecord],
    keep: usize,
) -> Result<PathBuf, TrainError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| TrainError::io(&p, e)
    };
    fs::create_dir_all(checkpoint_dir).map_err(io(checkpoint_dir))?;
    let tmp = checkpoint_dir.join(format!("{TMP_PREFIX}{}-{}", state.step, std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(io(&tmp))?;

    write_safetensors(
        &tmp.join("trainable.safetensors"),
        params.iter().map(|(k, t)| (k.clone(), t.shape.clone(), &t.values[..])),
    )?;
    let mut moments = Vec::new();
    let mut steps = BTreeMap::new();
    for (k, m) in optimizer {
        let n = m.exp_avg.len();
        moments.push((format!("{k}.exp_avg"), vec![n], &m.exp_avg[..]));
        moments.push((format!("{k}.exp_avg_sq"), vec![n], &m.exp_avg_sq[..]));
        steps.insert(k.clone(), m.step.to_string());
    }
    write_safetensors_meta(&tmp.join("optimizer.safetensors"), moments, Some(steps))?;

    let mut lines = String::new();
    for r in metrics {
        lines.push_str(&serde_json::to_string(r).map_err(|e| TrainError::Checkpoint(e.to_string()))?);
        lines.push('\n');
    }
    write_synced(&tmp.join("metrics.jsonl"), lines.as_bytes())?;

    // state.json last: its presence marks the temp dir as complete before the rename.
    let state_path = tmp.join("state.json");
    let json = serde_json::to_vec_pretty(state).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
    write_synced(&state_path, &json)?;
    sync_dir(&tmp)?;

    let final_dir = checkpoint_dir.join(format!("{PREFIX}{}", state.step));
    if final_dir.exists() {
        fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
    }
    fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
    sync_dir(checkpoint_dir)?;

    let mut all = list(checkpoint_dir)?;
    all.sort_by_key(|(step, _)| *step);
    let keep = keep.max(1);
    if all.len() > keep {
        for (_, dir) in &all[..all.len() - keep] {
            fs::remove_dir_all(dir).map_err(io(dir))?;
        }
    }
    Ok(final_dir)
}

/// Complete checkpoints in `checkpoint_dir` as (step, dir); leftover temp dirs are removed.
pub fn list(checkpoint_dir: &Path) -> Result<Vec<(usize, PathBuf)>, TrainError> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(checkpoint_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(TrainError::io(checkpoint_dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| TrainError::io(checkpoint_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with(TMP_PREFIX) {
            // A writer killed mid-checkpoint; nothing in it can be trusted.
            fs::remove_dir_all(&path).map_err(|e| TrainError::io(&path, e))?;
            continue;
        }
        if let Some(step) = name.strip_prefix(PREFIX).and_then(|s| s.parse::<usize>().ok())
            && path.join("state.json").is_file()
        {
            out.push((step, path));
        }
    }
    Ok(out)
}

/// The newest complete checkpoint, if any.
pub fn latest(checkpoint_dir: &Path) -> Result<Option<PathBuf>, TrainError> {
    Ok(list(checkpoint_dir)?.into_iter().max_by_key(|(step, _)| *step).map(|(_, dir)| dir))
}

/// Reads a checkpoint directory written by [`save`].
pub fn load(dir: &Path) -> Result<Checkpoint, TrainError> {
    let state_path = dir.join("state.json");
    let bytes = fs::read(&state_path).map_err(|e| TrainError::io(&state_path, e))?;
    let state: CheckpointState =
        serde_json::from_slice(&bytes).map_err(|e| TrainError::Checkpoint(format!("{}: {e}", state_path.display())))?;
    if state.format != CHECKPOINT_FORMAT {
        return Err(TrainError::Checkpoint(format!(
            "{}: format {} (this newt reads {CHECKPOINT_FORMAT})",
            dir.display(),
            state.format
        )));
    }
    let (params, _) = read_safetensors(&dir.join("trainable.safetensors"))?;
    let (moments, meta) = read_safetensors(&dir.join("optimizer.safetensors"))?;
    let mut optimizer = BTreeMap::new();
    for (path, step) in meta {
        let step: u64 = step.parse().map_err(|_| TrainError::Checkpoint(format!("bad optimizer step for {path}")))?;
        let get = |suffix: &str| {
            moments
                .get(&format!("{path}.{suffix}"))
                .map(|t| t.values.clone())
                .ok_or_else(|| TrainError::Checkpoint(format!("missing {path}.{suffix}")))
        };
        let m = MomentsHost { exp_avg: get("exp_avg")?, exp_avg_sq: get("exp_avg_sq")?, step };
        optimizer.insert(path, m);
    }
    let metrics_path = dir.join("metrics.jsonl");
    let metrics = match fs::read_to_string(&metrics_path) {
        Ok(text) => text
            .lines()
            .map(|l| {
                serde_json::from_str(l).map_err(|e| TrainError::Checkpoint(format!("{}: {e}", metrics_path.display())))
            })
            .collect::<Result<Vec<MetricsRecord>, _>>()?,
        Err(e) => return Err(TrainError::io(&metrics_path, e)),
    };
    Ok(Checkpoint { dir: dir.to_path_buf(), state, params, optimizer, metrics })
}

fn write_safetensors<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (String, Vec<usize>, &'a [f32])>,
) -> Result<(), TrainError> {
    write_safetensors_meta(path, tensors, None)
}

fn write_safetensors_meta<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (String, Vec<usize>, &'a [f32])>,
    meta: Option<BTreeMap<String, String>>,
) -> Result<(), TrainError> {
    let err = |e: safetensors::SafeTensorError| TrainError::Checkpoint(format!("{}: {e}", path.display()));
    let mut views = Vec::new();
    for (name, shape, values) in tensors {
        let view = TensorView::new(Dtype::F32, shape, bytemuck::cast_slice(values)).map_err(err)?;
        views.push((name, view));
    }
    let meta = meta.map(|m| m.into_iter().collect());
    let bytes = safetensors::serialize(views, meta).map_err(err)?;
    write_synced(path, &bytes)
}

type Tensors = BTreeMap<String, HostTensor>;

fn read_safetensors(path: &Path) -> Result<(Tensors, BTreeMap<String, String>), TrainError> {
    let bytes = fs::read(path).map_err(|e| TrainError::io(path, e))?;
    let err = |e: safetensors::SafeTensorError| TrainError::Checkpoint(format!("{}: {e}", path.display()));
    let (_, metadata) = SafeTensors::read_metadata(&bytes).map_err(err)?;
    let meta: BTreeMap<String, String> = metadata
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let st = SafeTensors::deserialize(&bytes).map_err(err)?;
    let mut out = BTreeMap::new();
    for (name, view) in st.iter() {
        if view.dtype() != Dtype::F32 {
            return Err(TrainError::Checkpoint(format!(
                "{}: tensor {name} is {:?}, expected F32",
                path.display(),
                view.dtype()
            )));
        }
        let values: Vec<f32> =
            view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let t = HostTensor { shape: view.shape().to_vec(), values };
        out.insert(name.to_string(), t);
    }
    Ok((out, meta))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let mut f = File::create(path).map_err(|e| TrainError::io(path, e))?;
    f.write_all(bytes).map_err(|e| TrainError::io(path, e))?;
    f.sync_all().map_err(|e| TrainError::io(path, e))
}

fn sync_dir(dir: &Path) -> Result<(), TrainError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| TrainError::io(dir, e))
}
