//! `newt run | plan | why | merge-lora | inference`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use newt_graph::executor::{Executor, LocalExecutor, Outcome, RunReport, materialize};
use newt_graph::{CancelToken, Pipeline};

use super::{Session, session, shown};
use crate::cli::Cli;
use crate::exit;
use crate::reporter::BarReporter;

fn compiled(s: &Session) -> anyhow::Result<Pipeline> {
    Ok(newt_stages::topology::compile(&s.loaded.config)?)
}

/// Says which Hub downloads a run will make (repository, files, bytes) before it starts.
fn print_downloads(s: &Session, to_stdout: bool, json: bool) -> anyhow::Result<()> {
    let downloads = newt_stages::hub::planned_downloads(&s.loaded.config, &s.loaded.base_dir)?;
    for d in downloads {
        if json {
            let mut e = serde_json::to_value(&d)?;
            e["event"] = "download".into();
            eprintln!("{e}");
            continue;
        }
        let line = if d.files == 0 {
            format!("hub: {} is in the Hugging Face cache", d.repo)
        } else {
            format!("hub: download {} ({} files, {})", d.repo, d.files, newt_stages::hub::human(d.bytes))
        };
        let line = match &d.note {
            Some(n) => format!("{line} [{n}]"),
            None => line,
        };
        if to_stdout {
            println!("{line}");
        } else {
            eprintln!("{line}");
        }
    }
    Ok(())
}

/// `newt fetch`: the fetch stages only.
pub fn fetch(cli: &Cli, pipeline: &Path) -> anyhow::Result<i32> {
    let s = session(cli, pipeline)?;
    let p = compiled(&s)?;
    let targets: Vec<String> = p.nodes().filter(|n| n.kind.starts_with("fetch_")).map(|n| n.id.clone()).collect();
    print_downloads(&s, false, cli.json)?;
    let report = execute(cli, &s, &p, &targets, 4)?;
    print_report(cli, &report)?;
    Ok(report_code(&report))
}

/// Runs the pipeline (or the stages `only` needs) and prints the end-of-run table.
pub fn run(
    cli: &Cli,
    pipeline: &Path,
    only: &[String],
    jobs: usize,
    executor: Option<&str>,
    coordinator: Option<&str>,
) -> anyhow::Result<i32> {
    let s = session(cli, pipeline)?;
    let p = compiled(&s)?;
    print_downloads(&s, false, cli.json)?;
    let report = if uses_dora(&s, executor) {
        let mut report = super::dora::execute(cli, &s, &p, only, super::dora::coordinator_addr(coordinator)?)?;
        for w in &report.warnings {
            eprintln!("{} {w}", console::style("warning:").yellow().bold());
        }
        super::dora::finish(&s, &p, &mut report)?;
        report
    } else {
        execute(cli, &s, &p, only, jobs)?
    };
    print_report(cli, &report)?;
    let code = report_code(&report);
    if code == exit::TERMINATED || code == exit::INTERRUPTED {
        let why = if code == exit::TERMINATED { "SIGTERM" } else { "Ctrl-C" };
        eprintln!(
            "stopped by {why}: finished stages are cached and train kept a checkpoint; `newt run {}` resumes",
            shown(pipeline)
        );
    }
    Ok(code)
}

/// Whether this run goes to a dora cluster: `--executor`, else the pipeline's `executor:`.
fn uses_dora(s: &Session, executor: Option<&str>) -> bool {
    match executor {
        Some(e) => e == "dora",
        None => s.loaded.config.executor == newt_config::ExecutorKind::Dora,
    }
}

/// The exit code a report means: 128 + the signal's number when a signal stopped the run
/// (130 for Ctrl-C, 143 for SIGTERM), whichever stage it stopped.
pub fn report_code(report: &RunReport) -> i32 {
    let stopped = report.failure().is_some() || report.stages.iter().any(|s| s.outcome == Outcome::Skipped);
    match report.signal {
        Some(signo) if stopped => 128 + signo,
        _ if report.failure().is_some() => exit::FAILURE,
        _ => 0,
    }
}

