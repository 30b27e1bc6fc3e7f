//! `newt serve` (and `newt inference --web`): the pipeline's model behind an OpenAI-compatible
//! API and a chat page.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use super::run::model_and_adapter;
use super::{session, shown};
use crate::cli::{Cli, ServeArgs};

/// Axolotl's `gradio_*` keys, read from the pipeline file (they change no stage's result, so
/// they are in no stage's key).
#[derive(Debug, Default)]
struct Gradio {
    title: Option<String>,
    server_name: Option<IpAddr>,
    server_port: Option<u16>,
    max_new_tokens: Option<usize>,
    temperature: Option<f32>,
}

fn gradio(path: &Path) -> anyhow::Result<Gradio> {
    let text = std::fs::read_to_string(path)?;
    let v: serde_yaml::Value = serde_yaml::from_str(&text)?;
    let get = |k: &str| v.get(k).filter(|x| !x.is_null());
    let bad = |k: &str, what: &str| anyhow::anyhow!("{}: `{k}` must be {what}", shown(path));
    let mut g = Gradio::default();
    if let Some(t) = get("gradio_title") {
        g.title = Some(t.as_str().ok_or_else(|| bad("gradio_title", "a string"))?.to_string());
    }
    if let Some(h) = get("gradio_server_name") {
        let h = h.as_str().ok_or_else(|| bad("gradio_server_name", "an IP address"))?;
        g.server_name = Some(match h {
            "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
            h => h.parse().map_err(|_| bad("gradio_server_name", "an IP address (e.g. 127.0.0.1 or 0.0.0.0)"))?,
        });
    }
    if let Some(p) = get("gradio_server_port") {
        g.server_port = Some(
            p.as_u64().and_then(|p| u16::try_from(p).ok()).ok_or_else(|| bad("gradio_server_port", "a port number"))?,
        );
    }
    if let Some(n) = get("gradio_max_new_tokens") {
        g.max_new_tokens =
            Some(n.as_u64().filter(|&n| n >= 1).ok_or_else(|| bad("gradio_max_new_tokens", "a positive integer"))?
                as usize);
    }
    if let Some(t) = get("gradio_temperature") {
        g.temperature = Some(
            t.as_f64()
                .filter(|t| (0.0..=2.0).contains(t))
                .ok_or_else(|| bad("gradio_temperature", "a number in [0, 2]"))? as f32,
        );
    }
    Ok(g)
}

/// Serves until Ctrl-C or SIGTERM.
pub fn serve(
    cli: &Cli,
    pipeline: &Path,
    base: bool,
    lora_model_dir: Option<&Path>,
    args: &ServeArgs,
) -> anyhow::Result<i32> {
    let s = session(cli, pipeline)?;
    let g = gradio(pipeline)?;
    let host = args.host.or(g.server_name).unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    if !host.is_loopback() && args.api_key.is_none() && !args.insecure {
        anyhow::bail!(
            "listening on {host} lets other machines use this model: pass --api-key KEY (or set NEWT_API_KEY) \
             so that requests must send it, or --insecure to allow anyone"
        );
    }
    if args.queue == 0 {
        anyhow::bail!("--queue must be at least 1");
    }
    if args.batch == 0 {
        anyhow::bail!("--batch must be at least 1");
    }
    let port = args.port.or(g.server_port).unwrap_or(8000);
    let (model, quantized, adapter) = model_and_adapter(cli, &s, base, lora_model_dir)?;
    let c = &s.loaded.config;

    // Model names: the adapter (the default) and the base model.
    let base_name = c.base_model.clone();
    let mut names = Vec::new();
    if let Some(dir) = &adapter {
        let stem = match lora_model_dir {
            Some(_) => dir.file_name().map(|f| f.to_string_lossy().to_string()),
            None => pipeline.file_stem().map(|f| f.to_string_lossy().to_string()),
        };
        let mut name = stem.unwrap_or_else(|| "adapter".into());
        if name == base_name {
            name.push_str("-lora");
        }
        names.push(name);
    }
    names.push(base_name);

    // Load the model before listening: a request never meets a half-loaded server.
    let params = newt_config::params::EvaluateParams::from_config(c);
    let (jobs_tx, jobs_rx) = tokio::sync::mpsc::channel(args.queue);
    let stats = Arc::new(newt_serve::Stats::default());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let worker = {
        let stats = stats.clone();
        let (backend, max_sequences, prefill_chunk) = (c.backend, args.batch, args.prefill_chunk);
        std::thread::Builder::new().name("newt-generate".into()).spawn(move || {
            let models = newt_stages::serve::Models {
                model: &model,
                quantized: quantized.as_deref(),
                adapter: adapter.as_deref(),
                params: &params,
                backend,
                max_sequences,
                prefill_chunk,
            };
            newt_stages::serve::run_worker(models, jobs_rx, stats, ready_tx)
        })?
    };
    eprintln!("newt serve: loading {} …", names.join(" and "));
    let context = match ready_rx.recv() {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => return Err(e.context("loading the model to serve")),
        Err(_) => anyhow::bail!("the generation worker stopped while loading the model"),
    };
    let config = newt_serve::ServerConfig {
        models: names.clone(),
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        default_max_tokens: g.max_new_tokens.unwrap_or(256),
        page: newt_serve::PageSettings {
            title: g.title.unwrap_or_else(|| format!("newt · {}", names[0])),
            max_new_tokens: g.max_new_tokens.unwrap_or(256),
            temperature: g.temperature.unwrap_or(0.7),
        },
    };
    let router = newt_serve::router(config, jobs_tx, stats);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(host, port))
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {host}:{port}: {e}"))?;
        let addr = listener.local_addr()?;
        let url = match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => format!("http://127.0.0.1:{}", addr.port()),
            _ => format!("http://{addr}"),
        };
        eprintln!(
            "newt serve: {} ({context}-token context) on {:?}\n  chat page:  {url}/\n  OpenAI API: {url}/v1  \
             (models: {})\nnewt serve: listening on {addr}",
            names.join(" and "),
            c.backend,
            names.join(", ")
        );
        newt_serve::serve(listener, router, shutdown_signal()).await?;
        anyhow::Ok(())
    })?;
    // The router (and with it the queue's sender) is gone: the worker ends after its job.
    let _ = worker.join();
    eprintln!("newt serve: stopped");
    Ok(0)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}
