//! The hostile-input corpus: one case per kind of bad input a probe found (issue "Hostile
//! input"), each run through the `newt` binary under an address-space limit and a time limit.
//! Every case must exit non-zero (2 for a bad pipeline file, 1 for bad data or models) with a
//! message naming the place, within the bounds: no abort, no hang, no allocation storm.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Address space each run may map (KiB for `ulimit -v`): the quickstart needs well under 2 GiB
/// resident, but thread stacks and allocator arenas reserve address space generously.
const ADDRESS_SPACE_KIB: u64 = 8 << 20;
/// Wall time each case may take.
const TIME_LIMIT: Duration = Duration::from_secs(90);

/// A fresh project: the quickstart's data and pipeline (one epoch) in a temp dir.
fn project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::copy(root.join("pipelines/data/quickstart.jsonl"), dir.path().join("data/quickstart.jsonl")).unwrap();
    let yaml = std::fs::read_to_string(root.join("pipelines/quickstart.yml")).unwrap();
    std::fs::write(dir.path().join("p.yml"), yaml.replace("num_epochs: 8", "num_epochs: 1")).unwrap();
    dir
}

fn edit(dir: &Path, rel: &str, from: &str, to: &str) {
    let p = dir.join(rel);
    let text = std::fs::read_to_string(&p).unwrap();
    assert!(text.contains(from), "{rel} lacks {from}");
    std::fs::write(&p, text.replacen(from, to, 1)).unwrap();
}

/// Runs `newt args` in `dir` under the limits; returns (exit code, stderr).
fn newt_bounded(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let bin = env!("CARGO_BIN_EXE_newt");
    let script = format!("ulimit -v {ADDRESS_SPACE_KIB}; exec \"$0\" \"$@\"");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(bin)
        .args(args)
        .current_dir(dir)
        .env("NEWT_CACHE_DIR", dir.join("cache"))
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut s).ok();
        s
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > TIME_LIMIT {
            child.kill().ok();
            child.wait().ok();
            panic!("newt {args:?} still running after {TIME_LIMIT:?}: a hang");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = reader.join().unwrap();
    (status.code(), err)
}

/// Runs the case and checks the exit code and that every `needle` is in the message.
fn expect(dir: &Path, args: &[&str], code: i32, needles: &[&str]) {
    let (got, err) = newt_bounded(dir, args);
    assert_eq!(got, Some(code), "newt {args:?}: expected exit {code}, stderr:\n{err}");
    assert!(!err.contains("panicked"), "a panic: {err}");
    for n in needles {
        assert!(err.contains(n), "newt {args:?}: `{n}` not in the message:\n{err}");
    }
    let manifests = dir.join("cache/v1/tmp");
    assert_eq!(std::fs::read_dir(&manifests).map(|d| d.count()).unwrap_or(0), 0, "staging left behind");
}

#[test]
fn yaml_nested_without_end_is_refused_before_parsing() {
    let d = project();
    std::fs::write(d.path().join("p.yml"), format!("base_model: {}", "[".repeat(300_000))).unwrap();
    expect(d.path(), &["plan", "p.yml"], 2, &["p.yml", "nested deeper"]);
}

#[test]
fn absurd_tiny_model_sizes_are_load_errors() {
    for (key, value) in [("hidden_size: 96", "hidden_size: 1000000"), ("vocab_size: 512", "vocab_size: 1000000000")] {
        let d = project();
        edit(d.path(), "p.yml", key, value);
        let name = value.split(':').next().unwrap();
        expect(d.path(), &["run", "p.yml"], 2, &["p.yml", &format!("tiny_model.{name}")]);
    }
}

#[test]
fn out_of_range_numbers_are_load_errors_naming_the_key() {
    for (from, to, key) in [
        ("learning_rate: 0.003", "learning_rate: .nan", "learning_rate"),
        ("learning_rate: 0.003", "learning_rate: 0", "learning_rate"),
        ("lora_alpha: 32", "lora_alpha: -16", "lora_alpha"),
        ("val_set_size: 0.1", "val_set_size: 1.5", "val_set_size"),
        ("seed: 42", "seed: 42\nweight_decay: -0.5", "weight_decay"),
    ] {
        let d = project();
        edit(d.path(), "p.yml", from, to);
        expect(d.path(), &["run", "p.yml"], 2, &["p.yml", key]);
    }
}

#[test]
fn a_row_over_the_size_limit_is_an_error_naming_its_line() {
    let d = project();
    let data = d.path().join("data/quickstart.jsonl");
    let mut text = std::fs::read_to_string(&data).unwrap();
    let rows = text.lines().count();
    let big = "a".repeat(17 << 20);
    text.push_str(&format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"{big}\"}}]}}\n"));
    std::fs::write(&data, text).unwrap();
    expect(d.path(), &["run", "p.yml"], 1, &[&format!("quickstart.jsonl:line {}", rows + 1), "limit of 16 MiB"]);
}

#[test]
fn a_symlink_loop_in_a_dataset_folder_is_an_error_not_an_endless_walk() {
    let d = project();
    std::fs::create_dir_all(d.path().join("ds/train")).unwrap();
    std::fs::rename(d.path().join("data/quickstart.jsonl"), d.path().join("ds/train/rows.jsonl")).unwrap();
    std::os::unix::fs::symlink("..", d.path().join("ds/train/up")).unwrap();
    edit(d.path(), "p.yml", "path: data/quickstart.jsonl", "path: ds");
    let (code, err) = newt_bounded(d.path(), &["run", "p.yml"]);
    assert!(code.is_some_and(|c| c != 0), "{err}");
    assert!(err.to_lowercase().contains("loop"), "{err}");
}

