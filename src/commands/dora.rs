//! `newt run --executor dora`, `newt plan --executor dora`, `newt stage-node` and
//! `newt cluster ...`: the pipeline as a dora dataflow (graph/dora).

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use newt_dora::{Deploy, NodeProgram, StageMessage};
use newt_graph::executor::{Executor, LocalExecutor, Outcome, RunReport, materialize};
use newt_graph::{CancelToken, Pipeline};

use super::{Session, session, shown};
use crate::cli::Cli;
use crate::reporter::BarReporter;

/// The coordinator to use: `--coordinator`, else `NEWT_DORA_COORDINATOR` (clap reads it), else
/// dora's default port on this machine.
pub fn coordinator_addr(given: Option<&str>) -> anyhow::Result<SocketAddr> {
    match given {
        Some(a) => a.parse().map_err(|e| anyhow::anyhow!("--coordinator `{a}`: {e} (expected IP:PORT)")),
        None => Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), newt_dora::cluster::COORDINATOR_PORT)),
    }
}

/// What every node runs, and with what environment: the same cache folder and remote cache as
/// this process (on one machine, or a shared filesystem, the nodes then share the local cache;
/// across machines the remote cache carries results).
fn program(cli: &Cli, s: &Session) -> anyhow::Result<NodeProgram> {
    let mut env = BTreeMap::new();
    env.insert("NEWT_CACHE_DIR".to_string(), s.cache.root().display().to_string());
    if let Some(r) = &cli.remote {
        env.insert("NEWT_CACHE_REMOTE".to_string(), r.clone());
    }
    for var in
        ["NEWT_CACHE_ENDPOINT", "NEWT_CACHE_REGION", "NEWT_CACHE_MODE", "NEWT_CACHE_WRITER", "NEWT_CACHE_TRUSTED"]
    {
        if let Ok(v) = std::env::var(var) {
            env.insert(var.to_string(), v);
        }
    }
    Ok(NodeProgram { path: std::env::current_exe()?, pipeline: std::fs::canonicalize(&s.loaded.path)?, env })
}

fn wanted(p: &Pipeline, only: &[String]) -> anyhow::Result<Option<HashSet<String>>> {
    if only.is_empty() { Ok(None) } else { LocalExecutor::wanted(p, Some(only)).map(Some) }
}

/// The pipeline's `deploy:` placements (each must name a stage of the pipeline).
fn overrides(s: &Session, p: &Pipeline) -> anyhow::Result<BTreeMap<String, Deploy>> {
    let mut out = BTreeMap::new();
    for (id, d) in &s.loaded.config.deploy {
        anyhow::ensure!(
            p.node(id).is_some(),
            "deploy: `{id}` is not a stage of this pipeline (stages: {})",
            p.order.join(", ")
        );
        out.insert(id.clone(), Deploy { machine: d.machine.clone(), labels: d.labels.clone() });
    }
    Ok(out)
}

/// `newt plan --executor dora`: the dataflow YAML `newt run --executor dora` would start.
pub fn plan(cli: &Cli, s: &Session, p: &Pipeline) -> anyhow::Result<i32> {
    let yaml = newt_dora::dataflow::dataflow(p, None, &program(cli, s)?, &overrides(s, p)?);
    newt_dora::dataflow::descriptor(&yaml)?;
    print!("{}", serde_yaml::to_string(&yaml)?);
    Ok(0)
}

/// A local executor over this session's cache, allowed to run only `runs_only`.
fn local(cli: &Cli, s: &Session, runs_only: HashSet<String>) -> LocalExecutor {
    LocalExecutor {
        cache: s.cache.clone(),
        registry: Arc::new(newt_stages::registry()),
        reporter: Arc::new(BarReporter::new(true, cli.json)),
        cancel: CancelToken::new(),
        base_dir: s.loaded.base_dir.clone(),
        pipeline_id: s.pipeline_id.clone(),
        pipeline_path: s.loaded.path.display().to_string(),
        max_parallel: 1,
        remote: s.remote.clone(),
        runs_only: Some(runs_only),
    }
}

