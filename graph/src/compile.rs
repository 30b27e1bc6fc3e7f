//! The stage DAG: nodes with their params, checked and ordered by [`build`].
//!
//! Which nodes a pipeline has (its topology) is decided by the caller — `newt-stages` for the
//! built-in shape — this crate only checks ids, inputs and acyclicity.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use petgraph::graph::{DiGraph, NodeIndex};
use serde::{Deserialize, Serialize};

/// One stage of a compiled pipeline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageNode {
    /// Unique id (`fetch.0`, `train`, a custom stage's name).
    pub id: String,
    /// Stage kind, looked up in the registry.
    pub kind: String,
    /// The stage kind's typed params, serialized: these and only these enter the key.
    pub params: serde_json::Value,
    /// Run-time settings that do not change the output (checkpoint cadence, backend choice):
    /// never hashed. Environment effects of them are keyed through `Stage::environment`.
    pub settings: serde_json::Value,
    /// Upstream stage ids, in a stable order.
    pub inputs: Vec<String>,
    /// External files declared in the pipeline (relative to the pipeline's folder).
    pub external: Vec<PathBuf>,
}

impl StageNode {
    /// The node's params as the typed struct its stage kind reads.
    pub fn params_as<T: serde::de::DeserializeOwned>(&self) -> anyhow::Result<T> {
        serde_json::from_value(self.params.clone())
            .map_err(|e| anyhow::anyhow!("stage `{}`: its params do not fit its kind: {e}", self.id))
    }
    /// The node's run-time settings as the typed struct its stage kind reads.
    pub fn settings_as<T: serde::de::DeserializeOwned>(&self) -> anyhow::Result<T> {
        serde_json::from_value(self.settings.clone())
            .map_err(|e| anyhow::anyhow!("stage `{}`: its settings do not fit its kind: {e}", self.id))
    }
}

/// A compiled pipeline: the DAG and its nodes in a topological order.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The graph; edges point from a stage to the stages that read its output.
    pub graph: DiGraph<StageNode, ()>,
    /// Node index by stage id.
    pub index: HashMap<String, NodeIndex>,
    /// Stage ids in a topological order.
    pub order: Vec<String>,
}

impl Pipeline {
    /// A node by id.
    pub fn node(&self, id: &str) -> Option<&StageNode> {
        self.index.get(id).map(|i| &self.graph[*i])
    }
    /// Every node in topological order.
    pub fn nodes(&self) -> impl Iterator<Item = &StageNode> {
        self.order.iter().map(|id| &self.graph[self.index[id]])
    }
    /// The stages that depend on `id`, transitively.
    pub fn dependents(&self, id: &str) -> Vec<String> {
        let Some(&start) = self.index.get(id) else { return Vec::new() };
        let mut dfs = petgraph::visit::Dfs::new(&self.graph, start);
        let mut out = Vec::new();
        while let Some(n) = dfs.next(&self.graph) {
            if n != start {
                out.push(self.graph[n].id.clone());
            }
        }
        out
    }
}

/// A compile error: the graph is not a DAG, or names something that does not exist.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// A stage names an input that no stage produces.
    #[error("stage `{stage}` reads `{missing}`, which is not a stage of this pipeline (stages: {known})")]
    MissingInput { stage: String, missing: String, known: String },
    /// Two stages share an id.
    #[error("two stages are named `{0}`")]
    Duplicate(String),
    /// The graph has a cycle.
    #[error("the stages form a cycle: {0}")]
    Cycle(String),
    /// A custom stage is malformed.
    #[error("stage `{stage}`: {message}")]
    Custom { stage: String, message: String },
}

/// Builds the graph from nodes, checking ids, inputs and acyclicity.
pub fn build(nodes: Vec<StageNode>) -> Result<Pipeline, CompileError> {
    let mut graph = DiGraph::new();
    let mut index = HashMap::new();
    for n in nodes {
        let id = n.id.clone();
        let ix = graph.add_node(n);
        if index.insert(id.clone(), ix).is_some() {
            return Err(CompileError::Duplicate(id));
        }
    }
    let known: BTreeMap<_, _> = index.iter().map(|(k, v)| (k.clone(), *v)).collect();
    let ids: Vec<NodeIndex> = graph.node_indices().collect();
    for ix in ids {
        let inputs = graph[ix].inputs.clone();
        for input in inputs {
            let Some(&from) = index.get(&input) else {
                return Err(CompileError::MissingInput {
                    stage: graph[ix].id.clone(),
                    missing: input,
                    known: known.keys().cloned().collect::<Vec<_>>().join(", "),
                });
            };
            graph.add_edge(from, ix, ());
        }
    }
    let order = match petgraph::algo::toposort(&graph, None) {
        Ok(o) => o.into_iter().map(|i| graph[i].id.clone()).collect(),
        Err(cycle) => {
            let sccs = petgraph::algo::tarjan_scc(&graph);
            let members = sccs
                .into_iter()
                .find(|c| c.contains(&cycle.node_id()))
                .map(|c| c.into_iter().map(|i| graph[i].id.clone()).collect::<Vec<_>>())
                .unwrap_or_else(|| vec![graph[cycle.node_id()].id.clone()]);
            let mut members = members;
            members.sort();
            return Err(CompileError::Cycle(members.join(" → ")));
        }
    };
    Ok(Pipeline { graph, index, order })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, inputs: &[&str]) -> StageNode {
        StageNode {
            id: id.into(),
            kind: "command".into(),
            params: serde_json::json!({}),
            settings: serde_json::json!({}),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            external: Vec::new(),
        }
    }

    #[test]
    fn cycle_is_an_error_naming_the_stages() {
        let e = build(vec![node("a", &["b"]), node("b", &["a"])]).unwrap_err().to_string();
        assert!(e.contains("cycle") && e.contains('a') && e.contains('b'), "{e}");
    }

    #[test]
    fn missing_input_is_an_error_naming_it() {
        let e = build(vec![node("a", &["nope"])]).unwrap_err().to_string();
        assert!(e.contains("`nope`") && e.contains("`a`"), "{e}");
    }

    #[test]
    fn order_is_topological_and_dependents_transitive() {
        let p = build(vec![node("c", &["b"]), node("b", &["a"]), node("a", &[])]).unwrap();
        assert_eq!(p.order, ["a", "b", "c"]);
        assert_eq!(p.dependents("a").len(), 2);
    }
}
