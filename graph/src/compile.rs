//! Compiles a [`Config`] into the stage DAG.
//!
//! Built-in shape: `fetch.model`; per dataset `fetch.<i>` → `tokenize.<i>` (and
//! `fetch.test.<i>` → `tokenize.test.<i>` for `test_datasets`); `pack` over all tokenize
//! stages; `train`; `evaluate`; `merge` when an adapter is trained. Custom stages declared under
//! `stages:` join the same graph by id; a dataset with `path: stage:NAME` reads NAME's output.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use petgraph::graph::{DiGraph, NodeIndex};
use serde::{Deserialize, Serialize};

use crate::config::{Config, DatasetConfig};
use crate::key::{ROUTES, Route, settings_for};

/// One stage of a compiled pipeline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageNode {
    /// Unique id (`fetch.0`, `train`, a custom stage's name).
    pub id: String,
    /// Stage kind, looked up in the registry.
    pub kind: String,
    /// Output-affecting params: these enter the key.
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
    /// The config as this stage sees it: its routed params and settings, defaults elsewhere.
    /// A stage that reads a key not routed to it sees the default, which tests catch.
    pub fn config(&self) -> anyhow::Result<Config> {
        let mut merged = self.settings.as_object().cloned().unwrap_or_default();
        for (k, v) in self.params.as_object().into_iter().flatten() {
            // Node-only params (`dataset`, `custom`, `train_inputs`) are not config keys.
            if ROUTES.iter().any(|(r, _)| r == k) {
                merged.insert(k.clone(), v.clone());
            }
        }
        if !merged.contains_key("base_model") {
            merged.insert("base_model".into(), serde_json::Value::String(String::new()));
        }
        Ok(serde_json::from_value(serde_json::Value::Object(merged))?)
    }
    /// The dataset entry of a fetch/tokenize stage.
    pub fn dataset(&self) -> anyhow::Result<DatasetConfig> {
        let v = self.params.get("dataset").ok_or_else(|| anyhow::anyhow!("stage `{}` has no dataset", self.id))?;
        Ok(serde_json::from_value(v.clone())?)
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

fn routed(config: &serde_json::Value, kind: &str) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    for (key, route) in ROUTES {
        if let Route::Stages(kinds) = route
            && kinds.contains(&kind)
        {
            m.insert(key.to_string(), config[*key].clone());
        }
    }
    m
}

fn settings(config: &serde_json::Value, kind: &str) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for key in settings_for(kind) {
        m.insert(key.to_string(), config[*key].clone());
    }
    serde_json::Value::Object(m)
}

