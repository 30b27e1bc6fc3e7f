//! One function per subcommand; shared loading of pipelines and the cache.

mod cache;
mod cluster;
mod dora;
mod kernels;
mod run;
mod serve;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use newt_cache::{Cache, Remote, RemoteMode, RemoteSpec};
use newt_config::{CacheConfig, LoadedConfig, RemoteCacheMode};

use crate::cli::{Cli, Command};

/// Runs the chosen subcommand; returns the exit code.
pub fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    match &cli.command {
        Command::Run { pipeline, only, jobs, executor, coordinator } => {
            run::run(&cli, pipeline, only, *jobs, executor.as_deref(), coordinator.as_deref())
        }
        Command::Fetch { pipeline } => run::fetch(&cli, pipeline),
        Command::Preprocess { pipeline } => run::run(&cli, pipeline, &["pack".to_string()], 4, None, None),
        Command::Train { pipeline } => run::run(&cli, pipeline, &["train".to_string()], 4, None, None),
        Command::Plan { pipeline, gpu_memory, executor } => run::plan(&cli, pipeline, *gpu_memory, executor.as_deref()),
        Command::Cluster { command } => cluster::cluster(&cli, command),
        Command::StageNode { pipeline, stage } => dora::stage_node(&cli, pipeline, stage),
        Command::CollectNode { stages } => dora::collect_node(*stages),
        Command::Why { pipeline, stage } => run::why(&cli, pipeline, stage),
        Command::Cache { command } => cache::cache(&cli, command),
        Command::Inspect { target, pipeline, n } => cache::inspect(&cli, target, pipeline.as_deref(), *n),
        Command::Query { target, sql, pipeline } => cache::query(&cli, target, sql, pipeline.as_deref()),
        Command::MergeLora { pipeline, lora_model_dir } => run::merge_lora(&cli, pipeline, lora_model_dir.as_deref()),
        Command::Inference { pipeline, web: true, base, lora_model_dir, serve: args, .. } => {
            serve::serve(&cli, pipeline, *base, lora_model_dir.as_deref(), args)
        }
        Command::Inference { pipeline, prompt, base, lora_model_dir, max_new_tokens, temperature, .. } => {
            run::inference(
                &cli,
                pipeline,
                prompt.as_deref(),
                *base,
                lora_model_dir.as_deref(),
                *max_new_tokens,
                *temperature,
            )
        }
        Command::Serve { pipeline, base, lora_model_dir, serve: args } => {
            serve::serve(&cli, pipeline, *base, lora_model_dir.as_deref(), args)
        }
        Command::Kernels { backend, shapes, reps, decode: false, .. } => kernels::kernels(&cli, backend, shapes, *reps),
        Command::Kernels { backend, decode: true, model, .. } => kernels::decode(&cli, backend, model.as_deref()),
        Command::ConfigSchema => {
            let schema = schemars::schema_for!(newt_config::Config);
            println!("{}", serde_json::to_string_pretty(&schema)?);
            Ok(0)
        }
    }
}

/// A loaded pipeline with its cache.
pub struct Session {
    /// The parsed config.
    pub loaded: LoadedConfig,
    /// The cache it uses.
    pub cache: Arc<Cache>,
    /// Identity of the pipeline file (for run records).
    pub pipeline_id: String,
    /// The shared remote cache, when one is configured.
    pub remote: Option<Arc<Remote>>,
}

/// Loads a pipeline, prints its warnings, opens its cache.
pub fn session(cli: &Cli, pipeline: &Path) -> anyhow::Result<Session> {
    let mut loaded = newt_config::load(pipeline)?;
    if let Some(n) = cli.gpus {
        loaded.config.gpus = Some(n as usize);
    }
    for w in &loaded.warnings {
        eprintln!("{} {w}", console::style("warning:").yellow().bold());
    }
    if !loaded.ignored.is_empty() {
        let keys: Vec<&str> = loaded.ignored.iter().map(|i| i.key.as_str()).collect();
        eprintln!(
            "{} accepted and ignored: {} (`newt plan` says why)",
            console::style("note:").cyan().bold(),
            keys.join(", ")
        );
    }
    let root = cli
        .cache_dir
        .clone()
        .or_else(|| loaded.config.cache_dir.as_ref().map(|d| loaded.base_dir.join(d)))
        .unwrap_or_else(Cache::default_root);
    let cache = Arc::new(Cache::open(&root)?);
    let abs = std::fs::canonicalize(pipeline).unwrap_or_else(|_| pipeline.to_path_buf());
    let pipeline_id = newt_cache::hash_bytes("newt pipeline id v1", &[abs.to_string_lossy().as_bytes()]).short();
    let remote = remote(cli, Some(&loaded.config.cache))?;
    Ok(Session { loaded, cache, pipeline_id, remote })
}

/// The remote cache: `--remote` / `NEWT_CACHE_REMOTE`, else the pipeline's `cache.remote`; each
/// other setting from its `NEWT_CACHE_*` variable, else the pipeline. `None` when there is none
/// (or the URL is `off`).
pub fn remote(cli: &Cli, config: Option<&CacheConfig>) -> anyhow::Result<Option<Arc<Remote>>> {
    let config = config.cloned().unwrap_or_default();
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let Some(url) = cli.remote.clone().filter(|u| !u.is_empty()).or(config.remote.clone()) else { return Ok(None) };
    if url == "off" {
        return Ok(None);
    }
    let mode = match env("NEWT_CACHE_MODE").as_deref() {
        Some("read") => RemoteMode::Read,
        Some("read-write") => RemoteMode::ReadWrite,
        Some(other) => anyhow::bail!("NEWT_CACHE_MODE=`{other}`: expected `read` or `read-write`"),
        None => match config.mode {
            Some(RemoteCacheMode::ReadWrite) => RemoteMode::ReadWrite,
            Some(RemoteCacheMode::Read) | None => RemoteMode::Read,
        },
    };
    let trusted_writers = match env("NEWT_CACHE_TRUSTED") {
        Some(list) => list.split(',').map(|w| w.trim().to_string()).filter(|w| !w.is_empty()).collect(),
        None => config.trusted_writers.clone(),
    };
    let spec = RemoteSpec {
        url,
        endpoint: env("NEWT_CACHE_ENDPOINT").or(config.endpoint.clone()),
        region: env("NEWT_CACHE_REGION").or(config.region.clone()),
        mode,
        writer: env("NEWT_CACHE_WRITER").or(config.writer.clone()).unwrap_or_else(default_writer),
        trusted_writers,
        secret: env("NEWT_CACHE_SECRET"),
    };
    Ok(Some(Arc::new(Remote::open(&spec)?)))
}

/// `user@host`: the writer name when none is configured.
fn default_writer() -> String {
    let user = std::env::var("USER").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| "newt".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    format!("{user}@{host}")
}

/// The cache for commands without a pipeline.
pub fn open_cache(cli: &Cli) -> anyhow::Result<Cache> {
    Ok(Cache::open(&cli.cache_dir.clone().unwrap_or_else(Cache::default_root))?)
}

/// A path shown relative to the current directory when it is inside it.
pub fn shown(p: &Path) -> String {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    p.strip_prefix(&cwd).unwrap_or(p).display().to_string()
}
