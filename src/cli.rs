//! Command-line arguments (clap derive).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Fine-tune LLMs from one YAML file: a content-addressed stage graph (fetch → tokenize → pack →
/// train → evaluate → merge) where a rerun only runs what changed.
#[derive(Debug, Parser)]
#[command(name = "newt", version, about, propagate_version = true)]
pub struct Cli {
    /// Cache directory (default: $NEWT_CACHE_DIR, then `cache_dir:` in the pipeline, then the user cache dir).
    #[arg(long, global = true, env = "NEWT_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Shared remote cache, `s3://bucket/prefix` (default: $NEWT_CACHE_REMOTE, then `cache.remote`
    /// in the pipeline; `off` turns it off). See README, "A shared cache".
    #[arg(long, global = true, env = "NEWT_CACHE_REMOTE", value_name = "URL")]
    pub remote: Option<String>,
    /// Data-parallel replicas of the train stage (default: $NEWT_GPUS, then `gpus:` in the
    /// pipeline, then every visible GPU; 1 on the CPU). `gradient_accumulation_steps` counts
    /// per replica, as in Axolotl.
    #[arg(long, global = true, env = "NEWT_GPUS", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub gpus: Option<u32>,
    /// Print machine-readable JSON on stdout instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bars (plain log lines on stderr).
    #[arg(long, short, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the pipeline: every stage whose inputs changed; everything else is a cache hit.
    Run {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Run only these stages (and what they need).
        #[arg(long = "only", value_name = "STAGE")]
        only: Vec<String>,
        /// Stages run at once at most.
        #[arg(long, short = 'j', default_value_t = 4)]
        jobs: usize,
        /// Where stages run: `local` (this process) or `dora` (one node per stage on a dora
        /// cluster's daemons; see `newt cluster up`). Default: the pipeline's `executor:`.
        #[arg(long, value_parser = ["local", "dora"])]
        executor: Option<String>,
        /// The dora coordinator, IP:PORT (default: $NEWT_DORA_COORDINATOR, then 127.0.0.1:6013).
        #[arg(long, env = "NEWT_DORA_COORDINATOR", value_name = "IP:PORT")]
        coordinator: Option<String>,
    },
    /// Show what `run` would do, and why, without doing it.
    Plan {
        /// The pipeline file.
        pipeline: PathBuf,
        /// `dora`: print the dora dataflow `newt run --executor dora` would start, instead.
        #[arg(long, value_parser = ["local", "dora"])]
        executor: Option<String>,
        /// Check the train stage's memory estimate against a GPU of this size (`24GiB`, `80GB`,
        /// `16000MiB`) instead of the one detected; the estimate is then for CUDA (bf16).
        #[arg(long = "gpu-memory", value_name = "SIZE", value_parser = parse_size)]
        gpu_memory: Option<u64>,
    },
    /// Explain why a stage is (not) a cache hit: a diff of its key inputs against its last result.
    Why {
        /// The pipeline file.
        pipeline: PathBuf,
        /// The stage id (`train`, `tokenize.0`, ...).
        stage: String,
    },
    /// Run only the fetch stages: download Hub models and datasets into the Hugging Face cache
    /// (on a login node with internet, before a job on an offline GPU node).
    Fetch {
        /// The pipeline file.
        pipeline: PathBuf,
    },
    /// Run up to `pack` (Axolotl's `preprocess`).
    Preprocess {
        /// The pipeline file.
        pipeline: PathBuf,
    },
    /// Run up to `train` (Axolotl's `train`).
    Train {
        /// The pipeline file.
        pipeline: PathBuf,
    },
    /// Merge the trained adapter (or `--lora-model-dir`) into the base model.
    MergeLora {
        /// The pipeline file.
        pipeline: PathBuf,
        /// An adapter made elsewhere (PEFT folder) instead of the pipeline's own.
        #[arg(long)]
        lora_model_dir: Option<PathBuf>,
    },
    /// Chat with the model: the trained adapter when the cache has one (`--base` for the base model).
    Inference {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Answer this prompt and exit (otherwise a REPL).
        #[arg(long)]
        prompt: Option<String>,
        /// Use the base model without the adapter.
        #[arg(long)]
        base: bool,
        /// An adapter made elsewhere (PEFT folder) instead of the pipeline's own, as Axolotl's
        /// `inference --lora-model-dir`.
        #[arg(long, conflicts_with = "base")]
        lora_model_dir: Option<PathBuf>,
        /// Tokens to generate at most.
        #[arg(long, default_value_t = 256)]
        max_new_tokens: usize,
        /// Sampling temperature (0 = greedy).
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Chat in the browser instead: `newt serve` (Axolotl's `--gradio`).
        #[arg(long, conflicts_with = "prompt")]
        web: bool,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Serve the model over HTTP: an OpenAI-compatible API (`/v1/chat/completions`,
    /// `/v1/completions`, `/v1/models`) and a chat page at `/`. The trained adapter and the base
    /// model are two model names; a request picks one.
    Serve {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Serve the base model only.
        #[arg(long)]
        base: bool,
        /// Serve this adapter (PEFT folder) instead of the pipeline's own.
        #[arg(long, conflicts_with = "base")]
        lora_model_dir: Option<PathBuf>,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Look inside an artifact: a stage id (of the latest run) or a digest prefix.
    Inspect {
        /// Stage id or digest prefix.
        target: String,
        /// Resolve stage ids within this pipeline only: its current result, else its last
        /// run's; an error when the stage never ran for it.
        #[arg(long, short)]
        pipeline: Option<PathBuf>,
        /// Samples to show (tokenize/pack artifacts).
        #[arg(short, default_value_t = 3)]
        n: usize,
    },
    /// Run DataFusion SQL over a Parquet artifact (tables: its files, named by file stem).
    Query {
        /// Stage id or digest prefix.
        target: String,
        /// The SQL.
        sql: String,
        /// Resolve stage ids within this pipeline only: its current result, else its last
        /// run's; an error when the stage never ran for it.
        #[arg(long, short)]
        pipeline: Option<PathBuf>,
    },
    /// Inspect and prune the cache.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Print the JSON Schema of the pipeline file.
    ConfigSchema,
    /// Run a dora-rs coordinator and daemons for the dora executor (`newt run --executor dora`).
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// The dora executor's collector node (what the daemons start beside the stage nodes).
    #[command(hide = true)]
    CollectNode {
        /// How many stage nodes send to it.
        stages: usize,
    },
    /// One stage of a pipeline as a dora node (what the dora executor's daemons start).
    #[command(hide = true)]
    StageNode {
        /// The pipeline file.
        pipeline: PathBuf,
        /// The stage id.
        stage: String,
    },
    /// Check newt's fast kernels against their Burn references on this machine, and time them.
    Kernels {
        /// auto, cuda or cpu.
        #[arg(long, default_value = "auto")]
        backend: String,
        /// A linear to check, `tokens,in,out` (repeatable; default: the SmolLM2-135M and
        /// Llama-3.2-1B linears at 4×2048 tokens, and 8192³).
        #[arg(long = "shape", value_name = "T,IN,OUT")]
        shapes: Vec<String>,
        /// Timed calls per measurement.
        #[arg(long, default_value_t = 20)]
        reps: usize,
        /// Only the decoding step (`newt serve`'s): as one operation against the model's layers
        /// in Burn operations, on two small random models with LoRA adapters (head_dim 64 and
        /// 128), or on `--model`.
        #[arg(long)]
        decode: bool,
        /// With `--decode`: a model folder (config.json + safetensors) to check and time instead.
        #[arg(long, value_name = "DIR", requires = "decode")]
        model: Option<std::path::PathBuf>,
    },
}

/// `newt cluster ...`: dora-rs coordinator and daemons inside the newt binary.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// A coordinator and daemons on this machine (loopback only, zenoh multicast off), until
    /// Ctrl-C: for trying the dora executor and for tests. Real clusters run `newt cluster
    /// coordinator` on one machine and `newt cluster daemon` on each.
    Up {
        /// Coordinator port.
        #[arg(long, default_value_t = newt_dora::cluster::COORDINATOR_PORT)]
        port: u16,
        /// One daemon per flag, with its labels (`cpu`, `gpu`, `cpu,gpu`, `zone=eu`); default one
        /// daemon labelled `cpu,gpu`.
        #[arg(long = "daemon", value_name = "LABELS")]
        daemons: Vec<String>,
    },
    /// A coordinator (what daemons and `newt run --executor dora` connect to).
    Coordinator {
        /// Address to bind.
        #[arg(long, default_value = "0.0.0.0")]
        bind: std::net::IpAddr,
        /// Port.
        #[arg(long, default_value_t = newt_dora::cluster::COORDINATOR_PORT)]
        port: u16,
    },
    /// A daemon: runs the nodes the coordinator places on this machine.
    Daemon {
        /// The coordinator, IP:PORT.
        #[arg(long, default_value = "127.0.0.1:6013")]
        coordinator: std::net::SocketAddr,
        /// This machine's id (what `deploy: {STAGE: {machine: ...}}` names).
        #[arg(long)]
        machine_id: String,
        /// Labels (`gpu`, `cpu`, `zone=eu`; a bare name means `=true`).
        #[arg(long, default_value = "")]
        labels: String,
        /// Port its nodes connect to (distinct per daemon on one machine).
        #[arg(long, default_value_t = 53291)]
        local_port: u16,
        /// Where its zenoh listener binds, IP:PORT (default: derived from the coordinator's address).
        #[arg(long)]
        zenoh_listen: Option<std::net::SocketAddr>,
        /// Other daemons' zenoh endpoints to dial (`tcp/10.0.0.2:5000`, repeatable).
        #[arg(long)]
        zenoh_connect: Vec<String>,
        /// Zenoh without multicast scouting.
        #[arg(long)]
        no_multicast: bool,
    },
}

/// `newt cache ...`
#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// List cached results (`--from-remote`: the remote cache's, and whether this machine has each).
    Ls {
        /// List the remote cache (`--remote URL`, `NEWT_CACHE_REMOTE`, or `-p`'s `cache.remote`).
        #[arg(long)]
        from_remote: bool,
        /// With `--from-remote`: the pipeline whose remote to list.
        #[arg(long, short, requires = "from_remote")]
        pipeline: Option<PathBuf>,
    },
    /// Show one result: manifest and files.
    Show {
        /// Digest (or key) prefix.
        digest: String,
    },
    /// Delete what no pipeline's latest run uses and nothing pins.
    Gc {
        /// List what would go, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Keep an artifact through gc.
    Pin {
        /// Digest prefix.
        digest: String,
        /// A name for the pin.
        name: String,
    },
    /// Remove a pin.
    Unpin {
        /// The pin's name.
        name: String,
    },
    /// Upload results to the remote cache (`--remote` or the pipeline's `cache.remote`, in
    /// mode read-write): the named ones, else the pipeline's latest run, else (`--all`) every one.
    Push {
        /// Digest or key prefixes.
        digests: Vec<String>,
        /// The pipeline whose remote and latest run to use.
        #[arg(long, short)]
        pipeline: Option<PathBuf>,
        /// Every valid result in the local cache.
        #[arg(long, conflicts_with = "digests")]
        all: bool,
    },
    /// Download results from the remote cache into the local one (verified against their
    /// digests): the named ones (key or output digest prefixes), or (`--all`) every one.
    Pull {
        /// Digest or key prefixes.
        digests: Vec<String>,
        /// The pipeline whose remote to use.
        #[arg(long, short)]
        pipeline: Option<PathBuf>,
        /// Every result the remote has that is not local yet.
        #[arg(long, conflicts_with = "digests")]
        all: bool,
    },
    /// Re-read every cached result and compare it with its digest.
    Verify {
        /// Remove damaged results (their stages run again next time).
        #[arg(long)]
        repair: bool,
    },
}

/// Options of `newt serve` (and `newt inference --web`).
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on [default: the pipeline's `gradio_server_name`, else 127.0.0.1].
    /// Any other than loopback needs `--api-key` or `--insecure`.
    #[arg(long)]
    pub host: Option<std::net::IpAddr>,
    /// Port [default: the pipeline's `gradio_server_port`, else 8000; 0 picks a free one].
    #[arg(long)]
    pub port: Option<u16>,
    /// Requests must send `Authorization: Bearer <key>`.
    #[arg(long, env = "NEWT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Listen beyond loopback without an API key.
    #[arg(long)]
    pub insecure: bool,
    /// Requests that may wait for the generation worker; more get 503 with Retry-After.
    #[arg(long, default_value_t = 16)]
    pub queue: usize,
    /// Requests decoded together, one token each per step (a request arriving meanwhile joins
    /// at the next step); 1 answers them one after another.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Prompt tokens read a step: a long prompt is read over several steps, and the answers
    /// already streaming get a token at each of them; 0 reads a whole prompt at once.
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
}

/// A memory size: a number with an optional unit (B, KB, MB, GB, TB in powers of 1000; KiB, MiB,
/// GiB, TiB in powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("`{s}`: expected a size such as 24GiB or 80GB"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => (1u64 << 30) as f64,
        "tib" => (1u64 << 40) as f64,
        other => return Err(format!("`{s}`: unknown unit `{other}` (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")),
    };
    let bytes = n * scale;
    if !bytes.is_finite() || bytes < 1.0 {
        return Err(format!("`{s}`: a size must be at least 1 byte"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_read_with_decimal_and_binary_units() {
        assert_eq!(parse_size("24GiB"), Ok(24 << 30));
        assert_eq!(parse_size("80GB"), Ok(80_000_000_000));
        assert_eq!(parse_size("1.5 MiB"), Ok(3 << 19));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "GiB", "12 parsecs", "0", "-3GB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
