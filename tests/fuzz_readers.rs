//! Property-based fuzzing of every reader of user input, with a fixed budget: the pipeline
//! YAML loader, the dataset readers (JSON Lines, JSON, CSV, Parquet), config.json, GGUF import
//! and safetensors. Inputs are the repo's own files, mutated by a seeded generator (byte flips,
//! inserted structure characters and huge numbers, cut and duplicated spans, mostly in the
//! header where parsers decide sizes). The property: every input gives `Ok` or an `Err` with a
//! message, in bounded time, never a panic (an abort on allocation would end the test process,
//! which fails it as well).
//!
//! `NEWT_FUZZ_ITERS` sets the inputs per reader (default 400, about a second per reader; CI uses the default). A failure
//! prints the seed and iteration, and writes the input to `$TMPDIR/newt-fuzz-<reader>-<i>`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SEED: u64 = 0x6e65_7774_fa22;
/// The longest one input may take to be accepted or refused.
const PER_INPUT: Duration = Duration::from_secs(10);

fn iterations() -> usize {
    std::env::var("NEWT_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(400)
}

/// SplitMix64: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Tokens that make parsers decide sizes, depths and types.
const SPICE: &[&[u8]] = &[
    b"[",
    b"{",
    b"]",
    b"}",
    b":",
    b",",
    b"\"",
    b"\n",
    b"- ",
    b"&a ",
    b"*a",
    b"!!binary ",
    b"~",
    b"null",
    b"-1",
    b"0",
    b"1e999",
    b"18446744073709551615",
    b"4294967295",
    b"9223372036854775807",
    b".nan",
    b"\xff\xff\xff\xff",
    b"\x00\x00\x00\x00",
    b"\xff\xff\xff\xff\xff\xff\xff\x7f",
    b"'",
    b"\\u0000",
];

/// One to four mutations of `seed`; positions fall in the first `head` bytes four times in five.
fn mutate(rng: &mut Rng, seed: &[u8], head: usize) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let span = if rng.below(5) < 4 { head.min(v.len()).max(1) } else { v.len().max(1) };
        let at = rng.below(span).min(v.len());
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = at.min(v.len() - 1);
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = at.min(v.len() - 1);
                v[i] = rng.next() as u8;
            }
            2 => {
                let s = SPICE[rng.below(SPICE.len())];
                let times = if rng.below(4) == 0 { 1 + rng.below(2000) } else { 1 };
                let ins: Vec<u8> = s.iter().copied().cycle().take(s.len() * times).collect();
                v.splice(at..at, ins);
            }
            3 => {
                let end = (at + 1 + rng.below(64)).min(v.len());
                v.drain(at..end);
            }
            4 => {
                let end = (at + 1 + rng.below(64)).min(v.len());
                let dup = v[at..end].to_vec();
                v.splice(at..at, dup);
            }
            _ => v.truncate(at),
        }
    }
    v
}

/// Runs `check` on `iterations()` mutants of each seed; a panic or a slow input fails, naming
/// the input (saved to a temp file).
fn fuzz(reader: &str, seeds: &[Vec<u8>], head: usize, check: &dyn Fn(&[u8]) -> Result<(), String>) {
    let mut rng = Rng(SEED ^ reader.len() as u64 ^ (reader.as_bytes()[0] as u64) << 32);
    let (mut ok, mut refused) = (0, 0);
    for i in 0..iterations() {
        let seed = &seeds[i % seeds.len()];
        let input = mutate(&mut rng, seed, head);
        let t0 = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| check(&input)));
        let took = t0.elapsed();
        let save = || {
            let p = std::env::temp_dir().join(format!("newt-fuzz-{reader}-{i}"));
            std::fs::write(&p, &input).unwrap();
            p
        };
        match result {
            Err(_) => panic!("{reader}: input {i} (seed {SEED:#x}) panicked; saved to {}", save().display()),
            Ok(Err(msg)) if msg.trim().is_empty() => {
                panic!("{reader}: input {i} was refused with an empty message; saved to {}", save().display())
            }
            Ok(Err(_)) => refused += 1,
            Ok(Ok(())) => ok += 1,
        }
        assert!(took < PER_INPUT, "{reader}: input {i} took {took:?}; saved to {}", save().display());
    }
    eprintln!("{reader}: {ok} accepted, {refused} refused with a message, no panic");
    assert!(refused > 0, "{reader}: no mutant was refused: the mutations do not reach the parser");
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn pipeline_yaml_loader() {
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    for dir in [root().join("pipelines"), root().join("tests/fixtures/axolotl")] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yml" || e == "yaml"))
            .collect();
        files.sort();
        seeds.extend(files.iter().take(12).map(|f| std::fs::read(f).unwrap()));
    }
    assert!(!seeds.is_empty());
    let path = root().join("pipelines/fuzz.yml");
    fuzz("yaml", &seeds, usize::MAX, &|bytes| {
        let text = String::from_utf8_lossy(bytes);
        newt_config::load::parse(&text, &path).map(|_| ()).map_err(|e| e.to_string())
    });
}

