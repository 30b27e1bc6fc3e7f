//! Generation and the tiny built-in model.

mod model_support;

use std::ops::ControlFlow;

use burn::tensor::{Int, Tensor};
use model_support::*;
use newt_model::generate::{ChatMessage, ChatTemplate, SamplingConfig, StopReason, generate, stop_token_ids};
use newt_model::llama::{BatchKvCache, KvCache};

#[test]
fn tiny_model_is_deterministic() {
    let a = tiny_model_dir(42);
    let b = tiny_model_dir(42);
    let c = tiny_model_dir(43);
    for file in
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    {
        let fa = std::fs::read(a.path().join(file)).unwrap();
        assert_eq!(fa, std::fs::read(b.path().join(file)).unwrap(), "{file} differs between two runs");
        if file == "model.safetensors" {
            assert_ne!(fa, std::fs::read(c.path().join(file)).unwrap(), "the seed does not reach the weights");
        }
    }
}

#[test]
fn tiny_tokenizer_round_trips_text_and_knows_chatml() {
    let dir = tiny_model_dir(1);
    let tok = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    let text = "The capital of France is Paris. Zebras é 🦀";
    let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    let template = ChatTemplate::from_model_dir(dir.path()).unwrap();
    let prompt = template.apply_chat_template(&[ChatMessage::new("user", "Hi")], true).unwrap();
    assert_eq!(prompt, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    let ids = tok.encode(prompt.as_str(), false).unwrap().get_ids().to_vec();
    assert_eq!(ids[0], tok.token_to_id("<|im_start|>").unwrap());
    assert_eq!(ids.iter().filter(|&&i| i == tok.token_to_id("<|im_end|>").unwrap()).count(), 1);
}

#[test]
fn kv_cache_logits_equal_no_cache_logits() {
    let dir = tiny_model_dir(2);
    let model = load::<B>(dir.path());
    let ids: Vec<i64> = vec![4, 8, 15, 16, 23, 42, 7, 99, 100];
    let full = logits(&model, &ids, 1);
    let v = model.config.vocab_size;
    // A small capacity, so the buffers grow (4 → 8 → 16) along the way.
    let mut cache = KvCache::with_capacity(model.config.num_hidden_layers, 4);
    // A prompt of 4 tokens, then one token at a time, then a chunk of 2.
    let mut at = 0;
    for step in [4usize, 1, 1, 1, 2] {
        let chunk: Tensor<B, 2, Int> = ints(&ids[at..at + step], 1, step);
        let got = floats(model.forward_next(chunk, &mut cache));
        at += step;
        let want = &full[(at - 1) * v..at * v];
        assert!(rel_diff(&got, want) < 1e-5, "after {at} tokens: {}", rel_diff(&got, want));
    }
    assert_eq!((cache.len(), cache.capacity()), (ids.len(), 16));
}

/// Several sequences decoded together, each at its own length, joining and leaving at
/// different steps: every row's logits are those of its sequence computed alone without a
/// cache, with and without a sliding window, while the buffers grow.
#[test]
fn batched_rows_decode_as_each_sequence_alone() {
    let dir = tiny_model_dir(2);
    for window in [None, Some(5)] {
        let mut model = load::<B>(dir.path());
        model.config.sliding_window = window;
        let v = model.config.vocab_size;
        let layers = model.config.num_hidden_layers;
        let argmax = |l: &[f32]| (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b]).then(b.cmp(&a))).unwrap() as i64;
        // Start a sequence: its prompt through a cache of its own, then into the batch.
        let start = |batch: &mut BatchKvCache<B>, prompt: &[i64]| -> Vec<i64> {
            let mut one = KvCache::with_capacity(layers, 4);
            let l = floats(model.forward_next(ints(prompt, 1, prompt.len()), &mut one));
            batch.join(one);
            let mut seq = prompt.to_vec();
            seq.push(argmax(&l));
            seq
        };
        let mut batch = BatchKvCache::with_capacity(layers, 8);
        let mut seqs: Vec<Vec<i64>> = vec![start(&mut batch, &[4, 8, 15])];
        let step = |batch: &mut BatchKvCache<B>, seqs: &mut Vec<Vec<i64>>| {
            let next: Vec<u32> = seqs.iter().map(|s| *s.last().unwrap() as u32).collect();
            let got = floats(model.forward_rows(&next, batch));
            for (r, seq) in seqs.iter_mut().enumerate() {
                let row = &got[r * v..(r + 1) * v];
                let alone = logits(&model, seq, 1);
                let want = &alone[(seq.len() - 1) * v..];
                assert!(
                    rel_diff(row, want) < 1e-5,
                    "window {window:?}, row {r} at {}: {}",
                    seq.len(),
                    rel_diff(row, want)
                );
                seq.push(argmax(row));
            }
            assert_eq!(batch.lens(), seqs.iter().map(|s| s.len() - 1).collect::<Vec<_>>());
        };
        step(&mut batch, &mut seqs);
        step(&mut batch, &mut seqs);
        seqs.push(start(&mut batch, &[1, 2, 3, 5, 8, 13, 21, 34, 55, 89]));
        for _ in 0..3 {
            step(&mut batch, &mut seqs);
        }
        // The first leaves; a third joins behind the second.
        batch.leave(0);
        seqs.remove(0);
        seqs.push(start(&mut batch, &[7, 7]));
        for _ in 0..4 {
            step(&mut batch, &mut seqs);
        }
        assert_eq!(batch.rows(), 2);
        assert!(batch.capacity() >= 16, "the buffers grew past 8: {}", batch.capacity());
        batch.leave(1);
        batch.leave(0);
        assert_eq!(batch.rows(), 0);
        seqs.clear();
        seqs.push(start(&mut batch, &[3, 1, 4, 1, 5]));
        step(&mut batch, &mut seqs);
    }
}

