//! End to end through the `newt` binary: the quickstart pipeline, the cache, and `why`.
//!
//! Each test copies the quickstart pipeline and its data into a temp dir, with its own cache.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

#[path = "support/quickstart.rs"]
mod quickstart;
use quickstart::Project;

impl Project {
    fn new() -> Self {
        // Fewer steps: these tests are about the graph, not the model.
        Self::with_epochs(1)
    }
    fn run(&self, args: &[&str]) -> Output {
        self.newt(args).output().unwrap()
    }
    /// `newt run --json`: stage id → outcome.
    fn run_pipeline(&self) -> Vec<(String, String)> {
        let out = self.run(&["run", "p.yml", "--json", "--quiet"]);
        assert!(out.status.success(), "newt run failed: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["id"].as_str().unwrap().to_string(),
                    match &s["outcome"] {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    },
                )
            })
            .collect()
    }
    /// The cached output folder of stage `id` (run when it is not cached).
    fn stage_path(&self, id: &str) -> std::path::PathBuf {
        let out = self.run(&["run", "p.yml", "--only", id, "--json", "--quiet"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let stage = v["stages"].as_array().unwrap().iter().find(|s| s["id"] == id).cloned().unwrap();
        std::path::PathBuf::from(stage["path"].as_str().unwrap())
    }
    fn edit(&self, rel: &str, from: &str, to: &str) {
        let p = self.path(rel);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains(from), "{rel} lacks {from}");
        std::fs::write(&p, text.replacen(from, to, 1)).unwrap();
    }
}

fn ran(outcomes: &[(String, String)]) -> Vec<String> {
    let mut v: Vec<String> = outcomes.iter().filter(|(_, o)| o == "ran").map(|(i, _)| i.clone()).collect();
    v.sort();
    v
}

#[test]
fn quickstart_runs_then_reruns_as_all_hits_quickly() {
    let p = Project::new();
    let first = p.run_pipeline();
    assert_eq!(ran(&first).len(), first.len(), "first run executes every stage: {first:?}");
    for id in ["fetch.0", "fetch.model", "tokenize.0", "pack", "train", "evaluate", "merge"] {
        assert!(first.iter().any(|(i, _)| i == id), "missing stage {id}");
    }
    assert!(p.path("outputs/quickstart/adapter_model.safetensors").exists());
    assert!(p.path("outputs/quickstart/merged/config.json").exists());
    let t = Instant::now();
    let second = p.run_pipeline();
    let took = t.elapsed();
    assert!(second.iter().all(|(_, o)| o == "hit"), "{second:?}");
    assert!(took < Duration::from_secs(1), "no-op rerun took {took:?}");
}

#[test]
fn changing_learning_rate_reruns_train_and_after_and_why_says_so() {
    let p = Project::new();
    p.run_pipeline();
    p.edit("p.yml", "learning_rate: 0.003", "learning_rate: 0.002");
    let why = p.run(&["why", "p.yml", "train"]);
    let text = String::from_utf8_lossy(&why.stdout);
    assert!(text.contains("learning_rate: 0.003 → 0.002"), "{text}");
    let r = p.run_pipeline();
    assert_eq!(ran(&r), vec!["evaluate", "merge", "train"]);
}

#[test]
fn changing_eval_prompts_reruns_evaluate_only() {
    let p = Project::new();
    p.run_pipeline();
    p.edit("p.yml", "What is the capital of France?", "What is 2 plus 2?");
    assert_eq!(ran(&p.run_pipeline()), vec!["evaluate"]);
}

#[test]
fn changing_val_set_size_reruns_pack_and_after_not_tokenize() {
    let p = Project::new();
    p.run_pipeline();
    p.edit("p.yml", "val_set_size: 0.1", "val_set_size: 0.2");
    let r = ran(&p.run_pipeline());
    assert!(r.contains(&"pack".to_string()) && r.contains(&"train".to_string()), "{r:?}");
    assert!(!r.iter().any(|s| s.starts_with("tokenize") || s.starts_with("fetch")), "{r:?}");
}

#[test]
fn editing_one_byte_of_the_dataset_reruns_from_its_fetch() {
    let p = Project::new();
    p.run_pipeline();
    p.edit("data/quickstart.jsonl", "capital", "Capital");
    let why = p.run(&["why", "p.yml", "fetch.0"]);
    let text = String::from_utf8_lossy(&why.stdout);
    assert!(text.contains("data: external.data/quickstart.jsonl"), "{text}");
    let r = ran(&p.run_pipeline());
    assert!(r.contains(&"fetch.0".to_string()) && r.contains(&"tokenize.0".to_string()), "{r:?}");
}

