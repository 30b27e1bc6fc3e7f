//! `newt plan` and `newt why`: what would run, and why a stage is (not) a cache hit.
//!
//! Both walk the pipeline in order without running anything. A stage whose upstream outputs are
//! all known (cached) gets its real key; a stage downstream of a miss cannot be keyed yet and is
//! reported as waiting on it. Reasons are a diff of the key inputs now against those stored in
//! the manifest of the last result of that stage, grouped as params / data / code / environment.

use std::collections::BTreeMap;
use std::path::Path;

use newt_cache::{Cache, Digest};
use serde::Serialize;

use crate::compile::Pipeline;
use crate::executor::key_inputs;
use crate::key::KeyInputs;
use crate::stage::Registry;

/// One stage of a plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlanEntry {
    /// Stage id.
    pub id: String,
    /// Stage kind.
    pub kind: String,
    /// The key, when it can be computed now.
    pub key: Option<Digest>,
    /// Whether the result is cached.
    pub hit: bool,
    /// Whether the remote cache has the result (a run pulls it instead of running the stage).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub remote: bool,
    /// Why it will run (empty for hits).
    pub reasons: Vec<String>,
}

/// One changed key input.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Change {
    /// `params`, `data`, `code` or `environment`.
    pub group: String,
    /// Dotted path of the input (`learning_rate`, `upstream.pack`, `external.data/a.jsonl`).
    pub field: String,
    /// Value in the last result (None = absent).
    pub before: Option<String>,
    /// Value now (None = absent).
    pub after: Option<String>,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(absent)".into());
        write!(f, "{}: {}: {} → {}", self.group, self.field, show(&self.before), show(&self.after))
    }
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match v {
        serde_json::Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&p, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// The differences between two sets of key inputs.
pub fn diff(before: &KeyInputs, after: &KeyInputs) -> Vec<Change> {
    let mut changes = Vec::new();
    let groups: [(&str, serde_json::Value, serde_json::Value); 6] = [
        ("params", before.params.clone(), after.params.clone()),
        ("data", serde_json::json!({"upstream": before.upstream}), serde_json::json!({"upstream": after.upstream})),
        ("data", serde_json::json!({"external": before.external}), serde_json::json!({"external": after.external})),
        ("code", serde_json::to_value(&before.code).unwrap(), serde_json::to_value(&after.code).unwrap()),
        ("environment", serde_json::to_value(&before.env).unwrap(), serde_json::to_value(&after.env).unwrap()),
        ("remote", serde_json::to_value(&before.remote).unwrap(), serde_json::to_value(&after.remote).unwrap()),
    ];
    for (group, b, a) in groups {
        let (mut fb, mut fa) = (BTreeMap::new(), BTreeMap::new());
        flatten("", &b, &mut fb);
        flatten("", &a, &mut fa);
        let keys: std::collections::BTreeSet<_> = fb.keys().chain(fa.keys()).cloned().collect();
        for k in keys {
            let (x, y) = (fb.get(&k).cloned(), fa.get(&k).cloned());
            if x != y {
                let short = |v: Option<String>| {
                    v.map(|s| if s.len() == 66 && s.starts_with('"') { s[1..13].to_string() } else { s })
                };
                changes.push(Change { group: group.to_string(), field: k, before: short(x), after: short(y) });
            }
        }
    }
    changes
}

/// Computes what `newt run` would do, without doing it.
pub fn plan(
    pipeline: &Pipeline,
    registry: &Registry,
    cache: &Cache,
    base_dir: &Path,
    pipeline_id: &str,
) -> anyhow::Result<Vec<PlanEntry>> {
    plan_with_remote(pipeline, registry, cache, base_dir, pipeline_id, &|_| None)
}

/// [`plan`] that also asks a remote cache: `remote(key)` is the output digest of the result it
/// has for a key (and would be pulled), so the stages after it are keyed too.
pub fn plan_with_remote(
    pipeline: &Pipeline,
    registry: &Registry,
    cache: &Cache,
    base_dir: &Path,
    pipeline_id: &str,
    remote: &dyn Fn(&Digest) -> Option<Digest>,
) -> anyhow::Result<Vec<PlanEntry>> {
    let last = cache.last_run(pipeline_id)?;
    let mut outputs: BTreeMap<String, Digest> = BTreeMap::new();
    let mut entries = Vec::new();
    for node in pipeline.nodes() {
        let stage =
            registry.get(&node.kind).ok_or_else(|| anyhow::anyhow!("no stage implements kind `{}`", node.kind))?;
        let missing: Vec<&String> = node.inputs.iter().filter(|i| !outputs.contains_key(*i)).collect();
        if !missing.is_empty() {
            entries.push(PlanEntry {
                id: node.id.clone(),
                kind: node.kind.clone(),
                key: None,
                hit: false,
                remote: false,
                reasons: vec![format!(
                    "waits on {} (will run first); keyed once its output is known",
                    missing.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
                )],
            });
            continue;
        }
        let upstream: BTreeMap<String, Digest> = node.inputs.iter().map(|i| (i.clone(), outputs[i])).collect();
        let (now, _) = key_inputs(stage.as_ref(), node, &upstream, cache, base_dir)?;
        let key = now.key();
        let lookup = cache.lookup(&key)?;
        if let Some(m) = lookup.manifest {
            outputs.insert(node.id.clone(), m.output);
            entries.push(PlanEntry {
                id: node.id.clone(),
                kind: node.kind.clone(),
                key: Some(key),
                hit: true,
                remote: false,
                reasons: Vec::new(),
            });
            continue;
        }
        if let Some(output) = remote(&key) {
            outputs.insert(node.id.clone(), output);
            entries.push(PlanEntry {
                id: node.id.clone(),
                kind: node.kind.clone(),
                key: Some(key),
                hit: false,
                remote: true,
                reasons: vec!["the remote cache has it: a run pulls it".into()],
            });
            continue;
        }
        let mut reasons: Vec<String> = lookup.warnings.clone();
        let previous = last
            .as_ref()
            .and_then(|r| r.stages.get(&node.id))
            .and_then(|s| cache.lookup(&s.key).ok())
            .and_then(|l| l.manifest);
        match previous {
            Some(m) => match serde_json::from_value::<KeyInputs>(m.key_inputs.clone()) {
                Ok(before) => {
                    let d = diff(&before, &now);
                    if d.is_empty() {
                        reasons.push("same inputs as the last result, but it is no longer in the cache".into());
                    }
                    reasons.extend(d.iter().map(Change::to_string));
                }
                Err(_) => reasons.push("the last result's manifest predates this newt's key format".into()),
            },
            None => reasons.push("no earlier result of this stage in the cache".into()),
        }
        entries.push(PlanEntry {
            id: node.id.clone(),
            kind: node.kind.clone(),
            key: Some(key),
            hit: false,
            remote: false,
            reasons,
        });
    }
    Ok(entries)
}

/// Explains one stage: its plan entry, and for a waiting stage the reasons of what it waits on.
pub fn why(
    pipeline: &Pipeline,
    registry: &Registry,
    cache: &Cache,
    base_dir: &Path,
    pipeline_id: &str,
    stage: &str,
) -> anyhow::Result<Vec<PlanEntry>> {
    if pipeline.node(stage).is_none() {
        anyhow::bail!("no stage `{stage}` in this pipeline (stages: {})", pipeline.order.join(", "));
    }
    let entries = plan(pipeline, registry, cache, base_dir, pipeline_id)?;
    // The stage itself, then every upstream stage that will run (the root causes).
    let mut upstream = std::collections::HashSet::new();
    let mut stack = vec![stage.to_string()];
    while let Some(s) = stack.pop() {
        if upstream.insert(s.clone()) {
            stack.extend(pipeline.node(&s).map(|n| n.inputs.clone()).unwrap_or_default());
        }
    }
    Ok(entries.into_iter().filter(|e| e.id == stage || (upstream.contains(&e.id) && !e.hit)).collect())
}