#[test]
fn greedy_generation_is_deterministic_and_streams_every_token() {
    let dir = tiny_model_dir(3);
    let model = load::<B>(dir.path());
    let cfg = SamplingConfig { max_new_tokens: 12, ..SamplingConfig::default() };
    let mut streamed = Vec::new();
    let first = generate(&model, &[1, 20, 30], &cfg, |t| {
        streamed.push(t);
        ControlFlow::Continue(())
    });
    let second = generate(&model, &[1, 20, 30], &cfg, |_| ControlFlow::Continue(()));
    assert_eq!(first, second);
    assert_eq!(first.tokens, streamed);
    assert_eq!(first.tokens.len(), 12);
    assert_eq!(first.stop, StopReason::MaxNewTokens);
    // Greedy means each token is the argmax of the full-sequence logits.
    let mut seq: Vec<i64> = vec![1, 20, 30];
    let v = model.config.vocab_size;
    for &t in &first.tokens {
        let l = logits(&model, &seq, 1);
        let last = &l[(seq.len() - 1) * v..];
        let best = (0..v).max_by(|&a, &b| last[a].total_cmp(&last[b]).then(b.cmp(&a))).unwrap();
        assert_eq!(t as usize, best);
        seq.push(t as i64);
    }
}

#[test]
fn generation_stops_at_a_stop_token_and_on_request() {
    let dir = tiny_model_dir(3);
    let model = load::<B>(dir.path());
    let free = generate(&model, &[1, 20, 30], &SamplingConfig { max_new_tokens: 6, ..Default::default() }, |_| {
        ControlFlow::Continue(())
    });
    let stop_at = free.tokens[2];
    let first_hit = free.tokens.iter().position(|&t| t == stop_at).unwrap();
    let stopped = generate(
        &model,
        &[1, 20, 30],
        &SamplingConfig { max_new_tokens: 6, stop_token_ids: vec![stop_at], ..Default::default() },
        |_| ControlFlow::Continue(()),
    );
    assert_eq!(stopped.stop, StopReason::StopToken(stop_at));
    assert_eq!(stopped.tokens, free.tokens[..first_hit]);
    let interrupted =
        generate(&model, &[1, 20, 30], &SamplingConfig { max_new_tokens: 6, ..Default::default() }, |_| {
            ControlFlow::Break(())
        });
    assert_eq!((interrupted.tokens.len(), interrupted.stop), (1, StopReason::Interrupted));
}

#[test]
fn sampled_generation_is_reproducible_from_its_seed() {
    let dir = tiny_model_dir(3);
    let model = load::<B>(dir.path());
    let cfg = |seed| SamplingConfig {
        max_new_tokens: 10,
        temperature: 1.5,
        top_k: 50,
        top_p: 0.95,
        repetition_penalty: 1.1,
        seed,
        ..Default::default()
    };
    let run = |seed| generate(&model, &[1, 2, 3], &cfg(seed), |_| ControlFlow::Continue(())).tokens;
    assert_eq!(run(5), run(5));
    assert!((6..16).any(|s| run(s) != run(5)), "the seed has no effect");
}

#[test]
fn stop_tokens_join_config_and_generation_config() {
    let dir = tiny_model_dir(1);
    let model = load::<B>(dir.path());
    let tok = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    let mut want = vec![tok.token_to_id("<|im_end|>").unwrap(), tok.token_to_id("<|endoftext|>").unwrap()];
    want.sort();
    assert_eq!(stop_token_ids(dir.path(), &model.config), want);
}