/// `newt run --executor dora`: starts the dataflow on the coordinator, waits for it, reads each
/// node's message from its log, then reads the results back from the cache (lookup only) for
/// the report and `output_dir`.
pub fn execute(
    cli: &Cli,
    s: &Session,
    p: &Pipeline,
    only: &[String],
    coordinator: SocketAddr,
) -> anyhow::Result<RunReport> {
    let t0 = Instant::now();
    let want = wanted(p, only)?;
    let yaml = newt_dora::dataflow::dataflow(p, want.as_ref(), &program(cli, s)?, &overrides(s, p)?);
    let descriptor = newt_dora::dataflow::descriptor(&yaml)?;
    let ids: Vec<String> = p.order.iter().filter(|id| want.as_ref().is_none_or(|w| w.contains(*id))).cloned().collect();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (result, messages, missing, lost) = rt.block_on(async {
        let mut c = newt_dora::client::Control::connect(coordinator).await?;
        let name = format!("newt-{}", s.pipeline_id);
        // The dataflow's working folder (where daemons keep node logs, `out/<dataflow>/`): in
        // the cache, not the project.
        let work = s.cache.root().join("dora");
        std::fs::create_dir_all(&work)?;
        let uuid = c.start(descriptor, &name, &work).await?;
        eprintln!("dora: dataflow {uuid} started on {coordinator} ({} nodes)", ids.len());
        // Each node's report, read from its log while the dataflow runs (the collector node
        // keeps it open until this loop has them all and stops it).
        let mut messages = BTreeMap::new();
        let mut last_error: BTreeMap<String, String> = BTreeMap::new();
        let daemons = c.daemons().await?;
        let mut lost = None;
        while messages.len() < ids.len() {
            // The logs are read after this check, so a dataflow that ends on its own before
            // every report was read still gets one last read (dora serves a finished
            // dataflow's logs for nodes placed by machine id).
            let running = c.running(uuid).await?;
            if running {
                // dora 1.1 keeps a dataflow running when one of its daemons dies: stop it then.
                let now = c.daemons().await?;
                if let Some(gone) = daemons.iter().find(|d| !now.contains(d)) {
                    lost = Some(gone.clone());
                    break;
                }
            }
            let waiting: Vec<String> = ids.iter().filter(|id| !messages.contains_key(*id)).cloned().collect();
            for id in &waiting {
                match c.logs(uuid, id, 200).await {
                    Ok(log) => {
                        if let Some(m) = StageMessage::from_log(&log) {
                            messages.insert(id.clone(), m);
                        }
                    }
                    Err(e) => {
                        last_error.insert(id.clone(), format!("{e:#}"));
                    }
                }
            }
            if !running {
                break;
            }
            if messages.len() < ids.len() {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
        }
        // A stop that races the dataflow's own end is not an error (see `stop_and_wait`).
        let result = c.stop_and_wait(uuid, std::time::Duration::from_secs(30)).await?;
        if let Some(gone) = &lost {
            for id in ids.iter().filter(|id| !messages.contains_key(*id)) {
                last_error.insert(id.clone(), format!("daemon `{gone}` left the cluster during the run"));
            }
        }
        let missing = ids
            .iter()
            .filter(|id| !messages.contains_key(*id))
            .map(|id| match last_error.get(id) {
                Some(e) => format!("node `{id}` left no report (its log: {e})"),
                None => format!("node `{id}` left no report"),
            })
            .collect::<Vec<_>>();
        anyhow::Ok((result, messages, missing, lost))
    })?;
    // The results, as this machine sees them (pulled from the remote cache when needed).
    let lookup = local(cli, s, HashSet::new());
    let targets: Option<Vec<String>> = (!only.is_empty()).then(|| only.to_vec());
    let mut report = rt.block_on(lookup.run(p, targets.as_deref()))?;
    report.warnings.extend(missing);
    for r in &mut report.stages {
        let node_error = result
            .as_ref()
            .and_then(|res| res.node_results.iter().find(|(n, _)| n.to_string() == r.id))
            .and_then(|(_, res)| res.as_ref().err());
        match messages.get(&r.id) {
            Some(m) => {
                r.seconds = m.seconds;
                let on = m.host.as_ref().map(|h| format!("on {h}")).unwrap_or_else(|| "on its node".into());
                match m.outcome.as_str() {
                    "ran" if r.output.is_some() => {
                        r.outcome = Outcome::Ran;
                        r.remote = Some(format!("ran {on}"));
                    }
                    "hit" | "pulled" if r.output.is_some() => r.remote = Some(format!("{} {on}", m.outcome)),
                    "failed" => r.outcome = Outcome::Failed(m.reason.clone().unwrap_or_else(|| "failed".into())),
                    "skipped" => {
                        r.outcome = Outcome::Skipped;
                        r.remote = m.reason.clone();
                    }
                    _ => {}
                }
            }
            None if r.output.is_none() => {
                let why = match (node_error, lost.as_ref()) {
                    (Some(e), _) => format!("its dora node failed: {e}"),
                    (None, Some(gone)) => format!("daemon `{gone}` left the cluster during the run"),
                    (None, None) => "its dora node left no report".to_string(),
                };
                r.outcome = Outcome::Failed(why);
            }
            None => {}
        }
    }
    eprintln!("dora: dataflow finished in {:.1}s", t0.elapsed().as_secs_f64());
    Ok(report)
}

/// Materializes a finished dora run's outputs as `newt run` does.
pub fn finish(s: &Session, p: &Pipeline, report: &mut RunReport) -> anyhow::Result<()> {
    if report.failure().is_none() && !report.stages.iter().any(|r| r.outcome == Outcome::Skipped) {
        let out = PathBuf::from(&s.loaded.config.output_dir);
        report.materialized = materialize(p, &newt_stages::registry(), report, &out)?;
    }
    Ok(())
}

/// `newt collect-node N`: the dataflow's collector node (graph/dora's `node::collect`).
pub fn collect_node(stages: usize) -> anyhow::Result<i32> {
    newt_dora::node::collect(stages, std::time::Duration::from_secs(3))?;
    Ok(0)
}

/// `newt stage-node PIPELINE STAGE`: one stage as a dora node (started by a daemon).
pub fn stage_node(cli: &Cli, pipeline: &Path, stage: &str) -> anyhow::Result<i32> {
    let s = session(cli, pipeline)?;
    let p = newt_stages::topology::compile(&s.loaded.config)?;
    let node = p.node(stage).ok_or_else(|| anyhow::anyhow!("no stage `{stage}` in {}", shown(pipeline)))?;
    let upstream = node.inputs.clone();
    let message = newt_dora::node::serve(stage, &upstream, |got| {
        let t0 = Instant::now();
        let ex = local(cli, &s, HashSet::from([stage.to_string()]));
        let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => return failed(stage, format!("{e}")),
        };
        let report = match rt.block_on(ex.run(&p, Some(&[stage.to_string()]))) {
            Ok(r) => r,
            Err(e) => return failed(stage, format!("{e:#}")),
        };
        // The upstream results this node used must be the ones their nodes reported.
        for u in &upstream {
            let here = report.stages.iter().find(|r| &r.id == u).and_then(|r| r.output).map(|d| d.to_string());
            if here != got[u].output {
                return failed(
                    stage,
                    format!(
                        "upstream stage `{u}`: its node reported output {}, this machine's cache has {}",
                        got[u].output.as_deref().unwrap_or("none"),
                        here.as_deref().unwrap_or("none")
                    ),
                );
            }
        }
        let Some(r) = report.stages.iter().find(|r| r.id == stage) else {
            return failed(stage, "the stage was not in the run".into());
        };
        let (outcome, reason) = match &r.outcome {
            Outcome::Hit => ("hit", None),
            Outcome::Pulled => ("pulled", None),
            Outcome::Ran => ("ran", None),
            Outcome::Failed(m) => ("failed", Some(m.clone())),
            Outcome::Skipped => ("skipped", Some("an upstream stage has no result on this machine".to_string())),
        };
        for w in &report.warnings {
            eprintln!("warning: {w}");
        }
        StageMessage {
            stage: stage.to_string(),
            outcome: outcome.into(),
            key: r.key.map(|k| k.to_string()),
            output: r.output.map(|o| o.to_string()),
            reason,
            seconds: t0.elapsed().as_secs_f64(),
            host: None,
        }
    })?;
    Ok(if message.outcome == "failed" { crate::exit::FAILURE } else { 0 })
}

fn failed(stage: &str, reason: String) -> StageMessage {
    StageMessage {
        stage: stage.to_string(),
        outcome: "failed".into(),
        key: None,
        output: None,
        reason: Some(reason),
        seconds: 0.0,
        host: None,
    }
}