#[test]
fn plan_lists_every_stage_as_hit_after_a_run() {
    let p = Project::new();
    p.run_pipeline();
    let out = p.run(&["plan", "p.yml", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.as_array().unwrap().iter().all(|e| e["hit"] == true), "{v}");
}

#[test]
fn bad_yaml_is_a_clear_error_and_leaves_the_cache_untouched() {
    let p = Project::new();
    p.edit("p.yml", "learning_rate:", "learning_rte:");
    let out = p.run(&["run", "p.yml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown key `learning_rte`; did you mean `learning_rate`?"), "{err}");
    let manifests = p.path("cache/v1/manifests");
    let n = std::fs::read_dir(&manifests).map(|d| d.count()).unwrap_or(0);
    assert_eq!(n, 0, "nothing may be cached");
}

#[test]
fn a_malformed_dataset_row_fails_fetch_naming_the_line_and_caches_nothing() {
    let p = Project::new();
    let data = p.path("data/quickstart.jsonl");
    let mut text = std::fs::read_to_string(&data).unwrap();
    text.push_str("{\"messages\": [oops\n");
    std::fs::write(&data, text).unwrap();
    let out = p.run(&["run", "p.yml"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fetch.0") && err.contains("quickstart.jsonl") && err.contains("161"), "{err}");
}

#[test]
fn sigkill_inside_a_stage_leaves_no_partial_result_and_reruns_only_that_stage() {
    let p = Project::new();
    // A custom stage that sleeps: kill the process while it runs.
    let mut yaml = std::fs::read_to_string(p.path("p.yml")).unwrap();
    yaml.push_str("stages:\n  - name: slow\n    kind: command\n    run: \"echo start > $NEWT_OUT/partial.txt; sleep 3; echo done > $NEWT_OUT/out.txt\"\n    outputs: [out.txt]\n");
    std::fs::write(p.path("p.yml"), yaml).unwrap();
    let mut child = p.newt(&["run", "p.yml", "--only", "slow", "--quiet"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    child.kill().unwrap();
    child.wait().unwrap();
    let manifests = p.path("cache/v1/manifests");
    assert_eq!(std::fs::read_dir(&manifests).map(|d| d.count()).unwrap_or(0), 0, "a killed stage is never cached");
    let objects = p.path("cache/v1/objects");
    assert_eq!(std::fs::read_dir(&objects).map(|d| d.count()).unwrap_or(0), 0, "no partial artifact is visible");
    let out = p.run(&["run", "p.yml", "--only", "slow", "--json", "--quiet"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stages"][0]["outcome"], "ran");
}

#[test]
fn two_runs_at_once_execute_each_stage_once() {
    let p = Project::new();
    let mut yaml = std::fs::read_to_string(p.path("p.yml")).unwrap();
    yaml.push_str("stages:\n  - name: once\n    kind: command\n    run: \"sleep 1; echo x >> runs.log; echo ok > $NEWT_OUT/out.txt\"\n    outputs: [out.txt]\n");
    std::fs::write(p.path("p.yml"), yaml).unwrap();
    let a = p.newt(&["run", "p.yml", "--only", "once", "--quiet"]).spawn().unwrap();
    let b = p.newt(&["run", "p.yml", "--only", "once", "--quiet"]).spawn().unwrap();
    assert!(a.wait_with_output().unwrap().status.success());
    assert!(b.wait_with_output().unwrap().status.success());
    let log = std::fs::read_to_string(p.path("runs.log")).unwrap_or_default();
    assert_eq!(log.lines().count(), 1, "the command ran {} times", log.lines().count());
}

#[test]
fn corrupt_manifest_is_a_miss_with_a_warning() {
    let p = Project::new();
    p.run_pipeline();
    let dir = p.path("cache/v1/manifests");
    let victim = std::fs::read_dir(&dir).unwrap().next().unwrap().unwrap().path();
    std::fs::write(&victim, "{ not json").unwrap();
    let out = p.run(&["run", "p.yml", "--quiet"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("warning"), "{err}");
}

#[test]
fn inspect_shows_decoded_tokens_with_trained_markers() {
    let p = Project::new();
    p.run_pipeline();
    let out = p.run(&["inspect", "tokenize.0", "-p", "p.yml", "-n", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Final answer"), "{text}");
}

#[test]
fn inference_with_lora_model_dir_uses_that_adapter() {
    let p = Project::new();
    p.run_pipeline();
    let answer = |extra: &[&str]| {
        let mut args = vec!["inference", "p.yml", "--prompt", "hello", "--max-new-tokens", "6"];
        args.extend_from_slice(extra);
        let out = p.run(&args);
        assert!(out.status.success(), "inference {extra:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let own = answer(&[]);
    // output_dir holds the PEFT copy of the same adapter: the same greedy answer.
    let exported = answer(&["--lora-model-dir", "outputs/quickstart"]);
    assert_eq!(own, exported);
    assert!(!own.trim().is_empty());

    std::fs::create_dir_all(p.path("empty")).unwrap();
    let out = p.run(&["inference", "p.yml", "--prompt", "hello", "--lora-model-dir", "empty"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no adapter_config.json"), "{err}");
}

#[test]
fn kernels_check_runs_on_the_cpu_and_reports_agreement() {
    let p = Project::new();
    let out = p.run(&["kernels", "--backend", "cpu", "--shape", "16,8,4", "--reps", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> =
        text.lines().filter(|l| ["x·Wᵀ ", "dY·W ", "dYᵀ·X "].iter().any(|p| l.starts_with(p))).collect();
    assert_eq!(rows.len(), 3, "three products of one linear: {text}");
    for row in rows {
        let err: f64 = row.split_whitespace().nth(2).unwrap().parse().unwrap();
        assert!(err < 1e-5, "{row}");
    }
    assert!(text.contains("dense_matmul under autodiff"), "{text}");
    // On the CPU the LoRA operation's passes are its reference's: the row shows it runs.
    let lora = text.lines().find(|l| l.starts_with("lora ") && l.contains("16×8×4/r32")).expect("a lora row");
    assert!(lora.split_whitespace().nth(2).unwrap().parse::<f64>().unwrap() < 1e-5, "{lora}");
    let norm = text.lines().find(|l| l.starts_with("rmsnorm ") && l.contains("16×8")).expect("an rmsnorm row");
    assert!(norm.split_whitespace().nth(2).unwrap().parse::<f64>().unwrap() < 1e-5, "{norm}");
    let rope = text.lines().find(|l| l.starts_with("rope ")).expect("a rope row");
    assert!(rope.split_whitespace().nth(2).unwrap().parse::<f64>().unwrap() < 1e-5, "{rope}");
    let xent = text.lines().find(|l| l.starts_with("xent ") && l.contains("64×49152")).expect("a cross-entropy row");
    assert!(xent.split_whitespace().nth(2).unwrap().parse::<f64>().unwrap() < 1e-5, "{xent}");
    let flat = text.lines().find(|l| l.starts_with("flat ")).expect("a flat gather/scatter row");
    assert_eq!(flat.split_whitespace().nth(2).unwrap().parse::<f64>().unwrap(), 0.0, "{flat}");
    let nf4 = text.lines().find(|l| l.starts_with("nf4:")).expect("an nf4 line");
    let errs: Vec<f64> = nf4.split([' ', ';']).filter_map(|w| w.parse().ok()).collect();
    assert_eq!(errs.len(), 2, "{nf4}");
    assert!(errs.iter().all(|e| *e < 1e-5), "{nf4}");
    let bad = p.run(&["kernels", "--backend", "cpu", "--shape", "16,0,4"]);
    assert!(!bad.status.success());
}

/// `gradient_checkpointing` changes how the backward pass is computed, not the result: the same
/// losses step by step (and the key ignores it, so the cache would serve either run). With LoRA
/// dropout too: each recomputed layer draws the masks its forward pass drew.
#[test]
fn gradient_checkpointing_trains_to_the_same_losses() {
    let losses = |checkpointing: bool, dropout: &str| {
        let p = Project::new();
        let mut settings = format!("lora_dropout: {dropout}");
        if checkpointing {
            settings.push_str("\ngradient_checkpointing: true");
        }
        p.edit("p.yml", "lora_dropout: 0.0", &settings);
        let out = p.run(&["run", "p.yml", "--quiet"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && !err.contains("not applied"), "{err}");
        train_losses(&p)
    };
    for dropout in ["0.0", "0.2"] {
        let (plain, checkpointed) = (losses(false, dropout), losses(true, dropout));
        assert!(plain.len() > 1);
        assert_eq!(plain.len(), checkpointed.len());
        for (a, b) in plain.iter().zip(&checkpointed) {
            assert!((a - b).abs() <= 1e-5 * a.abs(), "dropout {dropout}: {plain:?} vs {checkpointed:?}");
        }
    }
    assert_ne!(losses(false, "0.0"), losses(false, "0.2"), "dropout must change the run");
}

/// `adapter: qlora` trains on an NF4 base: it learns (the loss falls) and is not the LoRA run
/// under another name (the quantized base changes the losses).
#[test]
fn qlora_trains_on_a_quantized_base() {
    let losses = |adapter: &str| {
        let p = Project::new();
        p.edit("p.yml", "adapter: lora", adapter);
        p.run_pipeline();
        let text = std::fs::read_to_string(p.path("outputs/quickstart/metrics.jsonl")).unwrap();
        let out: Vec<f64> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["kind"] == "train")
            .map(|v| v["loss"].as_f64().unwrap())
            .collect();
        assert!(p.path("outputs/quickstart/adapter_model.safetensors").is_file());
        out
    };
    let (lora, qlora) = (losses("adapter: lora"), losses("adapter: qlora"));
    assert!(qlora.last().unwrap() < qlora.first().unwrap(), "QLoRA loss must fall: {qlora:?}");
    assert_ne!(lora, qlora, "QLoRA must train on the quantized base, not the full-precision one");
    let rel = (qlora.last().unwrap() - lora.last().unwrap()).abs() / lora.last().unwrap();
    assert!(rel < 0.2, "NF4 should cost little accuracy: LoRA {lora:?}, QLoRA {qlora:?}");
    // `load_in_8bit`: an int8 base, closer to the full-precision one than NF4 is.
    let int8 = losses("adapter: lora\nload_in_8bit: true");
    assert_ne!(lora, int8, "load_in_8bit must train on the int8 base");
    let rel8 = (int8.last().unwrap() - lora.last().unwrap()).abs() / lora.last().unwrap();
    assert!(rel8 < 0.05, "int8 should cost less than NF4: LoRA {lora:?}, int8 {int8:?}");
}

/// A QLoRA base is quantized once, by its own stage: train and evaluate read the cached
/// artifact, a change to training alone reruns neither the fetch nor the quantization, and a
/// change of code book (`load_in_8bit`) quantizes again. A LoRA pipeline has no such stage.
#[test]
fn a_qlora_base_is_quantized_once_into_a_cached_artifact() {
    let p = Project::new();
    assert!(!p.run_pipeline().iter().any(|(id, _)| id == "quantize.model"), "LoRA quantizes nothing");
    p.edit("p.yml", "adapter: lora", "adapter: qlora");
    let first = p.run_pipeline();
    assert_eq!(first.iter().find(|(id, _)| id == "quantize.model").map(|(_, o)| o.as_str()), Some("ran"), "{first:?}");
    let dir = p.stage_path("quantize.model");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("quantized.json")).unwrap()).unwrap();
    assert_eq!((meta["code"].as_str(), meta["double_quant"].as_bool()), (Some("nf4"), Some(true)), "{meta}");
    let store = newt_model::tensors::TensorStore::open(&dir).unwrap();
    let codes = "model.layers.0.mlp.down_proj.weight.codes";
    assert_eq!(store.info(codes).map(|(d, _)| d), Some(newt_model::tensors::Dtype::I32), "{:?}", store.names());
    p.edit("p.yml", "learning_rate: ", "learning_rate: 0.0009 #");
    let second = p.run_pipeline();
    let outcome = |v: &[(String, String)], id: &str| v.iter().find(|(i, _)| i == id).unwrap().1.clone();
    assert_eq!(outcome(&second, "quantize.model"), "hit", "{second:?}");
    assert_eq!(outcome(&second, "fetch.model"), "hit");
    assert_eq!(outcome(&second, "train"), "ran");
    p.edit("p.yml", "adapter: qlora", "adapter: lora\nload_in_8bit: true");
    let third = p.run_pipeline();
    assert_eq!(outcome(&third, "quantize.model"), "ran", "{third:?}");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p.stage_path("quantize.model").join("quantized.json")).unwrap())
            .unwrap();
    assert_eq!((meta["code"].as_str(), meta["double_quant"].as_bool()), (Some("int8"), Some(false)), "{meta}");
}

/// `newt plan` estimates an 8B run from the model's config.json alone, before any weight is
/// downloaded: the production LoRA does not fit a 20 GiB card and plan says QLoRA would; on a
/// 24 GiB card it fits with a warning (estimate 23.4 GiB; 23.1 measured on an H100); the QLoRA
/// estimate follows `bnb_config_kwargs` (without double quantization the scales cost more).
#[test]
fn plan_estimates_an_8b_run_from_its_config_before_any_download() {
    let p = Project::new();
    std::fs::create_dir_all(p.path("llama8b")).unwrap();
    let config = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "max_position_embeddings": 131072, "tie_word_embeddings": false}"#;
    std::fs::write(p.path("llama8b/config.json"), config).unwrap();
    p.edit("p.yml", "base_model: newt:tiny", "base_model: llama8b");
    p.edit("p.yml", "sequence_len: 256", "sequence_len: 4096\ngradient_checkpointing: true");
    p.edit("p.yml", "micro_batch_size: 4", "micro_batch_size: 2");
    p.edit("p.yml", "lora_r: 16\nlora_alpha: 32", "lora_r: 32\nlora_alpha: 64");
    let weights = |text: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with("train memory (estimate, per GPU)"))
            .unwrap_or_else(|| panic!("{text}"));
        let w = line.split("weights ").nth(1).and_then(|r| r.split(" GiB").next()).unwrap_or_else(|| panic!("{line}"));
        w.parse().unwrap_or_else(|_| panic!("{line}"))
    };
    let plan_on = |p: &Project, gpu: &str| {
        let out = p.run(&["plan", "p.yml", "--gpu-memory", gpu]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let plan = |p: &Project| plan_on(p, "24GiB");
    let tight = plan(&p);
    assert!(tight.contains("fits a GPU of 24.0 GiB") && tight.contains("warning: within 10%"), "{tight}");
    let lora = plan_on(&p, "20GiB");
    assert!(lora.contains("will not fit a GPU of 20.0 GiB"), "{lora}");
    let qlora_remedy =
        lora.lines().find(|l| l.trim_start().starts_with("adapter: qlora")).unwrap_or_else(|| panic!("{lora}"));
    assert!(qlora_remedy.ends_with("(fits)"), "{qlora_remedy}");
    assert!(!p.path("cache/objects").exists() || std::fs::read_dir(p.path("cache/objects")).unwrap().next().is_none());
    // 8.0B weights in bf16 (14.96 GiB) and the adapter's 84M in f32.
    assert!((weights(&lora) - 15.3).abs() < 0.1, "{lora}");
    // 4×2048 without checkpointing nearly fills an 80 GiB card (measured: in CubeCL's default
    // pool layout it ran out): plan warns; the production shape on the same card does not.
    let on_80 = |p: &Project| {
        let out = p.run(&["plan", "p.yml", "--gpu-memory", "80GiB"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let roomy = on_80(&p);
    assert!(roomy.contains("fits a GPU of 80.0 GiB") && !roomy.contains("warning: within 10%"), "{roomy}");
    p.edit(
        "p.yml",
        "sequence_len: 4096\ngradient_checkpointing: true",
        "sequence_len: 2048\ngradient_checkpointing: false",
    );
    p.edit("p.yml", "micro_batch_size: 2", "micro_batch_size: 4");
    let full = on_80(&p);
    assert!(full.contains("fits a GPU of 80.0 GiB") && full.contains("warning: within 10%"), "{full}");
    p.edit(
        "p.yml",
        "sequence_len: 2048\ngradient_checkpointing: false",
        "sequence_len: 4096\ngradient_checkpointing: true",
    );
    p.edit("p.yml", "micro_batch_size: 4", "micro_batch_size: 2");
    p.edit("p.yml", "adapter: lora", "adapter: qlora\nload_in_4bit: true");
    let dq = plan(&p);
    assert!(dq.contains("fits a GPU of 24.0 GiB"), "{dq}");
    p.edit("p.yml", "load_in_4bit: true", "load_in_4bit: true\nbnb_config_kwargs:\n  bnb_4bit_use_double_quant: false");
    let plain = plan(&p);
    // 7.0B linear weights: a f32 scale per 64 is 0.44 GB, 8-bit codes 0.11 GB (+ one f32 per 256).
    let more = weights(&plain) - weights(&dq);
    assert!((0.25..0.4).contains(&more), "double quantization should save ~0.3 GiB: {dq}\n{plain}");
}

/// PEFT, vLLM and the Hub read `base_model_name_or_path`; it was empty.
#[test]
fn adapter_config_names_its_base_model() {
    let p = Project::new();
    p.run_pipeline();
    let text = std::fs::read_to_string(p.path("outputs/quickstart/adapter_config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["base_model_name_or_path"], "newt:tiny", "{text}");
}

/// A bad enumerated value fails at load, exit 2, before any stage runs.
#[test]
fn bad_scheduler_exits_2_before_any_stage_and_caches_nothing() {
    let p = Project::new();
    p.edit("p.yml", "lr_scheduler: cosine", "lr_scheduler: bogus");
    let out = p.run(&["run", "p.yml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("p.yml:") && err.contains("lr_scheduler") && err.contains("bogus"), "{err}");
    assert!(
        !p.path("cache/v1/objects").exists() || std::fs::read_dir(p.path("cache/v1/objects")).unwrap().count() == 0
    );
}

/// `newt inference --base` on a fresh cache fetches the model it needs.
#[test]
fn inference_of_the_base_model_on_a_fresh_cache_runs_its_fetch() {
    let p = Project::new();
    let out = p.run(&["inference", "p.yml", "--base", "--prompt", "hello", "--max-new-tokens", "4"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = p.run(&["inference", "p.yml", "--prompt", "hello"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("trained adapter is not in the cache"));
}

/// `newt plan` lists the Axolotl keys it accepts and ignores, once, grouped by reason.
#[test]
fn plan_lists_ignored_axolotl_keys_grouped() {
    let p = Project::new();
    p.edit("p.yml", "adapter: lora", "adapter: lora\nwandb_project: x\nwandb_entity: y\nflash_attention: true");
    let out = p.run(&["plan", "p.yml"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("accepted and ignored (3 keys)"), "{text}");
    assert!(text.contains("wandb_project, wandb_entity: experiment tracking"), "{text}");
}

/// `newt run --only train --json --quiet` in `p`; the train stage's report.
fn train_report(p: &Project) -> serde_json::Value {
    let out = p.run(&["run", "p.yml", "--only", "train", "--json", "--quiet"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["stages"].as_array().unwrap().iter().find(|s| s["id"] == "train").cloned().unwrap()
}

fn long_train(p: &Project) {
    // Enough steps that the signal lands mid-train; a log line every step; no periodic
    // checkpoint, so the one a rerun resumes from is the one the signal made.
    p.edit("p.yml", "num_epochs: 1", "num_epochs: 6\nlogging_steps: 1\nsave_steps: 100000");
}

/// Spawns `newt run` on `p` with stderr piped (not a terminal, as in a batch job's log), waits
/// for train's plain log line of `step`, sends `signal`, and returns (exit code, stderr).
fn signal_mid_train(p: &Project, step: usize, signal: &str) -> (Option<i32>, String) {
    use std::io::BufRead;
    let mut child = p
        .newt(&["run", "p.yml", "--only", "train"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    let mut lines = stderr.lines();
    let marker = format!("step {step}/");
    for line in lines.by_ref() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line.contains("train") && line.contains(&marker) {
            let ok = Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
            assert!(ok.success());
            break;
        }
    }
    for line in lines {
        log.push_str(&line.unwrap());
        log.push('\n');
    }
    (child.wait().unwrap().code(), log)
}

#[test]
fn sigterm_mid_train_checkpoints_exits_143_and_a_rerun_resumes_to_the_uninterrupted_adapter() {
    let p = Project::new();
    long_train(&p);
    let (code, log) = signal_mid_train(&p, 3, "-TERM");
    assert_eq!(code, Some(143), "{log}");
    // The plain per-step log lines of a non-terminal stderr.
    for part in ["step 1/", "loss ", "lr ", "grad_norm ", "tok/s", "eta "] {
        assert!(log.contains(part), "no `{part}` in the log:\n{log}");
    }
    assert!(log.contains("SIGTERM") && log.contains("resumes"), "{log}");
    assert!(log.contains("checkpoint at step"), "{log}");
    let tmp = p.path("cache/v1/tmp");
    assert_eq!(std::fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0), 0, "staging left behind in {tmp:?}");

    let resumed = train_report(&p);
    assert_eq!(resumed["outcome"], "ran");
    let from = resumed["summary"]["resumed_from"].as_u64().expect("the rerun resumes");
    assert!(from >= 3, "resumed from step {from}");

    let whole = Project::new();
    long_train(&whole);
    let uninterrupted = train_report(&whole);
    assert!(uninterrupted["summary"]["resumed_from"].is_null());
    let adapter = |r: &serde_json::Value| {
        std::fs::read(Path::new(r["path"].as_str().unwrap()).join("adapter_model.safetensors")).unwrap()
    };
    assert!(adapter(&resumed) == adapter(&uninterrupted), "the resumed adapter differs from an uninterrupted run's");
}

#[test]
fn one_ctrl_c_stops_train_with_exit_130() {
    let p = Project::new();
    long_train(&p);
    let (code, log) = signal_mid_train(&p, 2, "-INT");
    assert_eq!(code, Some(130), "{log}");
    assert!(log.contains("interrupted") && log.contains("Ctrl-C"), "{log}");
    assert!(!log.contains("Some("), "{log}");
}

#[test]
fn inspect_with_a_pipeline_never_shows_another_pipelines_result() {
    let p = Project::new();
    p.run_pipeline();
    // q.yml: the same data and tokenizing, another learning rate; never run.
    let yaml = std::fs::read_to_string(p.path("p.yml")).unwrap();
    std::fs::write(p.path("q.yml"), yaml.replace("learning_rate: 0.003", "learning_rate: 0.002")).unwrap();

    let out = p.run(&["inspect", "train", "-p", "q.yml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "p.yml's adapter was shown for q.yml: {}", String::from_utf8_lossy(&out.stdout));
    assert!(err.contains("`train` of q.yml has not run yet"), "{err}");
    let out = p.run(&["query", "pack", "select count(*) as n from train", "-p", "q.yml"]);
    assert!(
        out.status.success(),
        "q.yml's pack is the same result as p.yml's: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = p.run(&["inspect", "nosuch", "-p", "q.yml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("has no stage `nosuch`") && err.contains("train"), "{err}");

    // Without -p, the newest result of any pipeline, and it says so.
    let out = p.run(&["inspect", "train"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("of any pipeline"), "{err}");
}

/// Losses of the train steps in `p`'s metrics.jsonl.
fn train_losses(p: &Project) -> Vec<f64> {
    let text = std::fs::read_to_string(p.path("outputs/quickstart/metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

/// `newt plan --json`: the train stage's key.
fn train_key(p: &Project, extra: &[&str]) -> String {
    let mut args = vec!["plan", "p.yml", "--json"];
    args.extend_from_slice(extra);
    let out = p.run(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let train = v.as_array().unwrap().iter().find(|e| e["id"] == "train").unwrap();
    train["key"].to_string()
}

/// Data parallel on the CPU: two replicas with `gradient_accumulation_steps: 1` see the global
/// batch of one replica with 2. They share its train key (the replica count is a setting, the
/// global batch is in the key) and, run, take the same steps.
#[test]
fn two_replicas_share_the_key_and_the_losses_of_one_with_twice_the_accumulation() {
    let one = Project::with_epochs(3);
    one.edit("p.yml", "gradient_accumulation_steps: 1", "gradient_accumulation_steps: 2");
    let two = Project::with_epochs(3);
    two.edit("p.yml", "gradient_accumulation_steps: 1", "gradient_accumulation_steps: 1\ngpus: 2");

    let plan = two.run(&["plan", "p.yml"]);
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(
        text.contains("train: world size 2, replicas in threads on the CPU; effective batch 8 rows per step = micro_batch_size 4 × gradient_accumulation_steps 1 × 2"),
        "{text}"
    );
    one.run_pipeline();
    let out = two.run(&["run", "p.yml", "--quiet"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("data parallel: 2 replicas"));

    let (a, b) = (train_losses(&one), train_losses(&two));
    assert!(a.len() >= 3, "{a:?}");
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "one replica {a:?} vs two {b:?}");
    }
    assert_eq!(train_key(&one, &[]), train_key(&two, &[]), "the same global batch is the same train key");
    // `--gpus` overrides the pipeline: 2 replicas × 2 is another global batch, another key.
    assert_ne!(train_key(&one, &["--gpus", "2"]), train_key(&one, &[]));
}

/// Data parallel with a full fine-tune: two replicas (threads on the CPU) summing every weight's
/// gradient take the steps of one process with twice the accumulation, and end at its weights.
#[test]
fn two_replicas_of_a_full_fine_tune_end_at_the_weights_of_one() {
    let one = Project::with_epochs(2);
    one.edit("p.yml", "adapter: lora\n", "");
    one.edit("p.yml", "gradient_accumulation_steps: 1", "gradient_accumulation_steps: 2");
    let two = Project::with_epochs(2);
    two.edit("p.yml", "adapter: lora\n", "");
    two.edit("p.yml", "gradient_accumulation_steps: 1", "gradient_accumulation_steps: 1\ngpus: 2");
    one.run_pipeline();
    let out = two.run(&["run", "p.yml", "--quiet"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("data parallel: 2 replicas"));
    let (a, b) = (train_losses(&one), train_losses(&two));
    assert!(a.len() >= 2 && a.len() == b.len(), "{a:?} {b:?}");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "one replica {a:?} vs two {b:?}");
    }
    let store = |p: &Project| newt_model::tensors::TensorStore::open(&p.path("outputs/quickstart/model")).unwrap();
    let (wa, wb) = (store(&one), store(&two));
    assert_eq!(wa.names(), wb.names());
    for name in wa.names() {
        let (x, y) = (wa.read_f32(&name).unwrap(), wb.read_f32(&name).unwrap());
        let diff = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-5, "{name}: one replica vs two differ by {diff}");
    }
}

/// `NEWT_REDUCER` picks how replicas sum gradients; NCCL needs CUDA, and a typo is named.
#[test]
fn a_reducer_the_backend_cannot_use_fails_train_saying_why() {
    let p = Project::new();
    for (value, says) in [("nccl", "NCCL needs the CUDA backend"), ("ncc", "expected `nccl` or `host`")] {
        let out = p.newt(&["run", "p.yml", "--only", "train", "--quiet"]).env("NEWT_REDUCER", value).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(says), "NEWT_REDUCER={value}: {err}");
    }
    // `host` on one replica runs the data-parallel loop alone, to the plain loop's losses.
    let plain = Project::new();
    plain.run_pipeline();
    let out = p.newt(&["run", "p.yml", "--quiet"]).env("NEWT_REDUCER", "host").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("data parallel: 1 replica"));
    let (a, b) = (train_losses(&plain), train_losses(&p));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-6 * x.abs(), "{a:?} vs {b:?}");
    }
}

/// The shapes of the tensors named like `part` in a safetensors file.
fn tensor_shapes(file: &Path, part: &str) -> Vec<(String, Vec<u64>)> {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut out: Vec<(String, Vec<u64>)> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, v)| k.contains(part) && v.get("shape").is_some())
        .map(|(k, v)| (k.clone(), v["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect()))
        .collect();
    out.sort();
    out
}

/// `tokens:` new to the vocabulary (Axolotl's meaning): the data's new token is one id past the
/// model's vocabulary; the embedding and LM head grow by one row and train (they must be in
/// `lora_modules_to_save`, or train says so); the adapter, the merged model and its tokenizer
/// carry the grown vocabulary, and evaluate and inference run on it.
#[test]
fn a_token_new_to_the_vocabulary_grows_the_model_and_reaches_the_merged_tokenizer() {
    let p = Project::new();
    let data = std::fs::read_to_string(p.path("data/quickstart.jsonl")).unwrap();
    let tagged =
        data.replace(r#""role": "assistant", "content": ""#, r#""role": "assistant", "content": "<|newt_tool|> "#);
    assert_ne!(tagged, data);
    std::fs::write(p.path("data/quickstart.jsonl"), tagged).unwrap();
    p.edit("p.yml", "lora_target_linear: true", "lora_target_linear: true\ntokens: [\"<|newt_tool|>\"]");

    // Without the embedding and head in lora_modules_to_save, the new rows would never train.
    let out = p.run(&["run", "p.yml", "--quiet"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("add embed_tokens, lm_head to `lora_modules_to_save`"), "{err}");

    p.edit("p.yml", "tokens: [", "lora_modules_to_save: [embed_tokens, lm_head]\nmerge: {gguf: [f16]}\ntokens: [");
    let out = p.run(&["run", "p.yml", "--quiet"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("vocabulary: 490 → 491 entries"), "{err}");

    let adapter = tensor_shapes(&p.path("outputs/quickstart/adapter_model.safetensors"), "embed_tokens");
    assert_eq!(adapter, [("base_model.model.model.embed_tokens.weight".to_string(), vec![491, 96])]);
    let merged = p.path("outputs/quickstart/merged");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], 491);
    let shapes = tensor_shapes(&merged.join("model.safetensors"), "");
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let shape = shapes.iter().find(|(n, _)| n == name).map(|(_, s)| s.clone());
        assert_eq!(shape, Some(vec![491, 96]), "{name}");
    }
    // The merged folder's tokenizer has the token, as one id, the new last row.
    let tok = newt_data::HfTokenizer::load(&merged).unwrap();
    let ids = tok.tokenizer.encode("<|newt_tool|> Final answer", false).unwrap();
    assert_eq!(ids.get_ids()[0], 490, "{:?}", ids.get_tokens());
    assert!(p.path("outputs/quickstart/eval_metrics.json").is_file());

    // The GGUF export carries it too: read back as a base model, its vocabulary is 491.
    let gguf = merged.join("model-f16.gguf");
    let yaml = std::fs::read_to_string(p.path("p.yml")).unwrap();
    // The same pipeline from `datasets:` on, over the GGUF instead of `newt:tiny`.
    let end = yaml.find("\ndatasets:").unwrap();
    std::fs::write(p.path("g.yml"), format!("base_model: {}\n{}", gguf.display(), &yaml[end + 1..])).unwrap();
    let out = p.run(&["run", "g.yml", "--only", "fetch.model", "--json", "--quiet"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dir = v["stages"].as_array().unwrap().iter().find(|s| s["id"] == "fetch.model").unwrap()["path"].clone();
    let dir = Path::new(dir.as_str().unwrap());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], 491);
    let tok = newt_data::HfTokenizer::load(dir).unwrap();
    assert_eq!(tok.tokenizer.token_to_id("<|newt_tool|>"), Some(490));

    // Inference loads the base, grows it to the adapter's vocabulary and answers.
    let out = p.run(&["inference", "p.yml", "--prompt", "What is 2 times 3?", "--max-new-tokens", "4"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A full fine-tune (`adapter` unset): every weight trains; the train stage writes a whole
/// model folder and there is no merge (an `export` node writes the GGUF asked for); evaluate
/// scores the trained model against the base; inference answers with it; `newt plan` says so.
#[test]
fn a_full_fine_tune_trains_every_weight_and_writes_a_model_folder() {
    let p = Project::with_epochs(2);
    p.edit("p.yml", "adapter: lora\n", "");
    // A token new to the vocabulary: every weight trains, so its rows do too, with no extra key.
    let data = std::fs::read_to_string(p.path("data/quickstart.jsonl")).unwrap();
    let tagged =
        data.replace(r#""role": "assistant", "content": ""#, r#""role": "assistant", "content": "<|newt_tool|> "#);
    std::fs::write(p.path("data/quickstart.jsonl"), tagged).unwrap();
    p.edit("p.yml", "learning_rate: 0.003", "learning_rate: 0.001\nmerge: {gguf: [f16]}\ntokens: [\"<|newt_tool|>\"]");
    let plan = p.run(&["plan", "p.yml"]);
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(plan.status.success(), "{}", String::from_utf8_lossy(&plan.stderr));
    assert!(text.contains("train: full fine-tune (`adapter` unset): every weight trains"), "{text}");

    let stages = p.run_pipeline();
    let ids: Vec<&str> = stages.iter().map(|(i, _)| i.as_str()).collect();
    assert!(ids.contains(&"export") && !ids.contains(&"merge"), "{ids:?}");
    let report = train_report(&p);
    assert_eq!(report["summary"]["frozen_params"], 0, "{report}");
    let trained = report["summary"]["trainable_params"].as_u64().unwrap();

    let out = p.path("outputs/quickstart");
    let model = out.join("model");
    assert!(model.join("config.json").is_file() && model.join("tokenizer.json").is_file());
    assert!(!out.join("adapter_config.json").exists() && !out.join("merged").exists());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], 491);
    let tok = newt_data::HfTokenizer::load(&model).unwrap();
    assert_eq!(tok.tokenizer.token_to_id("<|newt_tool|>"), Some(490));
    let shapes = tensor_shapes(&model.join("model.safetensors"), "");
    let total: u64 = shapes.iter().map(|(_, s)| s.iter().product::<u64>()).sum();
    assert_eq!(total, trained, "the folder holds every trained weight");
    assert_eq!(shapes.len(), 1 + 2 * 9 + 1, "embedding (tied head), 2 layers of 9 weights, final norm");

    // Every weight moved away from the base model's.
    let base_dir = p.stage_path("fetch.model");
    let base = newt_model::tensors::TensorStore::open(&base_dir).unwrap();
    let tuned = newt_model::tensors::TensorStore::open(&model).unwrap();
    for (name, _) in &shapes {
        let (a, b) = (base.read_f32(name).unwrap(), tuned.read_f32(name).unwrap());
        let moved = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(moved > 1e-4, "{name} did not train ({moved})");
    }
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval_metrics.json")).unwrap()).unwrap();
    let (before, after) =
        (metrics["base"]["eval_loss"].as_f64().unwrap(), metrics["tuned"]["eval_loss"].as_f64().unwrap());
    assert!(after < before, "eval loss {before} → {after}");
    assert!(out.join("model-f16.gguf").is_file());

    let chat = p.run(&["inference", "p.yml", "--prompt", "What is the capital of France?", "--max-new-tokens", "4"]);
    assert!(chat.status.success(), "{}", String::from_utf8_lossy(&chat.stderr));
    let again = p.run_pipeline();
    assert!(again.iter().all(|(_, o)| o == "hit"), "{again:?}");

    // With the model fetched, plan prints what training it needs, every weight trained.
    let plan = p.run(&["plan", "p.yml"]);
    let text = String::from_utf8_lossy(&plan.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("train memory (estimate, per process)"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains(&format!("({:.1}M weights train)", trained as f64 / 1e6)), "{line}");
    // Against a GPU size given on the command line: it fits 80 GB; 1 MiB does not, and plan says
    // what each usual change would need, cheapest first.
    let fits = p.run(&["plan", "p.yml", "--gpu-memory", "80GB"]);
    let text = String::from_utf8_lossy(&fits.stdout);
    assert!(text.contains("train memory (estimate, per GPU)") && text.contains("fits a GPU of 74.5 GiB"), "{text}");
    let small = p.run(&["plan", "p.yml", "--gpu-memory", "1MiB"]);
    let text = String::from_utf8_lossy(&small.stdout);
    assert!(small.status.success() && text.contains("will not fit a GPU of 1.0 MiB"), "{text}");
    let remedies: Vec<&str> = text.lines().filter(|l| l.starts_with("  ") && l.contains("still too big")).collect();
    assert_eq!(remedies.len(), 3, "{text}");
    for (line, change) in remedies.iter().zip(["micro_batch_size: 1", "gradient_checkpointing: true", "adapter: qlora"])
    {
        assert!(line.trim_start().starts_with(change), "{line}");
    }
    let bad = p.run(&["plan", "p.yml", "--gpu-memory", "lots"]);
    assert_eq!(bad.status.code(), Some(2), "{}", String::from_utf8_lossy(&bad.stderr));
}

/// `shrink_embeddings: true` in a full fine-tune cuts a model whose embedding is larger than its
/// tokenizer (as many are, padded to a multiple) to the tokenizer's size; the saved model has
/// the tokenizer's vocabulary.
#[test]
fn shrink_embeddings_cuts_a_padded_vocabulary_to_the_tokenizers_size() {
    use newt_model::tensors::{Dtype, TensorStore, encode_f32, write_single};
    let p = Project::new();
    p.edit("p.yml", "adapter: lora\n", "");
    // The tiny model, its embedding padded with 10 rows beyond its tokenizer.
    let tiny = p.stage_path("fetch.model");
    let padded = p.path("padded");
    std::fs::create_dir_all(&padded).unwrap();
    let store = TensorStore::open(&tiny).unwrap();
    let vocab = store.info("model.embed_tokens.weight").unwrap().1[0];
    let mut tensors = Vec::new();
    for name in store.names() {
        let (_, mut shape) = store.info(&name).unwrap();
        let mut values = store.read_f32(&name).unwrap();
        if name == "model.embed_tokens.weight" {
            values.extend(std::iter::repeat_n(0.5f32, 10 * shape[1]));
            shape[0] = vocab + 10;
        }
        tensors.push((name, Dtype::F32, shape, encode_f32(Dtype::F32, &values)));
    }
    write_single(&padded.join("model.safetensors"), &tensors).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny.join("config.json")).unwrap()).unwrap();
    config["vocab_size"] = (vocab + 10).into();
    std::fs::write(padded.join("config.json"), config.to_string()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        if tiny.join(f).is_file() {
            std::fs::copy(tiny.join(f), padded.join(f)).unwrap();
        }
    }
    let yaml = std::fs::read_to_string(p.path("p.yml")).unwrap();
    let end = yaml.find("\ndatasets:").unwrap();
    std::fs::write(p.path("p.yml"), format!("base_model: padded\nshrink_embeddings: true\n{}", &yaml[end + 1..]))
        .unwrap();
    let out = p.run(&["run", "p.yml", "--quiet"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("vocabulary: {} → {vocab} entries (`shrink_embeddings`", vocab + 10)), "{err}");
    let model = p.path("outputs/quickstart/model");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], vocab);
    let shapes = tensor_shapes(&model.join("model.safetensors"), "embed_tokens");
    assert_eq!(shapes, [("model.embed_tokens.weight".to_string(), vec![vocab as u64, 96])]);
}

/// A model folder's weights are not copied into the cache (issue 16: an 8B model's 16 GB filled
/// the GPU machine's disk): fetch.model names them, with their digests, in `local_refs.json`, and
/// train, evaluate and merge read them where they are. Editing the weights makes the next run
/// fetch again (the key covers their bytes), and the earlier cached result refuses the changed
/// file instead of reading it.
#[test]
fn a_model_folders_weights_stay_in_place_and_a_changed_file_is_refused() {
    use newt_model::tensors::TensorStore;
    let p = Project::new();
    let tiny = p.stage_path("fetch.model");
    let folder = p.path("mymodel");
    std::fs::create_dir_all(&folder).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        if tiny.join(f).is_file() {
            std::fs::copy(tiny.join(f), folder.join(f)).unwrap();
        }
    }
    let yaml = std::fs::read_to_string(p.path("p.yml")).unwrap();
    let end = yaml.find("\ndatasets:").unwrap();
    std::fs::write(p.path("p.yml"), format!("base_model: mymodel\n{}", &yaml[end + 1..])).unwrap();
    let first = ran(&p.run_pipeline());
    assert!(first.contains(&"fetch.model".to_string()) && first.contains(&"merge".to_string()), "{first:?}");

    let fetched = p.stage_path("fetch.model");
    assert!(!fetched.join("model.safetensors").exists(), "the weights were copied into the cache");
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fetched.join("local_refs.json")).unwrap()).unwrap();
    let weights = folder.join("model.safetensors");
    let r = &refs["files"][0];
    assert_eq!(r["name"], "model.safetensors");
    assert_eq!(Path::new(r["source"].as_str().unwrap()), std::fs::canonicalize(&weights).unwrap());
    assert_eq!(r["size"], std::fs::metadata(&weights).unwrap().len());
    let held: u64 = std::fs::read_dir(&fetched).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    assert!(held < std::fs::metadata(&weights).unwrap().len(), "the object holds {held} bytes");
    assert!(p.path("outputs/quickstart/adapter_model.safetensors").is_file());

    // The same size, other bytes (the last one of the last tensor).
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&weights, &bytes).unwrap();
    let msg = TensorStore::open(&fetched).err().expect("the old result refuses the edited file").to_string();
    assert!(msg.contains("other contents") && msg.contains("model.safetensors"), "{msg}");
    let second = ran(&p.run_pipeline());
    assert!(second.contains(&"fetch.model".to_string()) && second.contains(&"train".to_string()), "{second:?}");
    assert!(TensorStore::open(&p.stage_path("fetch.model")).is_ok());
}