/// The quickstart's dataset config, pointed at nothing yet.
fn dataset_config(field: Option<&str>) -> newt_config::DatasetConfig {
    let text = std::fs::read_to_string(root().join("pipelines/quickstart.yml")).unwrap();
    let mut ds =
        newt_config::load::parse(&text, &root().join("pipelines/quickstart.yml")).unwrap().config.datasets[0].clone();
    ds.field = field.map(String::from);
    ds
}

#[test]
fn dataset_readers() {
    let jsonl = std::fs::read_to_string(root().join("pipelines/data/quickstart.jsonl")).unwrap();
    let rows: Vec<&str> = jsonl.lines().take(8).collect();
    let json_array = format!("[{}]", rows.join(",\n"));
    let wrapped = format!("{{\"data\": [{}]}}", rows.join(","));
    let csv = "text,label\n\"hello, world\",1\nplain,2\n\"multi\nline\",3\n";
    let dir = tempfile::tempdir().unwrap();
    let chat = dataset_config(None);
    let mut completion = dataset_config(Some("text"));
    completion.type_ = Some(newt_config::DatasetType::Completion);
    let n = std::sync::atomic::AtomicUsize::new(0);
    for (name, ext, seed, ds) in [
        ("jsonl", "jsonl", rows.join("\n").into_bytes(), &chat),
        ("json", "json", json_array.into_bytes(), &chat),
        ("json-data", "json", wrapped.into_bytes(), &chat),
        ("csv", "csv", csv.as_bytes().to_vec(), &completion),
    ] {
        fuzz(name, &[seed], usize::MAX, &|bytes| {
            let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let file = dir.path().join(format!("in-{i}.{ext}"));
            std::fs::write(&file, bytes).unwrap();
            let out = dir.path().join(format!("out-{i}"));
            std::fs::create_dir_all(&out).unwrap();
            let r = newt_data::fetch_dataset(ds, &[file.clone()], &out, &Default::default());
            std::fs::remove_dir_all(&out).ok();
            std::fs::remove_file(&file).ok();
            r.map(|_| ()).map_err(|e| e.to_string())
        });
    }
}

#[test]
fn parquet_dataset_reader() {
    // A real Parquet file: fetch's own output for the quickstart rows.
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset_config(None);
    let src = root().join("pipelines/data/quickstart.jsonl");
    let out = dir.path().join("seed");
    std::fs::create_dir_all(&out).unwrap();
    newt_data::fetch_dataset(&ds, &[src], &out, &Default::default()).unwrap();
    let seed = std::fs::read(out.join(newt_data::DATA_FILE)).unwrap();
    let n = std::sync::atomic::AtomicUsize::new(0);
    // Parquet's metadata is at the end: mutate anywhere.
    fuzz("parquet", &[seed], usize::MAX, &|bytes| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = dir.path().join(format!("in-{i}.parquet"));
        std::fs::write(&file, bytes).unwrap();
        let out = dir.path().join(format!("out-{i}"));
        std::fs::create_dir_all(&out).unwrap();
        let r = newt_data::fetch_dataset(&ds, &[file.clone()], &out, &Default::default());
        std::fs::remove_dir_all(&out).ok();
        std::fs::remove_file(&file).ok();
        r.map(|_| ()).map_err(|e| e.to_string())
    });
}