/// Executes a compiled pipeline with progress bars and Ctrl-C handling; materializes outputs.
pub fn execute(cli: &Cli, s: &Session, p: &Pipeline, only: &[String], jobs: usize) -> anyhow::Result<RunReport> {
    let out = PathBuf::from(&s.loaded.config.output_dir);
    if out.exists() && !out.is_dir() {
        anyhow::bail!("output_dir {}: it is a file, not a folder; no stage was run", shown(&out));
    }
    let registry = Arc::new(newt_stages::registry());
    let reporter = Arc::new(BarReporter::new(cli.quiet, cli.json));
    let cancel = CancelToken::new();
    let executor = LocalExecutor {
        cache: s.cache.clone(),
        registry: registry.clone(),
        reporter: reporter.clone(),
        cancel: cancel.clone(),
        base_dir: s.loaded.base_dir.clone(),
        pipeline_id: s.pipeline_id.clone(),
        pipeline_path: std::fs::canonicalize(&s.loaded.path)
            .unwrap_or_else(|_| s.loaded.path.clone())
            .display()
            .to_string(),
        max_parallel: jobs,
        remote: s.remote.clone(),
        runs_only: None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let targets = if only.is_empty() { None } else { Some(only) };
    let mut report = rt.block_on(async {
        tokio::spawn(stop_on_signals(cancel.clone()));
        executor.run(p, targets).await
    })?;
    report.signal = cancel.signal();
    for w in &report.warnings {
        newt_graph::executor::Reporter::warn(reporter.as_ref(), w);
    }
    drop(reporter);
    if report.failure().is_none() {
        report.materialized = materialize(p, &registry, &report, &out)?;
    }
    Ok(report)
}

/// The first Ctrl-C or SIGTERM stops the run cooperatively: running stages stop at their next
/// check (train after the current step, saving a checkpoint), no partial result is kept, and
/// staging folders are removed. A second signal exits at once.
async fn stop_on_signals(cancel: CancelToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        return;
    };
    let signo = tokio::select! {
        _ = int.recv() => 2,
        _ = term.recv() => 15,
    };
    let what = if signo == 2 { "interrupted" } else { "terminated (SIGTERM)" };
    eprintln!(
        "\n{what}: stopping running stages (train saves a checkpoint first; no partial result is kept); \
         a second Ctrl-C or SIGTERM quits at once"
    );
    cancel.cancel_by_signal(signo);
    let again = tokio::select! {
        _ = int.recv() => 2,
        _ = term.recv() => 15,
    };
    std::process::exit(128 + again);
}

fn print_report(cli: &Cli, report: &RunReport) -> anyhow::Result<()> {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    println!("{:<16} {:<8} {:>9}  output", "stage", "result", "time");
    for s in &report.stages {
        let result = match &s.outcome {
            Outcome::Hit => console::style("hit").green().to_string(),
            Outcome::Pulled => console::style("pulled").green().to_string(),
            Outcome::Ran => console::style("ran").cyan().to_string(),
            Outcome::Failed(_) => console::style("FAILED").red().bold().to_string(),
            Outcome::Skipped => console::style("skipped").dim().to_string(),
        };
        let pad = 8usize.saturating_sub(console::measure_text_width(&result));
        let digest = s.output.map(|d| d.short()).unwrap_or_else(|| "-".into());
        let note = s.remote.as_ref().map(|r| format!("  ({r})")).unwrap_or_default();
        println!("{:<16} {result}{:pad$} {:>8.2}s  {digest}{note}", s.id, "", s.seconds);
    }
    for s in &report.stages {
        if let Outcome::Failed(m) = &s.outcome {
            eprintln!("{} stage `{}` failed: {m}", console::style("error:").red().bold(), s.id);
        }
    }
    for m in &report.materialized {
        eprintln!("wrote {}", shown(m));
    }
    Ok(())
}

/// `newt plan`: each stage, key prefix, hit or miss, and why.
pub fn plan(cli: &Cli, pipeline: &Path, gpu_memory: Option<u64>, executor: Option<&str>) -> anyhow::Result<i32> {
    let s = session(cli, pipeline)?;
    let p = compiled(&s)?;
    if executor == Some("dora") {
        return super::dora::plan(cli, &s, &p);
    }
    let registry = newt_stages::registry();
    // The remote cache, when there is one, is asked for each key the local cache lacks.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let remote_failed = std::cell::Cell::new(false);
    let ask = |key: &newt_cache::Digest| -> Option<newt_cache::Digest> {
        let remote = s.remote.as_ref()?;
        if remote_failed.get() {
            return None;
        }
        match rt.block_on(remote.output_of(key)) {
            Ok(output) => output,
            Err(e) => {
                eprintln!("{} {e}", console::style("warning:").yellow().bold());
                remote_failed.set(true);
                None
            }
        }
    };
    let entries = newt_graph::why::plan_with_remote(&p, &registry, &s.cache, &s.loaded.base_dir, &s.pipeline_id, &ask)?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(0);
    }
    print_ignored(&s.loaded.ignored);
    print_downloads(&s, true, false)?;
    print_world(&p);
    print_memory(&s, &p, &entries, gpu_memory);
    if let Some(remote) = &s.remote {
        let mode = if remote.mode() == newt_cache::RemoteMode::ReadWrite { "read-write" } else { "read" };
        println!("remote cache: {} ({mode})", remote.url());
    }
    println!("{:<16} {:<12} {:<14} why", "stage", "key", "cache");
    for e in &entries {
        let key = e.key.map(|k| k.short()).unwrap_or_else(|| "?".into());
        let state = if e.hit {
            console::style("hit").green().to_string()
        } else if e.remote {
            console::style("in remote").green().to_string()
        } else {
            console::style("will run").yellow().to_string()
        };
        let pad = 14usize.saturating_sub(console::measure_text_width(&state));
        println!("{:<16} {:<12} {state}{:pad$} {}", e.id, key, "", e.reasons.first().cloned().unwrap_or_default());
        for r in e.reasons.iter().skip(1) {
            println!("{:<16} {:<12} {:<14} {r}", "", "", "");
        }
    }
    Ok(0)
}

