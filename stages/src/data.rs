//! Data stages: `fetch_dataset`, `tokenize`, `pack`, and the `sql` custom stage.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use newt_config::params::{FetchDatasetParams, PackParams, TokenizeParams};
use newt_graph::compile::StageNode;
use newt_graph::{Stage, StageContext};
use newt_hub::RepoKind;

use crate::hub;

/// Reads one dataset into Parquet with normalized columns.
pub struct FetchDataset;

impl Stage for FetchDataset {
    fn kind(&self) -> &'static str {
        "fetch_dataset"
    }
    fn version(&self) -> u32 {
        1
    }
    fn external_inputs(&self, node: &StageNode, base_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
        let ds = node.params_as::<FetchDatasetParams>()?.dataset;
        if ds.path.starts_with("stage:") || newt_data::is_hub_dataset(&ds, base_dir) {
            return Ok(Vec::new());
        }
        Ok(newt_data::source_files(&ds, base_dir)?)
    }
    fn remote_inputs(&self, node: &StageNode, base_dir: &Path) -> anyhow::Result<BTreeMap<String, String>> {
        let ds = node.params_as::<FetchDatasetParams>()?.dataset;
        if !newt_data::is_hub_dataset(&ds, base_dir) {
            return Ok(BTreeMap::new());
        }
        let d = newt_data::hub::resolve(&ds, &newt_hub::Hub::from_env()?)?;
        let mut remote: BTreeMap<String, String> =
            hub::remote_inputs(RepoKind::Dataset, &d.id, &d.commit, &d.files).into_iter().collect();
        if d.revision == newt_data::hub::PARQUET_CONVERSION {
            remote.insert(hub::REMOTE_CONVERTED.into(), d.revision);
        }
        Ok(remote)
    }
    fn required_outputs(&self, _: &StageNode) -> Vec<String> {
        vec!["data.parquet".into()]
    }
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<serde_json::Value> {
        let FetchDatasetParams { dataset: mut ds, skip_invalid_rows } = ctx.node.params_as()?;
        let files = match ds.path.strip_prefix("stage:") {
            Some(stage) => {
                // A custom stage's output folder is the dataset.
                let dir = ctx.input(stage)?.to_path_buf();
                ds.path = dir.display().to_string();
                newt_data::source_files(&ds, Path::new("/"))?
            }
            None => match hub::parse_remote(&ctx.remote)? {
                Some((id, commit, files)) => {
                    let revision = match ctx.remote.get(hub::REMOTE_CONVERTED) {
                        Some(r) => r.clone(),
                        None => ds.revision.clone().unwrap_or_else(|| "main".into()),
                    };
                    let d = newt_data::hub::HubDataset {
                        id: id.clone(),
                        revision,
                        commit,
                        files: files.into_iter().map(|f| (f.path, f.size)).collect(),
                        note: None,
                    };
                    let progress = hub::Downloading::new(ctx.progress.as_ref(), format!("dataset {id}"));
                    newt_data::hub::download(&d, &newt_hub::Hub::from_env()?, &progress)?
                }
                None => ctx.external.clone(),
            },
        };
        let opts = newt_data::FetchOptions { skip_invalid_rows };
        let s = newt_data::fetch_dataset(&ds, &files, &ctx.out_dir, &opts)?;
        Ok(serde_json::to_value(&s)?)
    }
}

/// Tokenizes one fetched dataset with the model's tokenizer and chat template.
pub struct Tokenize;

impl Stage for Tokenize {
    fn kind(&self) -> &'static str {
        "tokenize"
    }
    fn version(&self) -> u32 {
        1
    }
    fn required_outputs(&self, _: &StageNode) -> Vec<String> {
        vec!["tokens.parquet".into()]
    }
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<serde_json::Value> {
        let params: TokenizeParams = ctx.node.params_as()?;
        let fetch = ctx
            .node
            .inputs
            .iter()
            .find(|i| i.starts_with("fetch.") && *i != "fetch.model")
            .expect("compile gives tokenize a fetch input");
        let data = ctx.input(fetch)?.join("data.parquet");
        let model = ctx.input("fetch.model")?;
        let s = newt_data::tokenize::tokenize_cancellable(&data, &params, model, &ctx.out_dir, ctx.cancel.flag())?;
        // The artifact carries its tokenizer so `newt inspect` can decode it on its own.
        std::fs::copy(model.join("tokenizer.json"), ctx.out_dir.join("tokenizer.json"))?;
        for w in &s.warnings {
            ctx.progress.println(format!("warning: {w}"));
        }
        Ok(serde_json::to_value(&s)?)
    }
}

/// Merges, shuffles, splits and packs the tokenized datasets.
pub struct Pack;

impl Stage for Pack {
    fn kind(&self) -> &'static str {
        "pack"
    }
    fn version(&self) -> u32 {
        1
    }
    fn required_outputs(&self, _: &StageNode) -> Vec<String> {
        vec!["train.parquet".into(), "val.parquet".into()]
    }
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<serde_json::Value> {
        let params: PackParams = ctx.node.params_as()?;
        let list = |ids: &[String]| -> anyhow::Result<Vec<PathBuf>> {
            ids.iter().map(|id| Ok(ctx.input(id)?.join("tokens.parquet"))).collect()
        };
        let train = list(&params.train_inputs)?;
        let s = newt_data::pack(&train, &list(&params.test_inputs)?, &params, &ctx.out_dir)?;
        if let Some(tok) = train.first().and_then(|t| t.parent()).map(|d| d.join("tokenizer.json")) {
            std::fs::copy(tok, ctx.out_dir.join("tokenizer.json"))?;
        }
        Ok(serde_json::to_value(&s)?)
    }
}

/// DataFusion SQL over upstream artifacts, producing a dataset.
pub struct Sql;

impl Stage for Sql {
    fn kind(&self) -> &'static str {
        "sql"
    }
    fn version(&self) -> u32 {
        1
    }
    fn required_outputs(&self, _: &StageNode) -> Vec<String> {
        vec!["data.parquet".into()]
    }
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<serde_json::Value> {
        let sql = ctx.node.params["custom"]["sql"].as_str().ok_or_else(|| anyhow::anyhow!("`sql` is missing"))?;
        let mut tables = Vec::new();
        for (id, dir) in &ctx.inputs {
            let name = id.replace(['.', '-'], "_");
            let file = ["data.parquet", "tokens.parquet", "train.parquet"]
                .iter()
                .map(|f| dir.join(f))
                .find(|p| p.exists())
                .unwrap_or_else(|| dir.clone());
            tables.push((name, file));
        }
        let s = newt_data::run_sql(&tables, sql, &ctx.out_dir)?;
        Ok(serde_json::to_value(&s)?)
    }
}