/// A tiny model folder (config, tokenizer, safetensors) made by newt itself.
fn tiny_model(dir: &Path) -> PathBuf {
    let m = dir.join("tiny");
    let spec = newt_model::tiny::TinySpec {
        seed: 1,
        vocab_size: 300,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 1,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 256,
    };
    let text = std::fs::read_to_string(root().join("pipelines/data/quickstart.jsonl")).unwrap();
    newt_model::tiny::write_tiny_model(&m, &spec, &[text]).unwrap();
    m
}

#[test]
fn model_config_json() {
    let dir = tempfile::tempdir().unwrap();
    let seed = std::fs::read(tiny_model(dir.path()).join("config.json")).unwrap();
    let path = dir.path().join("config.json");
    fuzz("config.json", &[seed], usize::MAX, &|bytes| {
        let text = String::from_utf8_lossy(bytes);
        newt_model::config::ModelConfig::from_json_str(&text, &path).map(|_| ()).map_err(|e| e.to_string())
    });
}

#[test]
fn safetensors_reader() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let seed = std::fs::read(model.join("model.safetensors")).unwrap();
    let header = 8 + u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    fuzz("safetensors", &[seed], header, &|bytes| {
        std::fs::write(work.join("model.safetensors"), bytes).unwrap();
        let store = newt_model::tensors::TensorStore::open(&work).map_err(|e| e.to_string())?;
        for name in store.names() {
            store.read_f32(&name).map_err(|e| e.to_string())?;
        }
        Ok(())
    });
}

#[test]
fn gguf_import() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let gguf = dir.path().join("tiny.gguf");
    newt_model::gguf::export_gguf(&model, &gguf, newt_model::gguf::GgufType::F32).unwrap();
    let seed = std::fs::read(&gguf).unwrap();
    let n = std::sync::atomic::AtomicUsize::new(0);
    // The metadata (architecture, sizes, vocabulary) comes first; tensor data after it.
    fuzz("gguf", &[seed], 16 << 10, &|bytes| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = dir.path().join(format!("in-{i}.gguf"));
        std::fs::write(&file, bytes).unwrap();
        let out = dir.path().join(format!("out-{i}"));
        let r = newt_model::gguf::import_to_hf(&file, &out);
        std::fs::remove_dir_all(&out).ok();
        std::fs::remove_file(&file).ok();
        r.map(|_| ()).map_err(|e| e.to_string())
    });
}

/// Sets the u32 value of GGUF metadata key `key` in `bytes` (the key's length-prefixed name, its
/// type tag, then the value).
fn patch_gguf_u32(bytes: &mut [u8], key: &str, value: u32) {
    let mut needle = (key.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(key.as_bytes());
    let at = bytes.windows(needle.len()).position(|w| w == needle.as_slice()).expect("key present") + needle.len();
    assert_eq!(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()), 4, "{key} is a u32");
    bytes[at + 4..at + 8].copy_from_slice(&value.to_le_bytes());
}

#[test]
fn gguf_sizes_of_zero_or_beyond_any_model_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let gguf = dir.path().join("tiny.gguf");
    newt_model::gguf::export_gguf(&model, &gguf, newt_model::gguf::GgufType::F32).unwrap();
    let seed = std::fs::read(&gguf).unwrap();
    for (key, value) in
        [("llama.attention.head_count", 0), ("llama.block_count", 1_000_000), ("llama.embedding_length", 0)]
    {
        let mut bytes = seed.clone();
        patch_gguf_u32(&mut bytes, key, value);
        let file = dir.path().join("patched.gguf");
        std::fs::write(&file, &bytes).unwrap();
        let e = newt_model::gguf::import_to_hf(&file, &dir.path().join("out")).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains("outside the sizes newt accepts"), "{key}: {e}");
    }
}
