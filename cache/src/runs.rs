//! Run records and pins: the gc roots. A run record says which keys and objects the latest run
//! of a pipeline used; it also keeps, per stage, the latest key ever recorded (for `newt why`
//! after a run that stopped early). Pins keep a digest alive under a name.

use std::collections::BTreeMap;
use std::fs;
use std::io::ErrorKind;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::io_err;
use crate::fsutil::{now_unix, write_atomic};
use crate::{Cache, CacheError, Digest, hash_bytes};

const RUN_FORMAT: u32 = 1;
const RUN_FILE_CONTEXT: &str = "newt-cache 2026 run record file v1";

/// One stage of a run: its key and the digest of the output it used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStage {
    /// The stage key.
    pub key: Digest,
    /// The object the stage's result is (its manifest's `output`).
    pub output: Digest,
}

/// What one run of a pipeline used, by stage id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The pipeline file as the user named it (for display).
    pub pipeline_path: String,
    /// Stage id to key and output.
    pub stages: BTreeMap<String, RunStage>,
    /// When the run finished (seconds since the Unix epoch).
    pub finished_unix: u64,
}

/// A named pin that keeps a manifest (by key) or an object (by digest) through gc.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// The pin's name.
    pub name: String,
    /// A manifest key or an object digest.
    pub digest: Digest,
    /// When it was pinned (seconds since the Unix epoch).
    pub created_unix: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct RunFile {
    format: u32,
    pipeline_id: String,
    latest: RunRecord,
    /// Latest key and output of every stage ever recorded for this pipeline.
    stage_history: BTreeMap<String, RunStage>,
}

impl Cache {
    /// Records `run` as the latest run of `pipeline_id` (any stable string naming the pipeline,
    /// such as its canonical path). Replaces the previous record as a gc root.
    pub fn record_run(&self, pipeline_id: &str, run: &RunRecord) -> Result<(), CacheError> {
        let path = self.run_path(pipeline_id);
        // Serialize read-modify-write of the stage history between concurrent runs.
        let _guard = self.lock_key(&hash_bytes(RUN_FILE_CONTEXT, &[pipeline_id.as_bytes(), b"lock"]))?;
        let mut stage_history = self.read_run_file(&path)?.map(|f| f.stage_history).unwrap_or_default();
        stage_history.extend(run.stages.iter().map(|(k, v)| (k.clone(), *v)));
        let file =
            RunFile { format: RUN_FORMAT, pipeline_id: pipeline_id.to_string(), latest: run.clone(), stage_history };
        let json = serde_json::to_vec_pretty(&file).map_err(|source| CacheError::Json {
            action: "write",
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &json)
    }

    /// The latest run recorded for `pipeline_id`.
    pub fn last_run(&self, pipeline_id: &str) -> Result<Option<RunRecord>, CacheError> {
        Ok(self.read_run_file(&self.run_path(pipeline_id))?.map(|f| f.latest))
    }

    /// The latest key and output recorded for one stage of a pipeline, in whichever run last
    /// had it (so `newt why` still works after a run that stopped before that stage).
    pub fn last_stage(&self, pipeline_id: &str, stage_id: &str) -> Result<Option<RunStage>, CacheError> {
        Ok(self.read_run_file(&self.run_path(pipeline_id))?.and_then(|f| f.stage_history.get(stage_id).copied()))
    }

    /// The latest run of every pipeline, by pipeline id.
    pub fn runs(&self) -> Result<BTreeMap<String, RunRecord>, CacheError> {
        let dir = self.runs_dir();
        let mut out = BTreeMap::new();
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let path = entry.map_err(io_err("list", &dir))?.path();
            if path.extension().is_some_and(|e| e == "json")
                && let Some(file) = self.read_run_file(&path)?
            {
                out.insert(file.pipeline_id, file.latest);
            }
        }
        Ok(out)
    }

    fn run_path(&self, pipeline_id: &str) -> std::path::PathBuf {
        self.runs_dir().join(format!("{}.json", hash_bytes(RUN_FILE_CONTEXT, &[pipeline_id.as_bytes()])))
    }

    /// A corrupt run record is an error, not a miss: gc must not guess what it protected.
    fn read_run_file(&self, path: &Path) -> Result<Option<RunFile>, CacheError> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CacheError::Io { action: "read", path: path.to_path_buf(), source: e }),
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|source| CacheError::Json {
            action: "read",
            path: path.to_path_buf(),
            source,
        })
    }

    /// Pins `digest` (a manifest key or an object digest) under `name`, replacing any pin of
    /// that name. gc keeps pinned manifests, their objects, and pinned objects.
    pub fn pin(&self, digest: &Digest, name: &str) -> Result<(), CacheError> {
        let path = self.pin_path(name)?;
        let pin = Pin { name: name.to_string(), digest: *digest, created_unix: now_unix() };
        let json = serde_json::to_vec_pretty(&pin).map_err(|source| CacheError::Json {
            action: "write",
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &json)
    }

    /// Removes the pin `name`; `Ok(false)` if there was none.
    pub fn unpin(&self, name: &str) -> Result<bool, CacheError> {
        let path = self.pin_path(name)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(CacheError::Io { action: "remove", path, source: e }),
        }
    }

    /// All pins, by name.
    pub fn pins(&self) -> Result<Vec<Pin>, CacheError> {
        let dir = self.pins_dir();
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let path = entry.map_err(io_err("list", &dir))?.path();
            if path.extension().is_none_or(|e| e != "json") || crate::fsutil::is_temp_name(&path) {
                continue;
            }
            let bytes = fs::read(&path).map_err(io_err("read", &path))?;
            out.push(serde_json::from_slice(&bytes).map_err(|source| CacheError::Json {
                action: "read",
                path,
                source,
            })?);
        }
        out.sort_by(|a: &Pin, b: &Pin| a.name.cmp(&b.name));
        Ok(out)
    }

    fn pin_path(&self, name: &str) -> Result<std::path::PathBuf, CacheError> {
        let valid = !name.is_empty()
            && name.len() <= 128
            && !name.starts_with('.')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid {
            return Err(CacheError::InvalidPinName { name: name.to_string(), path: self.root().to_path_buf() });
        }
        Ok(self.pins_dir().join(format!("{name}.json")))
    }
}