/// The train stage's replicas and the rows each optimizer step sees.
fn print_world(p: &Pipeline) {
    let Some(train) = p.node("train") else { return };
    let (Ok(params), Ok(settings)) = (
        train.params_as::<newt_config::params::TrainParams>(),
        train.settings_as::<newt_config::params::TrainSettings>(),
    ) else {
        return;
    };
    let w = settings.world_size;
    let (mbs, global) = (params.micro_batch_size, params.gradient_accumulation_steps);
    // `auto` trains on the CPU when the driver reports no GPU.
    let on_cpu = match settings.device.backend {
        newt_config::Backend::Cpu => true,
        newt_config::Backend::Auto => newt_model::backend::cuda_device_count() == 0,
        _ => false,
    };
    let place = match (on_cpu, w > 1) {
        (true, true) => "replicas in threads on the CPU",
        (true, false) => "on the CPU",
        (false, true) => "one replica per GPU",
        (false, false) => "one GPU",
    };
    println!(
        "train: world size {w}, {place}; effective batch {} rows per step = micro_batch_size {mbs} × \
         gradient_accumulation_steps {} × {w}",
        mbs * global,
        global / w.max(1)
    );
    if let Some(full) = &params.full {
        let which = if full.unfrozen_parameters.is_empty() {
            "every weight trains".to_string()
        } else {
            format!("only the weights unfrozen_parameters names train ({})", full.unfrozen_parameters.join(", "))
        };
        println!("train: full fine-tune (`adapter` unset): {which}; the train stage writes the model folder, no merge");
    }
}

