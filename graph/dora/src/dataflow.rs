//! The dataflow a pipeline becomes: one dora node per stage, inputs = the upstream stages'
//! `done` outputs, placed by labels.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use newt_graph::Pipeline;
use serde::{Deserialize, Serialize};

/// The one output every node sends: its [`crate::StageMessage`].
pub const OUTPUT: &str = "done";

/// The node that receives every stage's message and keeps the dataflow open until the driver
/// has read the nodes' reports (dora 1.1 serves a finished dataflow's logs only for nodes
/// placed by machine id, not by labels), then until the driver stops it.
pub const COLLECTOR: &str = "newt-collect";

/// Where a stage may run: a machine id, or labels a daemon must carry (dora's `deploy`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deploy {
    /// The daemon's machine id (`newt cluster daemon --machine-id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// Labels the daemon must have (`--labels gpu=true`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Deploy {
    /// The default placement of a stage kind: stages that build a model (train, evaluate,
    /// merge) on a daemon labelled `gpu=true`, the others on one labelled `cpu=true`.
    pub fn for_kind(kind: &str) -> Self {
        let label = if matches!(kind, "train" | "evaluate" | "merge") { "gpu" } else { "cpu" };
        Deploy { machine: None, labels: BTreeMap::from([(label.to_string(), "true".to_string())]) }
    }
}

/// The program each node runs: `PATH stage-node PIPELINE STAGE`, with `env`.
#[derive(Debug, Clone)]
pub struct NodeProgram {
    /// The newt binary (absolute: daemons start it from their own working directory).
    pub path: PathBuf,
    /// The pipeline file (absolute).
    pub pipeline: PathBuf,
    /// Environment every node gets (the cache folder, the remote cache, ...).
    pub env: BTreeMap<String, String>,
}

/// The dataflow of the stages in `wanted` (all of `pipeline` when `None`), as YAML (what
/// `newt plan --executor dora` prints and what the coordinator is given). `overrides` replaces
/// a stage's default placement ([`Deploy::for_kind`]).
pub fn dataflow(
    pipeline: &Pipeline,
    wanted: Option<&HashSet<String>>,
    program: &NodeProgram,
    overrides: &BTreeMap<String, Deploy>,
) -> serde_yaml::Value {
    use serde_yaml::{Mapping, Value};
    let s = |x: &str| Value::String(x.to_string());
    let mut nodes = Vec::new();
    for id in &pipeline.order {
        if wanted.is_some_and(|w| !w.contains(id)) {
            continue;
        }
        let node = pipeline.node(id).expect("ordered ids are nodes");
        let mut m = Mapping::new();
        m.insert(s("id"), s(id));
        m.insert(s("path"), s(&program.path.display().to_string()));
        m.insert(s("args"), s(&format!("stage-node {} {id}", program.pipeline.display())));
        if !program.env.is_empty() {
            let env: Mapping = program.env.iter().map(|(k, v)| (s(k), s(v))).collect();
            m.insert(s("env"), Value::Mapping(env));
        }
        let inputs: Mapping = node.inputs.iter().map(|u| (s(u), s(&format!("{u}/{OUTPUT}")))).collect();
        if !inputs.is_empty() {
            m.insert(s("inputs"), Value::Mapping(inputs));
        }
        m.insert(s("outputs"), Value::Sequence(vec![s(OUTPUT)]));
        let deploy = overrides.get(id).cloned().unwrap_or_else(|| Deploy::for_kind(&node.kind));
        m.insert(s("deploy"), serde_yaml::to_value(deploy).expect("deploy serializes"));
        nodes.push(Value::Mapping(m));
    }
    // The collector: inputs from every stage, placed like the first stage.
    let stages = nodes.clone();
    if let Some(first) = stages.first().and_then(|n| n.as_mapping()) {
        let mut m = Mapping::new();
        m.insert(s("id"), s(COLLECTOR));
        m.insert(s("path"), s(&program.path.display().to_string()));
        m.insert(s("args"), s(&format!("collect-node {}", stages.len())));
        let inputs: Mapping = stages
            .iter()
            .filter_map(|n| n.get("id").and_then(Value::as_str))
            .map(|id| (s(id), s(&format!("{id}/{OUTPUT}"))))
            .collect();
        m.insert(s("inputs"), Value::Mapping(inputs));
        if let Some(d) = first.get("deploy") {
            m.insert(s("deploy"), d.clone());
        }
        nodes.push(Value::Mapping(m));
    }
    let mut root = Mapping::new();
    root.insert(s("nodes"), Value::Sequence(nodes));
    Value::Mapping(root)
}

/// The dataflow as dora reads it (parsing checks ids, inputs and deploy fields the way the
/// coordinator will).
pub fn descriptor(yaml: &serde_yaml::Value) -> anyhow::Result<dora_message::descriptor::Descriptor> {
    serde_yaml::from_value(yaml.clone()).map_err(|e| anyhow::anyhow!("the dataflow is not one dora accepts: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use newt_graph::compile::{StageNode, build};

    fn node(id: &str, kind: &str, inputs: &[&str]) -> StageNode {
        StageNode {
            id: id.into(),
            kind: kind.into(),
            params: serde_json::json!({}),
            settings: serde_json::json!({}),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            external: Vec::new(),
        }
    }

    #[test]
    fn stages_become_nodes_placed_by_kind_or_by_override_with_a_collector_dora_accepts() {
        let p = build(vec![
            node("fetch.0", "fetch_dataset", &[]),
            node("pack", "pack", &["fetch.0"]),
            node("train", "train", &["pack"]),
            node("evaluate", "evaluate", &["train", "pack"]),
        ])
        .unwrap();
        let program = NodeProgram {
            path: "/opt/newt".into(),
            pipeline: "/work/p.yml".into(),
            env: BTreeMap::from([("NEWT_CACHE_DIR".to_string(), "/cache".to_string())]),
        };
        let overrides =
            BTreeMap::from([("pack".to_string(), Deploy { machine: Some("big-cpu".into()), labels: BTreeMap::new() })]);
        let yaml = dataflow(&p, None, &program, &overrides);
        descriptor(&yaml).expect("dora parses the dataflow");
        let nodes = yaml["nodes"].as_sequence().unwrap();
        let by_id = |id: &str| nodes.iter().find(|n| n["id"].as_str() == Some(id)).unwrap().clone();
        assert_eq!(by_id("fetch.0")["deploy"]["labels"]["cpu"].as_str(), Some("true"));
        assert_eq!(by_id("pack")["deploy"]["machine"].as_str(), Some("big-cpu"));
        assert!(by_id("pack")["deploy"].get("labels").is_none());
        assert_eq!(by_id("train")["deploy"]["labels"]["gpu"].as_str(), Some("true"));
        assert_eq!(by_id("evaluate")["inputs"]["pack"].as_str(), Some("pack/done"));
        assert_eq!(by_id("evaluate")["args"].as_str(), Some("stage-node /work/p.yml evaluate"));
        assert_eq!(by_id("train")["env"]["NEWT_CACHE_DIR"].as_str(), Some("/cache"));
        let collector = by_id(COLLECTOR);
        assert_eq!(collector["args"].as_str(), Some("collect-node 4"));
        assert_eq!(collector["inputs"].as_mapping().unwrap().len(), 4);
        // Only the wanted stages, when asked.
        let want: HashSet<String> = ["fetch.0".to_string(), "pack".to_string()].into();
        let some = dataflow(&p, Some(&want), &program, &BTreeMap::new());
        assert_eq!(some["nodes"].as_sequence().unwrap().len(), 3);
    }
}
