//! Benchmark: fetch + tokenize + pack of N generated multi-turn conversations with the SmolLM2
//! tokenizer fixture; prints rows/s, tokens/s and each phase's peak memory (VmHWM, reset
//! between phases).
//!
//! ```text
//! cargo run -p newt-data --example bench_tokenize_pack -- [--rows 100000] [--dir /tmp/newt-bench]
//!     [--sequence-len 2048] [--generate-only]
//! ```
//!
//! The generated `chats.jsonl` is left in `--dir` so that scripts/data_bench_peer.py can run
//! transformers + `datasets.map` on the same data.

use std::path::{Path, PathBuf};
use std::time::Instant;

/// The allocator of the `newt` binary, so the benchmark measures what users run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use newt_config::params::{PackParams, TokenizeParams};
use newt_config::{Config, DatasetConfig, DatasetType};
use newt_data::{FetchOptions, fetch_dataset, pack, tokenize};

const WORDS: &[&str] = &[
    "the", "model", "learns", "a", "quick", "answer", "about", "rust", "data", "token", "while", "training", "on",
    "many", "examples", "and", "then", "it", "explains", "why", "memory", "stays", "flat", "because", "batches",
    "stream", "through", "each", "stage", "of", "pipeline", "with", "care", "Paris", "is", "capital", "France", "2024",
    "numbers", "like", "42", "or", "3.14", "appear", "too", "question", "should",
];

/// A deterministic pseudo-random generator (SplitMix64), so both benchmarks see the same data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// A sentence of `min` to `min + spread - 1` words.
    fn sentence(&mut self, min: u64, spread: u64) -> String {
        let words = min + self.below(spread);
        let s: Vec<&str> = (0..words).map(|_| WORDS[self.below(WORDS.len() as u64) as usize]).collect();
        let text = s.join(" ");
        text[..1].to_uppercase() + &text[1..] + "."
    }
}

fn generate(path: &Path, rows: usize) -> std::io::Result<()> {
    use std::io::Write;
    let mut rng = Rng(42);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for _ in 0..rows {
        let mut messages = Vec::new();
        if rng.below(2) == 0 {
            messages.push(serde_json::json!({"role": "system", "content": rng.sentence(8, 12)}));
        }
        for _ in 0..1 + rng.below(4) {
            let user: Vec<String> = (0..1 + rng.below(3)).map(|_| rng.sentence(6, 14)).collect();
            let assistant: Vec<String> = (0..1 + rng.below(6)).map(|_| rng.sentence(8, 20)).collect();
            messages.push(serde_json::json!({"role": "user", "content": user.join(" ")}));
            messages.push(serde_json::json!({"role": "assistant", "content": assistant.join(" ")}));
        }
        writeln!(out, "{}", serde_json::json!({ "messages": messages }))?;
    }
    out.flush()
}

/// Peak resident memory of this process (Linux VmHWM), in MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Resident memory now, in MiB (Linux VmRSS).
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Starts a new peak: resets VmHWM to the current RSS (Linux: `5` into /proc/self/clear_refs),
/// so that [`peak_rss_mib`] after a phase is that phase's own peak. Returns the RSS it starts at.
fn reset_peak() -> f64 {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    rss_mib()
}

/// CPU seconds (user + system) this process has used so far, all threads (Linux /proc).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: f64 =
        fields.get(11..13).map(|f| f.iter().filter_map(|x| x.parse::<f64>().ok()).sum()).unwrap_or(f64::NAN);
    ticks / 100.0
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut rows = 100_000usize;
    let mut dir = PathBuf::from("/tmp/newt-bench");
    let mut sequence_len = 2048usize;
    let mut generate_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rows" => rows = args.next().ok_or("--rows N")?.parse()?,
            "--dir" => dir = PathBuf::from(args.next().ok_or("--dir PATH")?),
            "--sequence-len" => sequence_len = args.next().ok_or("--sequence-len N")?.parse()?,
            "--generate-only" => generate_only = true,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2");
    std::fs::create_dir_all(&dir)?;
    let data = dir.join("chats.jsonl");
    generate(&data, rows)?;
    let mb = std::fs::metadata(&data)?.len() as f64 / 1e6;
    println!("data        {rows} conversations, {mb:.1} MB jsonl ({})", data.display());
    if generate_only {
        return Ok(());
    }
    let ds = DatasetConfig {
        path: data.display().to_string(),
        type_: Some(DatasetType::ChatTemplate),
        ..Default::default()
    };
    let cfg = Config { sequence_len, sample_packing: true, val_set_size: 0.01, ..Default::default() };
    let _ = std::fs::remove_dir_all(dir.join("out"));

    let fetch_base = reset_peak();
    let t = Instant::now();
    let f = fetch_dataset(&ds, &[data], &dir.join("out/fetch"), &FetchOptions::default())?;
    let fetch_s = t.elapsed().as_secs_f64();
    let fetch_rss = peak_rss_mib();
    let tok_base = reset_peak();
    let t = Instant::now();
    let cpu0 = cpu_seconds();
    let tk = tokenize(
        &dir.join("out/fetch/data.parquet"),
        &TokenizeParams::from_config(&cfg, &ds),
        &model,
        &dir.join("out/tokenize"),
    )?;
    let tok_s = t.elapsed().as_secs_f64();
    let tok_rss = peak_rss_mib();
    let pack_base = reset_peak();
    let t = Instant::now();
    let p = pack(
        &[dir.join("out/tokenize/tokens.parquet")],
        &[],
        &PackParams::from_config(&cfg, vec![], vec![]),
        &dir.join("out/pack"),
    )?;
    let pack_s = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let pack_rss = peak_rss_mib();
    let threads = newt_data::io::cores();

    println!("threads     {threads}");
    println!("fetch       {:.2} s  {:.0} rows/s", fetch_s, f.rows as f64 / fetch_s);
    println!(
        "tokenize    {:.2} s  {:.0} rows/s  {:.0} tokens/s  ({} samples, {} tokens, {} dropped)",
        tok_s,
        tk.rows as f64 / tok_s,
        tk.tokens as f64 / tok_s,
        tk.samples,
        tk.tokens,
        tk.dropped_too_long + tk.dropped_too_short + tk.dropped_untrained
    );
    println!(
        "pack        {:.2} s  {:.0} samples/s  ({} rows, efficiency {:.3}, {} val rows)",
        pack_s,
        (p.samples + p.val_samples) as f64 / pack_s,
        p.rows,
        p.efficiency,
        p.val_rows
    );
    let total = tok_s + pack_s;
    println!(
        "tokenize+pack {:.2} s  {:.0} rows/s  {:.0} tokens/s",
        total,
        tk.rows as f64 / total,
        tk.tokens as f64 / total
    );
    println!("cpu time    {:.2} s for tokenize+pack  {:.0} rows per CPU-second", cpu, tk.rows as f64 / cpu);
    println!(
        "peak RSS    fetch {fetch_rss:.0} MiB, tokenize {tok_rss:.0} MiB, pack {pack_rss:.0} MiB \
         (VmHWM of the whole process during each phase; RSS at the start of each: {fetch_base:.0}, {tok_base:.0}, {pack_base:.0} MiB)"
    );
    Ok(())
}
