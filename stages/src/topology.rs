//! The built-in pipeline shape: which stages a validated config compiles into, each with its
//! kind's typed params (the key) and settings (never hashed).
//!
//! `fetch.model` (and `quantize.model` after it for a QLoRA or `load_in_8bit` base, read by
//! train and evaluate); per dataset `fetch.<i>` → `tokenize.<i>` (and `fetch.test.<i>` →
//! `tokenize.test.<i>` for `test_datasets`); `pack` over all tokenize stages; `train`;
//! `evaluate`; `merge` unless `merge.enabled: false` (a full fine-tune has no merge: its
//! `export` node writes GGUF files when `merge.gguf` asks for them). Custom stages declared under `stages:`
//! join the same graph by id; a dataset with `path: stage:NAME` reads NAME's output.

use std::path::PathBuf;

use newt_config::Config;
use newt_config::classify::kind::*;
use newt_config::params::*;
use newt_graph::compile::{CompileError, Pipeline, StageNode, build};
use serde::Serialize;

fn node<P: Serialize, S: Serialize>(id: &str, kind: &str, params: &P, settings: &S, inputs: Vec<String>) -> StageNode {
    StageNode {
        id: id.to_string(),
        kind: kind.to_string(),
        params: serde_json::to_value(params).expect("params serialize"),
        settings: serde_json::to_value(settings).expect("settings serialize"),
        inputs,
        external: Vec::new(),
    }
}

/// Data-parallel replicas the train stage uses: `gpus:` when set; else every visible CUDA
/// device (`CUDA_VISIBLE_DEVICES` applies) unless the backend is the CPU, where it is 1.
pub fn world_size(config: &Config) -> usize {
    match (config.gpus, config.backend) {
        (Some(n), _) => n.max(1),
        (None, newt_config::Backend::Cpu) => 1,
        (None, _) => newt_model::backend::cuda_device_count().max(1),
    }
}

/// Builds the DAG of a validated config.
pub fn compile(config: &Config) -> Result<Pipeline, CompileError> {
    let none = serde_json::json!({});
    let mut nodes: Vec<StageNode> = Vec::new();
    let tiny = config.base_model.starts_with("newt:");
    let world = world_size(config);
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
        let mut inputs = Vec::new();
        if let Some(stage) = ds.path.strip_prefix("stage:") {
            inputs.push(stage.to_string());
        }
        nodes.push(node(&fetch_id, FETCH_DATASET, &FetchDatasetParams::from_config(config, ds), &none, inputs));
        fetch_ids.push(fetch_id.clone());
        let tok_id = format!("tokenize.{suffix}");
        let params = TokenizeParams::from_config(config, ds);
        nodes.push(node(&tok_id, TOKENIZE, &params, &none, vec![fetch_id, "fetch.model".into()]));
        if test { tokenize_test.push(tok_id) } else { tokenize_train.push(tok_id) }
    }
    // The built-in tiny model trains its tokenizer on the training datasets' text.
    let model_inputs =
        if tiny { fetch_ids.iter().filter(|f| !f.starts_with("fetch.test.")).cloned().collect() } else { Vec::new() };
    nodes.push(node("fetch.model", FETCH_MODEL, &FetchModelParams::from_config(config), &none, model_inputs));
    // A quantized base (QLoRA, `load_in_8bit`) is quantized once, into its own artifact.
    let quantize = QuantizeParams::from_config(config);
    let mut model_ids = vec!["fetch.model".to_string()];
    if quantize.quantization != BaseQuantization::None && !config.is_full_fine_tune() {
        nodes.push(node("quantize.model", QUANTIZE_MODEL, &quantize, &none, vec!["fetch.model".into()]));
        model_ids.push("quantize.model".into());
    }
    let mut pack_inputs = tokenize_train.clone();
    pack_inputs.extend(tokenize_test.iter().cloned());
    let pack = PackParams::from_config(config, tokenize_train, tokenize_test);
    nodes.push(node("pack", PACK, &pack, &none, pack_inputs));
    let mut train = node(
        "train",
        TRAIN,
        &TrainParams::on_replicas(config, world),
        &TrainSettings::on_replicas(config, world),
        [vec!["pack".to_string()], model_ids.clone()].concat(),
    );
    if let Some(dir) = &config.lora_model_dir {
        train.external.push(PathBuf::from(dir));
    }
    nodes.push(train);
    nodes.push(node(
        "evaluate",
        EVALUATE,
        &EvaluateParams::from_config(config),
        &DeviceSettings { backend: config.backend },
        [vec!["train".to_string(), "pack".to_string()], model_ids].concat(),
    ));
    // A full fine-tune's train stage writes the whole model: nothing to merge, and an `export`
    // node (the merge kind, GGUF only) only when GGUF files are asked for.
    let full = config.is_full_fine_tune();
    if config.merge.enabled && (!full || !config.merge.gguf.is_empty()) {
        nodes.push(node(
            if full { "export" } else { "merge" },
            MERGE,
            &MergeParams::from_config(config),
            &none,
            vec!["train".into(), "fetch.model".into()],
        ));
    }
    for s in &config.stages {
        nodes.push(custom(s)?);
    }
    build(nodes)
}