#[test]
fn a_chat_template_that_loops_forever_is_stopped() {
    let d = project();
    edit(
        d.path(),
        "p.yml",
        "chat_template: chatml",
        "chat_template: jinja\nchat_template_jinja: \"{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}\"",
    );
    expect(d.path(), &["run", "p.yml"], 1, &["tokenize.0", "instructions for one conversation"]);
}

/// A model folder whose config.json says `field: value`, with an empty weights file.
fn model_with(dir: &Path, field: &str, value: u64) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    let mut config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "rms_norm_eps": 1e-5,
    });
    config[field] = value.into();
    std::fs::write(m.join("config.json"), config.to_string()).unwrap();
    // fetch.model checks the config before anything reads the tokenizer.
    std::fs::write(m.join("tokenizer.json"), "{}").unwrap();
    std::fs::write(m.join("tokenizer_config.json"), "{}").unwrap();
    let header = b"{}      ";
    let mut st = (header.len() as u64).to_le_bytes().to_vec();
    st.extend_from_slice(header);
    std::fs::write(m.join("model.safetensors"), st).unwrap();
    m
}

#[test]
fn an_absurd_model_config_is_refused_naming_the_users_file() {
    for (field, value) in [("num_hidden_layers", 1_000_000u64), ("hidden_size", 1 << 40), ("num_attention_heads", 0)] {
        let d = project();
        model_with(d.path(), field, value);
        edit(d.path(), "p.yml", "base_model: newt:tiny", "base_model: ./model");
        let (code, err) = newt_bounded(d.path(), &["run", "p.yml"]);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains(field) && err.contains("model/config.json"), "{field}: {err}");
        assert!(!err.contains("cache/v1/tmp"), "the message cites the staging copy: {err}");
    }
}

/// The quickstart's tiny model, fetched, copied to `dir/model` (writable) and pointed at by
/// the pipeline.
fn tiny_model_folder(dir: &Path) -> PathBuf {
    let out = Command::new(env!("CARGO_BIN_EXE_newt"))
        .args(["run", "p.yml", "--only", "fetch.model", "--json", "--quiet"])
        .current_dir(dir)
        .env("NEWT_CACHE_DIR", dir.join("cache"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stage = v["stages"].as_array().unwrap().iter().find(|s| s["id"] == "fetch.model").unwrap();
    let tiny = PathBuf::from(stage["path"].as_str().unwrap());
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::write(m.join(f), std::fs::read(tiny.join(f)).unwrap()).unwrap();
    }
    edit(dir, "p.yml", "base_model: newt:tiny", "base_model: ./model");
    m
}

#[test]
fn a_config_claiming_more_layers_than_the_weights_hold_fails_before_loading() {
    let d = project();
    let m = tiny_model_folder(d.path());
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("config.json")).unwrap()).unwrap();
    config["num_hidden_layers"] = 40.into();
    std::fs::write(m.join("config.json"), config.to_string()).unwrap();
    expect(d.path(), &["run", "p.yml"], 1, &["model.layers.39.self_attn.q_proj.weight", "missing"]);
}

#[test]
fn garbage_model_files_are_errors_naming_them() {
    let d = project();
    std::fs::write(d.path().join("m.gguf"), b"GGUF\x03\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff").unwrap();
    edit(d.path(), "p.yml", "base_model: newt:tiny", "base_model: ./m.gguf");
    expect(d.path(), &["run", "p.yml"], 1, &["m.gguf"]);

    // A safetensors header that claims 2^60 bytes; a tokenizer that is not one.
    for (file, bytes) in [
        ("model.safetensors", [(1u64 << 60).to_le_bytes().as_slice(), b"{}"].concat()),
        ("tokenizer.json", b"{\"model\": 3}".to_vec()),
    ] {
        let d = project();
        let m = tiny_model_folder(d.path());
        std::fs::write(m.join(file), bytes).unwrap();
        expect(d.path(), &["run", "p.yml"], 1, &["fetch.model", &format!("model/{file}")]);
    }
}

#[test]
fn output_dir_that_is_a_file_is_said_before_any_stage_runs() {
    let d = project();
    std::fs::create_dir_all(d.path().join("outputs")).unwrap();
    std::fs::write(d.path().join("outputs/quickstart"), b"not a folder").unwrap();
    expect(d.path(), &["run", "p.yml"], 1, &["outputs/quickstart", "is a file"]);
    assert!(
        !d.path().join("cache/v1/manifests").exists()
            || std::fs::read_dir(d.path().join("cache/v1/manifests")).unwrap().count() == 0
    );
}

#[test]
fn rows_all_longer_than_sequence_len_say_how_many_were_dropped() {
    let d = project();
    edit(d.path(), "p.yml", "sequence_len: 256", "sequence_len: 4\nexcess_length_strategy: drop");
    expect(d.path(), &["run", "p.yml"], 1, &["none of its", "longer than sequence_len 4"]);
}

#[test]
fn json_nested_deeper_than_the_parser_allows_is_a_row_error() {
    let d = project();
    let data = d.path().join("data/quickstart.jsonl");
    let mut text = std::fs::read_to_string(&data).unwrap();
    text.push_str(&format!("{{\"messages\": {}{}}}\n", "[".repeat(100_000), "]".repeat(100_000)));
    std::fs::write(&data, text).unwrap();
    expect(d.path(), &["run", "p.yml"], 1, &["quickstart.jsonl:line 161"]);
}