/// The memory the train stage will need per replica, from the model's shape: its config.json
/// in the cache (fetch.model has run) or in a local model folder. Against a GPU (`gpu_memory`,
/// else the one detected when the backend is CUDA), a run that will not fit says so, with what
/// each of the usual remedies would need, cheapest first.
fn print_memory(s: &Session, p: &Pipeline, entries: &[newt_graph::why::PlanEntry], gpu_memory: Option<u64>) {
    use newt_config::params::{TrainParams, TrainSettings};
    use newt_model::memory::gib;
    let Some(train) = p.node("train") else { return };
    let (Ok(params), Ok(mut settings)) = (train.params_as::<TrainParams>(), train.settings_as::<TrainSettings>())
    else {
        return;
    };
    let cached = entries.iter().find(|e| e.id == "fetch.model" && e.hit).and_then(|e| e.key).and_then(|key| {
        let m = s.cache.lookup(&key).ok()?.manifest?;
        Some(s.cache.object_path(&m.output))
    });
    let local = s.loaded.base_dir.join(&s.loaded.config.base_model);
    let dir = cached.or_else(|| local.join("config.json").is_file().then_some(local));
    let Some(model) = dir.and_then(|d| newt_model::config::ModelConfig::from_dir(&d).ok()) else {
        println!(
            "train memory: estimated once fetch.model has run (`newt run {} --only fetch.model`)",
            shown(&s.loaded.path)
        );
        return;
    };
    // A GPU size given on the command line asks about CUDA, wherever plan runs.
    if gpu_memory.is_some() {
        settings.device.backend = newt_config::Backend::Cuda;
    }
    let on_cuda = gpu_memory.is_some()
        || newt_stages::model::backend_of(settings.device.backend)
            .is_ok_and(|b| b != newt_model::backend::ResolvedBackend::Cpu);
    let seq = s.loaded.config.sequence_len;
    let estimate = |params: &TrainParams, settings: &TrainSettings, seq: usize| {
        let double_quant = params.quantization.double_quant(&s.loaded.config);
        newt_stages::model::memory_estimate(&model, params, settings, seq, on_cuda, double_quant).ok()
    };
    let Some(e) = estimate(&params, &settings, seq) else { return };
    println!(
        "train memory (estimate, per {}): weights {} + gradients {} + AdamW state {} + activations {}{} = {} \
         ({:.1}M weights train{})",
        if on_cuda { "GPU" } else { "process" },
        gib(e.weights),
        gib(e.gradients),
        gib(e.optimizer),
        gib(e.activations),
        newt_model::memory::runtime_part(&e),
        gib(e.total()),
        e.trained_params as f64 / 1e6,
        if settings.gradient_checkpointing { ", gradient checkpointing" } else { "" }
    );
    // A checkpoint is written from host copies of every trained weight and its two moments.
    println!(
        "train memory: writing a checkpoint also holds {} of host memory (trained weights and AdamW moments, f32)",
        gib(e.trained_params * 12)
    );
    let Some(device) = gpu_memory.or_else(|| on_cuda.then(newt_model::backend::cuda_device_memory).flatten()) else {
        return;
    };
    if e.total() <= device {
        println!("train memory: fits a GPU of {} ({} left)", gib(device), gib(device - e.total()));
        if newt_model::memory::nearly_full(e.total(), device) {
            println!("train memory: warning: within 10% of the GPU's memory; {}", newt_model::memory::NEARLY_FULL);
        }
        return;
    }
    println!("train memory: will not fit a GPU of {}; what each change would need:", gib(device));
    let c = &s.loaded.config;
    let world = settings.world_size;
    let with = |f: &dyn Fn(&mut newt_config::Config)| {
        let mut c2 = c.clone();
        f(&mut c2);
        let (p2, mut s2) = (TrainParams::on_replicas(&c2, world), TrainSettings::on_replicas(&c2, world));
        s2.device = settings.device.clone();
        estimate(&p2, &s2, c2.sequence_len)
    };
    let mut remedies: Vec<(String, Option<newt_model::memory::MemoryEstimate>)> = Vec::new();
    if params.micro_batch_size > 1 {
        remedies.push(("micro_batch_size: 1".into(), with(&|c| c.micro_batch_size = 1)));
    }
    if !settings.gradient_checkpointing {
        remedies.push((
            "gradient_checkpointing: true".into(),
            with(&|c| c.gradient_checkpointing = newt_config::BoolOrString::Bool(true)),
        ));
    }
    if params.quantization == newt_config::params::BaseQuantization::None {
        remedies.push(("adapter: qlora".into(), with(&|c| c.adapter = Some(newt_config::Adapter::Qlora))));
    }
    if seq > 256 {
        remedies.push((format!("sequence_len: {}", seq / 2), with(&|c| c.sequence_len = seq / 2)));
    }
    for (change, est) in remedies {
        if let Some(est) = est {
            let verdict = if est.total() <= device { "fits" } else { "still too big" };
            println!("  {change:<30} {}  ({verdict})", gib(est.total()));
        }
    }
}

/// The Axolotl keys the pipeline sets that newt accepts and ignores, grouped by reason.
fn print_ignored(ignored: &[newt_config::axolotl::Ignored]) {
    if ignored.is_empty() {
        return;
    }
    let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
    for i in ignored {
        match groups.iter_mut().find(|(r, _)| *r == i.reason) {
            Some((_, keys)) => keys.push(&i.key),
            None => groups.push((i.reason, vec![&i.key])),
        }
    }
    println!("accepted and ignored ({} keys):", ignored.len());
    for (reason, keys) in groups {
        println!("  {}: {reason}", keys.join(", "));
    }
    println!();
}

/// `newt why STAGE`.
pub fn why(cli: &Cli, pipeline: &Path, stage: &str) -> anyhow::Result<i32> {
    let s = session(cli, pipeline)?;
    let p = compiled(&s)?;
    let registry = newt_stages::registry();
    let entries = newt_graph::why::why(&p, &registry, &s.cache, &s.loaded.base_dir, &s.pipeline_id, stage)?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(0);
    }
    for e in entries.iter().rev() {
        let key = e.key.map(|k| k.short()).unwrap_or_else(|| "(not yet known)".into());
        if e.hit {
            println!("{}: cache hit (key {key})", e.id);
            continue;
        }
        println!("{}: will run (key {key})", e.id);
        for r in &e.reasons {
            println!("  {r}");
        }
    }
    Ok(0)
}

