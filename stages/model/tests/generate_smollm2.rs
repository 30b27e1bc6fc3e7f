//! The real SmolLM2-135M-Instruct, imported from its GGUF file: a coherent greedy answer, and
//! CPU throughput figures (ignored by default; `scripts/model_bench_cpu.sh` runs them).
//!
//! Both skip, saying why, unless `NEWT_SMOLLM2_GGUF` names the GGUF file.

mod model_support;

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use model_support::*;
use newt_model::generate::{ChatMessage, ChatTemplate, SamplingConfig, TextStream, generate, stop_token_ids};
use newt_model::llama::{BatchKvCache, KvCache, Llama};

/// The imported model folder, or `None` (with the reason printed) when the GGUF is unavailable.
fn smollm2_dir() -> Option<tempfile::TempDir> {
    let Some(gguf) = std::env::var_os("NEWT_SMOLLM2_GGUF").map(PathBuf::from) else {
        eprintln!("skipping: NEWT_SMOLLM2_GGUF is not set (point it at SmolLM2-135M-Instruct.Q4_1.gguf)");
        return None;
    };
    if !gguf.is_file() {
        eprintln!("skipping: NEWT_SMOLLM2_GGUF={} is not a file", gguf.display());
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    newt_model::gguf::import_to_hf(&gguf, dir.path()).unwrap();
    Some(dir)
}

fn chat_prompt(dir: &std::path::Path, tok: &tokenizers::Tokenizer, question: &str) -> Vec<u32> {
    let template = ChatTemplate::from_model_dir(dir).unwrap();
    let prompt = template.apply_chat_template(&[ChatMessage::new("user", question)], true).unwrap();
    tok.encode(prompt.as_str(), false).unwrap().get_ids().to_vec()
}

#[test]
fn smollm2_greedy_answer_is_coherent() {
    let Some(dir) = smollm2_dir() else { return };
    let model = load::<B>(dir.path());
    let tok = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    let ids = chat_prompt(dir.path(), &tok, "What is the capital of France?");
    let mut stream = TextStream::new(&tok);
    let mut text = String::new();
    let cfg = SamplingConfig {
        max_new_tokens: 40,
        stop_token_ids: stop_token_ids(dir.path(), &model.config),
        ..Default::default()
    };
    let out = generate(&model, &ids, &cfg, |t| {
        if let Some(piece) = stream.push(t) {
            text.push_str(&piece);
        }
        ControlFlow::Continue(())
    });
    eprintln!("answer ({} tokens, {:?}): {text:?}", out.tokens.len(), out.stop);
    assert_eq!(text, tok.decode(&out.tokens, true).unwrap(), "streamed text differs from the decoded output");
    assert!(text.contains("Paris"), "{text:?}");
}

/// Prefill (forward) and decode tokens/s of SmolLM2-135M on the CPU backend.
#[test]
#[ignore = "benchmark: run with --ignored --nocapture (scripts/model_bench_cpu.sh)"]
fn smollm2_cpu_throughput() {
    let Some(dir) = smollm2_dir() else { return };
    let t0 = Instant::now();
    let model: Llama<B> = load(dir.path());
    eprintln!("load: {:.2} s", t0.elapsed().as_secs_f64());
    let v = model.config.vocab_size as i64;
    for (rows, len) in [(1usize, 128usize), (4, 256)] {
        let ids: Vec<i64> = (0..(rows * len) as i64).map(|i| (i * 7919 + 13) % v).collect();
        let pos: Vec<i64> = (0..rows).flat_map(|_| 0..len as i64).collect();
        let run = || {
            model.forward_hidden(
                ints(&ids, rows, len),
                ints(&pos, rows, len),
                ints(&vec![1; rows * len], rows, len),
                None,
            )
        };
        let _ = floats(run()); // warm-up
        let t = Instant::now();
        let reps = 3;
        for _ in 0..reps {
            let _ = floats(run());
        }
        let secs = t.elapsed().as_secs_f64() / reps as f64;
        eprintln!("forward [{rows} x {len}]: {:.0} tokens/s ({:.3} s per batch)", (rows * len) as f64 / secs, secs);
    }
    let tok = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    let ids = chat_prompt(dir.path(), &tok, "Write a short story about a robot who learns to paint.");
    let cfg = SamplingConfig { max_new_tokens: 64, ..Default::default() };
    let t = Instant::now();
    let mut first: Option<f64> = None;
    let out = generate(&model, &ids, &cfg, |_| {
        first.get_or_insert(t.elapsed().as_secs_f64());
        ControlFlow::Continue(())
    });
    let total = t.elapsed().as_secs_f64();
    let first = first.unwrap_or(total);
    eprintln!(
        "generate: prompt {} tokens, first token after {:.3} s, then {:.1} tokens/s over {} tokens (KV cache, greedy)",
        ids.len(),
        first,
        (out.tokens.len() - 1) as f64 / (total - first),
        out.tokens.len()
    );
    // Several sequences decoded together (`newt serve --batch`): the same prompt in every row,
    // 32 steps after its prefill; tokens/s over all rows.
    for rows in [1usize, 2, 4, 8] {
        let mut batch = BatchKvCache::new(model.config.num_hidden_layers);
        for _ in 0..rows {
            let mut one = KvCache::new(model.config.num_hidden_layers);
            let _ = floats(
                model.forward_next(ints(&ids.iter().map(|&t| t as i64).collect::<Vec<_>>(), 1, ids.len()), &mut one),
            );
            batch.join(one);
        }
        let next = vec![ids[ids.len() - 1]; rows];
        let _ = floats(model.forward_rows(&next, &mut batch)); // warm-up
        let steps = 32;
        let t = Instant::now();
        for _ in 0..steps {
            let _ = floats(model.forward_rows(&next, &mut batch));
        }
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "generate: {rows} rows decoded together: {:.1} ms a step, {:.1} tokens/s in all",
            secs * 1e3 / steps as f64,
            (rows * steps) as f64 / secs
        );
    }
}