fn custom(s: &newt_config::CustomStage) -> Result<StageNode, CompileError> {
    let fail = |message: &str| CompileError::Custom { stage: s.name.clone(), message: message.into() };
    if s.name.is_empty() {
        return Err(CompileError::Custom { stage: "?".into(), message: "a custom stage needs a `name`".into() });
    }
    let body = match s.kind.as_str() {
        "command" if s.run.is_some() => serde_json::json!({"run": s.run, "outputs": s.outputs}),
        "sql" if s.sql.is_some() => serde_json::json!({"sql": s.sql}),
        "command" => return Err(fail("kind `command` needs `run`")),
        "sql" => return Err(fail("kind `sql` needs `sql`")),
        other => return Err(fail(&format!("unknown kind `{other}` (custom kinds: command, sql)"))),
    };
    let mut n =
        node(&s.name, &s.kind, &serde_json::json!({ "custom": body }), &serde_json::json!({}), s.inputs.clone());
    n.external = s.files.iter().map(PathBuf::from).collect();
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use newt_config::parse;
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
        let p = pipeline(&format!("{BASE}learning_rate: 0.001\n")).unwrap();
        for n in p.nodes() {
            assert_eq!(n.params.get("learning_rate").is_some(), n.kind == "train", "{}", n.id);
        }
        let t: TrainParams = p.node("train").unwrap().params_as().unwrap();
        assert_eq!(t.learning_rate, 0.001);
    }

    #[test]
    fn train_and_evaluate_see_the_padding_and_the_base_model_name() {
        let p = pipeline(&format!("{BASE}sample_packing: true\nsequence_len: 512\n")).unwrap();
        let t: TrainParams = p.node("train").unwrap().params_as().unwrap();
        assert_eq!(t.pad_to, Some(512), "pad_to_sequence_len defaults to on with sample_packing");
        assert_eq!(t.base_model, "newt:tiny", "adapter_config.json names its base model");
        let e: EvaluateParams = p.node("evaluate").unwrap().params_as().unwrap();
        assert_eq!(e.pad_to, Some(512));
    }

    #[test]
    fn skip_invalid_rows_reaches_tokenize() {
        let p = pipeline(&format!("{BASE}skip_invalid_rows: true\n")).unwrap();
        let t: TokenizeParams = p.node("tokenize.0").unwrap().params_as().unwrap();
        assert!(t.skip_invalid_rows);
    }

    #[test]
    fn fetch_does_not_rerun_for_a_tokenize_only_dataset_setting() {
        let a = pipeline(BASE).unwrap();
        let b =
            pipeline(&BASE.replace("type: alpaca\n", "type: alpaca\n    roles_to_train: [assistant, user]\n")).unwrap();
        assert_eq!(a.node("fetch.0").unwrap().params, b.node("fetch.0").unwrap().params);
        assert_ne!(a.node("tokenize.0").unwrap().params, b.node("tokenize.0").unwrap().params);
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
        let y = "base_model: newt:tiny\nadapter: lora\ndatasets:\n  - path: stage:gen\n    type: completion\nstages:\n  - name: gen\n    kind: command\n    run: echo hi\n    outputs: [data.jsonl]\n";
        let p = pipeline(y).unwrap();
        assert_eq!(p.node("fetch.0").unwrap().inputs, vec!["gen".to_string()]);
        assert!(p.dependents("gen").contains(&"train".to_string()));
    }
}