/// `newt merge-lora`: the merge stage (and what it needs), or a merge of an adapter made elsewhere.
pub fn merge_lora(cli: &Cli, pipeline: &Path, lora_model_dir: Option<&Path>) -> anyhow::Result<i32> {
    let s = session(cli, pipeline)?;
    let p = compiled(&s)?;
    if let Some(dir) = lora_model_dir {
        // Run fetch.model, then merge the given adapter directly into output_dir/merged.
        let report = execute(cli, &s, &p, &["fetch.model".to_string()], 4)?;
        let model = report.stages.iter().find(|r| r.id == "fetch.model").and_then(|r| r.path.clone());
        let Some(model) = model else {
            print_report(cli, &report)?;
            return Ok(report_code(&report));
        };
        let out = PathBuf::from(&s.loaded.config.output_dir).join("merged");
        let params = newt_config::params::MergeParams::from_config(&s.loaded.config);
        newt_stages::merge::merge_external(&model, dir, &out, &params)?;
        println!("merged {} into {}", shown(dir), shown(&out));
        return Ok(0);
    }
    if p.node("merge").is_none() {
        anyhow::bail!(
            "this pipeline trains no adapter (`adapter:` is unset) or `merge.enabled` is false: nothing to merge"
        );
    }
    run(cli, pipeline, &["merge".to_string()], 4, None, None)
}

/// `newt inference`: generation with the base model and, unless `--base`, the cached adapter.
pub fn inference(
    cli: &Cli,
    pipeline: &Path,
    prompt: Option<&str>,
    base: bool,
    lora_model_dir: Option<&Path>,
    max_new_tokens: usize,
    temperature: f32,
) -> anyhow::Result<i32> {
    let s = session(cli, pipeline)?;
    let (model, quantized, adapter) = model_and_adapter(cli, &s, base, lora_model_dir)?;
    let c = &s.loaded.config;
    let params = newt_config::params::EvaluateParams::from_config(c);
    newt_stages::evaluate::chat(
        &model,
        quantized.as_deref(),
        adapter.as_deref(),
        &params,
        c.backend,
        prompt,
        max_new_tokens,
        temperature,
    )?;
    Ok(0)
}

/// The base model's folder (fetched when not cached), its quantized base when the pipeline has
/// one (quantized when not cached), and the adapter to use with them: the pipeline's trained
/// adapter (which must be in the cache), `lora_model_dir`, or none (`base`).
pub fn model_and_adapter(
    cli: &Cli,
    s: &Session,
    base: bool,
    lora_model_dir: Option<&Path>,
) -> anyhow::Result<(PathBuf, Option<PathBuf>, Option<PathBuf>)> {
    let p = compiled(s)?;
    if let Some(dir) = lora_model_dir
        && !dir.join("adapter_config.json").is_file()
    {
        anyhow::bail!("--lora-model-dir {}: no adapter_config.json there (a PEFT adapter folder)", dir.display());
    }
    // The pipeline's own adapter unless the base model or another adapter was asked for.
    let own_adapter = !base && lora_model_dir.is_none();
    let mut targets = vec!["fetch.model".to_string()];
    // A quantized base is loaded from its artifact (quantized now if it is not cached).
    if p.node("quantize.model").is_some() {
        targets.push("quantize.model".into());
    }
    if own_adapter {
        targets.push("train".into());
    }
    // The base model is fetched when it is not cached; a missing adapter is said, not trained
    // behind the user's back.
    if own_adapter {
        let registry = newt_stages::registry();
        let plan = newt_graph::why::plan(&p, &registry, &s.cache, &s.loaded.base_dir, &s.pipeline_id)?;
        if !plan.iter().any(|e| e.id == "train" && e.hit) {
            let full = p.node("train").and_then(|n| n.params_as::<newt_config::params::TrainParams>().ok());
            let what = if full.is_some_and(|t| t.full.is_some()) { "model" } else { "adapter" };
            anyhow::bail!(
                "the trained {what} is not in the cache yet: run `newt run {}` first (or pass --base)",
                shown(&s.loaded.path)
            );
        }
    }
    let report = execute(cli, s, &p, &targets, 1)?;
    let dir = |id: &str| report.stages.iter().find(|r| r.id == id).and_then(|r| r.path.clone());
    let model = dir("fetch.model").ok_or_else(|| anyhow::anyhow!("base model unavailable"))?;
    let adapter = match lora_model_dir {
        Some(d) => Some(d.to_path_buf()),
        None if base => None,
        None => dir("train"),
    };
    Ok((model, dir("quantize.model"), adapter))
}