/// Builds the DAG of a config.
pub fn compile(config: &Config) -> Result<Pipeline, CompileError> {
    let cj = serde_json::to_value(config).expect("config serializes");
    let mut nodes: Vec<StageNode> = Vec::new();
    let node =
        |id: &str, kind: &str, params: serde_json::Map<String, serde_json::Value>, inputs: Vec<String>| StageNode {
            id: id.to_string(),
            kind: kind.to_string(),
            settings: settings(&cj, kind),
            params: serde_json::Value::Object(params),
            inputs,
            external: Vec::new(),
        };

    let tiny = config.base_model.starts_with("newt:");
    let mut fetch_ids = Vec::new();
    let mut tokenize_train = Vec::new();
    let mut tokenize_test = Vec::new();
    let all = config.datasets.iter().map(|d| (d, false)).chain(config.test_datasets.iter().map(|d| (d, true)));
    let (mut i_train, mut i_test) = (0, 0);
    for (ds, test) in all {
        let suffix = if test {
            i_test += 1;
            format!("test.{}", i_test - 1)
        } else {
            i_train += 1;
            format!("{}", i_train - 1)
        };
        let fetch_id = format!("fetch.{suffix}");
        let mut p = routed(&cj, "fetch_dataset");
        p.insert("dataset".into(), serde_json::to_value(ds).expect("dataset serializes"));
        let mut inputs = Vec::new();
        if let Some(stage) = ds.path.strip_prefix("stage:") {
            inputs.push(stage.to_string());
        }
        nodes.push(node(&fetch_id, "fetch_dataset", p, inputs));
        fetch_ids.push(fetch_id.clone());
        let tok_id = format!("tokenize.{suffix}");
        let mut p = routed(&cj, "tokenize");
        p.insert("dataset".into(), serde_json::to_value(ds).expect("dataset serializes"));
        nodes.push(node(&tok_id, "tokenize", p, vec![fetch_id, "fetch.model".into()]));
        if test { tokenize_test.push(tok_id) } else { tokenize_train.push(tok_id) }
    }
    // The built-in tiny model trains its tokenizer on the training datasets' text.
    let model_inputs =
        if tiny { fetch_ids.iter().filter(|f| !f.starts_with("fetch.test.")).cloned().collect() } else { Vec::new() };
    let mut fetch_model = node("fetch.model", "fetch_model", routed(&cj, "fetch_model"), model_inputs);
    if !tiny && !config.base_model.is_empty() {
        fetch_model.external.push(PathBuf::from(&config.base_model));
    }
    nodes.push(fetch_model);
    let mut pack_inputs = tokenize_train.clone();
    pack_inputs.extend(tokenize_test.iter().cloned());
    let mut pack_params = routed(&cj, "pack");
    pack_params.insert("train_inputs".into(), serde_json::to_value(&tokenize_train).unwrap());
    pack_params.insert("test_inputs".into(), serde_json::to_value(&tokenize_test).unwrap());
    nodes.push(node("pack", "pack", pack_params, pack_inputs));
    let mut train = node("train", "train", routed(&cj, "train"), vec!["pack".into(), "fetch.model".into()]);
    if let Some(dir) = &config.lora_model_dir {
        train.external.push(PathBuf::from(dir));
    }
    nodes.push(train);
    nodes.push(node(
        "evaluate",
        "evaluate",
        routed(&cj, "evaluate"),
        vec!["train".into(), "pack".into(), "fetch.model".into()],
    ));
    if config.adapter.is_some() && config.merge.enabled {
        nodes.push(node("merge", "merge", routed(&cj, "merge"), vec!["train".into(), "fetch.model".into()]));
    }
    for s in &config.stages {
        if s.name.is_empty() {
            return Err(CompileError::Custom { stage: "?".into(), message: "a custom stage needs a `name`".into() });
        }
        let body = match s.kind.as_str() {
            "command" if s.run.is_some() => serde_json::json!({"run": s.run, "outputs": s.outputs}),
            "sql" if s.sql.is_some() => serde_json::json!({"sql": s.sql}),
            "command" => {
                return Err(CompileError::Custom {
                    stage: s.name.clone(),
                    message: "kind `command` needs `run`".into(),
                });
            }
            "sql" => {
                return Err(CompileError::Custom { stage: s.name.clone(), message: "kind `sql` needs `sql`".into() });
            }
            other => {
                return Err(CompileError::Custom {
                    stage: s.name.clone(),
                    message: format!("unknown kind `{other}` (custom kinds: command, sql)"),
                });
            }
        };
        let mut p = serde_json::Map::new();
        p.insert("custom".into(), body);
        let mut n = node(&s.name, &s.kind, p, s.inputs.clone());
        n.external = s.files.iter().map(PathBuf::from).collect();
        nodes.push(n);
    }
    build(nodes)
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
    use crate::config::parse;
    use std::path::Path;

    fn pipeline(yaml: &str) -> Result<Pipeline, CompileError> {
        compile(&parse(yaml, Path::new("p.yml")).unwrap().config)
    }

    const BASE: &str = "base_model: newt:tiny\ndatasets:\n  - path: a.jsonl\n    type: alpaca\n  - path: b.jsonl\n    type: completion\nadapter: lora\n";

    #[test]
    fn builtin_shape_has_fetch_tokenize_pack_train_evaluate_merge() {
        let p = pipeline(BASE).unwrap();
        let ids: Vec<_> = p.nodes().map(|n| n.id.as_str()).collect();
        for id in
            ["fetch.0", "fetch.1", "tokenize.0", "tokenize.1", "fetch.model", "pack", "train", "evaluate", "merge"]
        {
            assert!(ids.contains(&id), "missing {id} in {ids:?}");
        }
        let pos = |id| ids.iter().position(|x| *x == id).unwrap();
        assert!(pos("tokenize.0") < pos("pack") && pos("pack") < pos("train") && pos("train") < pos("merge"));
        assert_eq!(p.dependents("pack").len(), 3);
    }

    #[test]
    fn learning_rate_enters_only_train_params() {
        let p = pipeline(BASE).unwrap();
        for n in p.nodes() {
            assert_eq!(n.params.get("learning_rate").is_some(), n.kind == "train", "{}", n.id);
        }
    }

    #[test]
    fn custom_stage_cycle_is_an_error_naming_the_stages() {
        let y = format!(
            "{BASE}stages:\n  - name: a\n    kind: command\n    run: 'true'\n    inputs: [b]\n  - name: b\n    kind: command\n    run: 'true'\n    inputs: [a]\n"
        );
        let e = pipeline(&y).unwrap_err().to_string();
        assert!(e.contains("cycle") && e.contains('a') && e.contains('b'), "{e}");
    }

    #[test]
    fn missing_input_is_an_error_naming_it() {
        let y = format!("{BASE}stages:\n  - name: a\n    kind: sql\n    sql: select 1\n    inputs: [nope]\n");
        let e = pipeline(&y).unwrap_err().to_string();
        assert!(e.contains("`nope`") && e.contains("`a`"), "{e}");
    }

    #[test]
    fn dataset_from_custom_stage_depends_on_it() {
        let y = "base_model: newt:tiny\ndatasets:\n  - path: stage:gen\n    type: completion\nstages:\n  - name: gen\n    kind: command\n    run: echo hi\n    outputs: [data.jsonl]\n";
        let p = pipeline(y).unwrap();
        assert_eq!(p.node("fetch.0").unwrap().inputs, vec!["gen".to_string()]);
        assert!(p.dependents("gen").contains(&"train".to_string()));
    }

    #[test]
    fn node_config_sees_only_routed_keys() {
        let y = format!("{BASE}learning_rate: 0.001\nsequence_len: 512\n");
        let p = pipeline(&y).unwrap();
        let train = p.node("train").unwrap().config().unwrap();
        assert_eq!(train.learning_rate, 0.001);
        let pack = p.node("pack").unwrap().config().unwrap();
        assert_eq!(pack.sequence_len, 512);
        assert_eq!(pack.learning_rate, Config::default().learning_rate);
    }
}
