//! Merge memory benchmark: peak RSS of `merge_lora` against the bound newt promises,
//! 2 × the largest tensor + the adapter.
//!
//!     # synthetic: 24 f32 tensors of 8192×4096 (3 GiB) + a rank-16 LoRA on each
//!     cargo run -p newt-model --example merge_memory
//!     cargo run -p newt-model --example merge_memory -- --tensors 24 --rows 8192 --cols 4096 --dtype bf16
//!     # a real base folder (e.g. SmolLM2 imported from GGUF) + a rank-16 LoRA on every linear
//!     cargo run -p newt-model --example merge_memory -- --base /path/to/hf_folder
//!
//! The merge runs in a child process so that its VmHWM (peak resident set, /proc/self/status)
//! covers the merge alone, not the generation of the inputs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use newt_model::merge::{MergeOptions, merge_lora};
use newt_model::tensors::{Dtype, ShardedWriter, TensorStore, encode_f32, write_single};

const RANK: usize = 16;

fn vm_hwm_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Deterministic values without holding a tensor in memory.
fn fill(n: usize, seed: u64, mut sink: impl FnMut(&[f32])) {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut buf = Vec::with_capacity(1 << 20);
    for i in 0..n {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        buf.push(((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1);
        if buf.len() == buf.capacity() || i + 1 == n {
            sink(&buf);
            buf.clear();
        }
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn write_synthetic_base(dir: &Path, n: usize, rows: usize, cols: usize, dtype: Dtype) {
    let mut w = ShardedWriter::new(dir, 1 << 30).unwrap();
    for t in 0..n {
        w.begin_tensor(&format!("model.layers.{t}.mlp.up_proj.weight"), dtype, &[rows, cols]).unwrap();
        fill(rows * cols, t as u64 + 1, |c| w.write_chunk(&encode_f32(dtype, c)).unwrap());
        w.end_tensor().unwrap();
    }
    w.finish().unwrap();
    let cfg =
        serde_json::json!({"model_type": "llama", "tie_word_embeddings": false, "torch_dtype": dtype.torch_name()});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
}

/// A rank-16 LoRA on every 2-D `*_proj.weight` of the base.
fn write_adapter(base: &Path, dir: &Path) -> u64 {
    let store = TensorStore::open(base).unwrap();
    let mut tensors = Vec::new();
    for (i, name) in store.names().iter().enumerate() {
        let (_, shape) = store.info(name).unwrap();
        if shape.len() != 2 || !name.ends_with("_proj.weight") {
            continue;
        }
        let module = name.trim_end_matches(".weight");
        for (part, s, seed) in [("lora_A", [RANK, shape[1]], 2 * i), ("lora_B", [shape[0], RANK], 2 * i + 1)] {
            let mut v = Vec::new();
            fill(s[0] * s[1], 1000 + seed as u64, |c| v.extend_from_slice(c));
            tensors.push((
                format!("base_model.model.{module}.{part}.weight"),
                Dtype::F32,
                s.to_vec(),
                encode_f32(Dtype::F32, &v),
            ));
        }
    }
    std::fs::create_dir_all(dir).unwrap();
    write_single(&dir.join("adapter_model.safetensors"), &tensors).unwrap();
    let cfg = serde_json::json!({"peft_type": "LORA", "r": RANK, "lora_alpha": 32, "target_modules": "all-linear"});
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    std::fs::metadata(dir.join("adapter_model.safetensors")).unwrap().len()
}

fn gib(b: u64) -> String {
    format!("{:.3} GiB", b as f64 / (1u64 << 30) as f64)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        let (base, ad, out) = (PathBuf::from(&args[1]), PathBuf::from(&args[2]), PathBuf::from(&args[3]));
        let t = Instant::now();
        let s = merge_lora(&base, &ad, &out, MergeOptions { max_shard_bytes: 1 << 30, out_dtype: None }).unwrap();
        println!("{} {} {:.3} {}", vm_hwm_bytes(), s.n_lora, t.elapsed().as_secs_f64(), s.files.len());
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("newt-merge-bench")
        .tempdir_in(arg(&args, "--dir").unwrap_or_else(|| std::env::temp_dir().display().to_string()))
        .unwrap();
    let t0 = Instant::now();
    let base = match arg(&args, "--base") {
        Some(b) => PathBuf::from(b),
        None => {
            let n = arg(&args, "--tensors").map_or(24, |v| v.parse().unwrap());
            let rows = arg(&args, "--rows").map_or(8192, |v| v.parse().unwrap());
            let cols = arg(&args, "--cols").map_or(4096, |v| v.parse().unwrap());
            let dtype = match arg(&args, "--dtype").as_deref() {
                Some("bf16") => Dtype::BF16,
                Some("f16") => Dtype::F16,
                _ => Dtype::F32,
            };
            let dir = tmp.path().join("base");
            write_synthetic_base(&dir, n, rows, cols, dtype);
            dir
        }
    };
    let adapter = tmp.path().join("adapter");
    let adapter_bytes = write_adapter(&base, &adapter);
    let store = TensorStore::open(&base).unwrap();
    let names = store.names();
    let largest = names.iter().map(|n| store.byte_len(n).unwrap() as u64).max().unwrap();
    let total: u64 = names.iter().map(|n| store.byte_len(n).unwrap() as u64).sum();
    drop(store);
    eprintln!("inputs ready in {:.1}s", t0.elapsed().as_secs_f64());

    let out = tmp.path().join("merged");
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--child", &base.display().to_string(), &adapter.display().to_string(), &out.display().to_string()])
        .output()
        .unwrap();
    assert!(child.status.success(), "merge failed: {}", String::from_utf8_lossy(&child.stderr));
    let line = String::from_utf8_lossy(&child.stdout);
    let f: Vec<&str> = line.split_whitespace().collect();
    let (peak, n_lora, secs): (u64, usize, f64) = (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap());
    let bound = 2 * largest + adapter_bytes;

    // Spot check: row 0 of the first merged tensor equals W + s·B·A.
    let (bs, os) = (TensorStore::open(&base).unwrap(), TensorStore::open(&out).unwrap());
    let an = TensorStore::open_file(&adapter.join("adapter_model.safetensors")).unwrap();
    let name = names.iter().find(|n| n.ends_with("_proj.weight")).unwrap();
    let module = name.trim_end_matches(".weight");
    let (w, m) = (bs.read_f32(name).unwrap(), os.read_f32(name).unwrap());
    let a = an.read_f32(&format!("base_model.model.{module}.lora_A.weight")).unwrap();
    let b = an.read_f32(&format!("base_model.model.{module}.lora_B.weight")).unwrap();
    let cols = bs.info(name).unwrap().1[1];
    let dtype = bs.info(name).unwrap().0;
    let tol = if dtype == Dtype::F32 { 1e-5 } else { 1e-2 };
    let ok = (0..cols).all(|i| {
        let d: f32 = (0..RANK).map(|k| b[k] * a[k * cols + i]).sum();
        (w[i] + 2.0 * d - m[i]).abs() <= tol * (1.0 + m[i].abs())
    });

    println!("base: {} tensors, {} total, largest tensor {}", names.len(), gib(total), gib(largest));
    println!("adapter: rank {RANK} on {n_lora} tensors, {}", gib(adapter_bytes));
    println!("merge: {secs:.1}s ({:.0} MB/s)", total as f64 / secs / 1e6);
    println!(
        "peak RSS (VmHWM) {} vs bound 2×largest + adapter {}: {:.2}× the bound, {}",
        gib(peak),
        gib(bound),
        peak as f64 / bound as f64,
        if peak <= bound { "UNDER" } else { "OVER" }
    );
    println!("spot check row 0 of {name}: {}", if ok { "W + s·B·A" } else { "MISMATCH" });
    if peak > bound || !ok {
        drop(tmp); // process::exit skips destructors: remove the multi-GB inputs first
        std::process::exit(1);
    }
}
