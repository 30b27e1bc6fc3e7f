//! The Llama-family model: parity with transformers, packed batches, load errors.

mod model_support;

use burn::tensor::Tensor;
use model_support::*;
use newt_model::config::ModelConfig;
use newt_model::llama::{LoadError, TrainBatch};
use newt_model::tensors::TensorStore;
use serde_json::Value;

#[test]
fn model_logits_match_transformers() {
    let mut checked = 0;
    for arch in ["llama", "mistral", "qwen2", "qwen3"] {
        let dir = goldens_dir().join(arch);
        if !dir.join("golden.json").is_file() {
            eprintln!(
                "skipping {arch}: no goldens in {} (run scripts/model_parity_goldens.py there with torch)",
                dir.display()
            );
            continue;
        }
        let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
        let rows = meta["input_ids"].as_array().unwrap();
        let ids: Vec<i64> =
            rows.iter().flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_i64().unwrap())).collect();
        let want = TensorStore::open_file(&dir.join("golden.safetensors")).unwrap().read_f32("logits").unwrap();
        let model = load::<B>(&dir);
        assert_eq!(model.config.architecture.hf_name(), meta["architecture"].as_str().unwrap());
        let got = logits(&model, &ids, rows.len());
        let rel = rel_diff(&got, &want);
        eprintln!("{arch}: max relative error {rel:.2e} over {} logits", want.len());
        assert!(rel < 1e-4, "{arch}: logits differ from transformers by {rel:e} (relative)");
        checked += 1;
    }
    if checked == 0 {
        eprintln!("model_logits_match_transformers: no goldens present, nothing compared");
    }
}

/// One packed row holding three samples and padding gives the same summed loss and token
/// count as the three samples run alone.
#[test]
fn packed_loss_equals_mean_of_unpacked() {
    let dir = tiny_model_dir(3);
    let model = load::<B>(dir.path());
    let v = model.config.vocab_size as i64;
    let samples: Vec<(Vec<i64>, Vec<i64>)> = [5usize, 4, 3]
        .iter()
        .enumerate()
        .map(|(s, &len)| {
            let ids: Vec<i64> = (0..len as i64).map(|i| (i * 37 + s as i64 * 101 + 11) % v).collect();
            // The first two tokens of each sample are "prompt": not trained on.
            let labels = ids.iter().enumerate().map(|(i, &t)| if i < 2 { -100 } else { t }).collect();
            (ids, labels)
        })
        .collect();

    let (mut sum, mut tokens) = (0.0f64, 0usize);
    for (ids, labels) in &samples {
        let n = ids.len();
        let out = model.loss(&TrainBatch {
            input_ids: ints(ids, 1, n),
            labels: ints(labels, 1, n),
            position_ids: ints(&(0..n as i64).collect::<Vec<_>>(), 1, n),
            segment_ids: ints(&vec![1; n], 1, n),
            host_targets: None,
        });
        sum += out.sum.into_scalar() as f64;
        tokens += out.tokens;
    }

    let (mut ids, mut labels, mut pos, mut seg) = (vec![], vec![], vec![], vec![]);
    for (s, (i, l)) in samples.iter().enumerate() {
        ids.extend(i);
        labels.extend(l);
        pos.extend(0..i.len() as i64);
        seg.extend(std::iter::repeat_n(s as i64 + 1, i.len()));
    }
    for _ in 0..2 {
        ids.push(0);
        labels.push(7); // padding labels must be ignored whatever they say
        pos.push(0);
        seg.push(0);
    }
    let n = ids.len();
    let packed = model.loss(&TrainBatch {
        input_ids: ints(&ids, 1, n),
        labels: ints(&labels, 1, n),
        position_ids: ints(&pos, 1, n),
        segment_ids: ints(&seg, 1, n),
        host_targets: None,
    });
    assert_eq!(packed.tokens, tokens);
    // 3 + 2 + 1 targets: a sample's last token never predicts the next sample's first.
    assert_eq!(tokens, 6);
    let packed_sum = packed.sum.into_scalar() as f64;
    assert!(
        (packed_sum / tokens as f64 - sum / tokens as f64).abs() < 1e-5,
        "packed mean {} vs unpacked mean {}",
        packed_sum / tokens as f64,
        sum / tokens as f64
    );
    // Targets shifted on the host (as TrainData builds batches) give the same loss.
    let host = model.loss(&TrainBatch {
        input_ids: ints(&ids, 1, n),
        labels: ints(&labels, 1, n),
        position_ids: ints(&pos, 1, n),
        segment_ids: ints(&seg, 1, n),
        host_targets: Some(newt_model::llama::shift_within_segments(&labels, &seg, n)),
    });
    assert_eq!(host.tokens, tokens);
    assert_eq!(host.sum.into_scalar() as f64, packed_sum);
}

#[test]
fn loss_equals_cross_entropy_of_the_logits() {
    let dir = tiny_model_dir(4);
    let model = load::<B>(dir.path());
    let ids: Vec<i64> = vec![5, 17, 3, 99, 42, 8];
    let n = ids.len();
    let logits = logits(&model, &ids, 1);
    let v = model.config.vocab_size;
    let mut want = 0.0f64;
    for t in 0..n - 1 {
        let row = &logits[t * v..(t + 1) * v];
        let max = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let lse = max + row.iter().map(|x| (*x as f64 - max).exp()).sum::<f64>().ln();
        want += lse - row[ids[t + 1] as usize] as f64;
    }
    let got = model.loss(&TrainBatch {
        input_ids: ints(&ids, 1, n),
        labels: ints(&ids, 1, n),
        position_ids: ints(&(0..n as i64).collect::<Vec<_>>(), 1, n),
        segment_ids: ints(&vec![1; n], 1, n),
        host_targets: None,
    });
    assert_eq!(got.tokens, n - 1);
    let got = got.sum.into_scalar() as f64;
    assert!((got - want).abs() < 1e-4 * want, "{got} vs {want}");
}

#[test]
fn unsupported_architecture_is_a_clear_error() {
    let dir = tiny_model_dir(0);
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap().replace("LlamaForCausalLM", "GPTNeoXForCausalLM");
    std::fs::write(&path, text).unwrap();
    let err = newt_model::llama::Llama::<B>::from_hf_dir(dir.path(), &Default::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, LoadError::Config(_)));
    assert!(
        msg.contains("GPTNeoXForCausalLM")
            && msg.contains("LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"),
        "{msg}"
    );
    assert!(msg.contains("config.json"), "{msg}");
}

#[test]
fn a_missing_config_field_names_field_and_file() {
    let dir = tiny_model_dir(0);
    let path = dir.path().join("config.json");
    let mut json: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("num_hidden_layers");
    std::fs::write(&path, json.to_string()).unwrap();
    let msg = ModelConfig::from_dir(dir.path()).unwrap_err().to_string();
    assert!(msg.contains("num_hidden_layers") && msg.contains(&path.display().to_string()), "{msg}");
}

#[test]
fn a_truncated_checkpoint_is_an_error_not_a_panic() {
    let dir = tiny_model_dir(0);
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = newt_model::llama::Llama::<B>::from_hf_dir(dir.path(), &Default::default()).unwrap_err();
    assert!(matches!(err, LoadError::Tensors(_)), "{err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn a_tensor_of_the_wrong_shape_is_named() {
    let dir = tiny_model_dir(0);
    let path = dir.path().join("config.json");
    let text =
        std::fs::read_to_string(&path).unwrap().replace("\"intermediate_size\": 256", "\"intermediate_size\": 128");
    std::fs::write(&path, text).unwrap();
    let err = newt_model::llama::Llama::<B>::from_hf_dir(dir.path(), &Default::default()).unwrap_err();
    assert!(matches!(&err, LoadError::Shape { name, .. } if name == "model.layers.0.mlp.gate_proj.weight"), "{err}");
}

#[test]
fn frozen_base_weights_get_no_gradient() {
    let dir = tiny_model_dir(1);
    let model = load::<AD>(dir.path());
    let ids: Vec<i64> = vec![1, 2, 3, 4];
    let loss = model.loss(&TrainBatch {
        input_ids: ints(&ids, 1, 4),
        labels: ints(&ids, 1, 4),
        position_ids: ints(&[0, 1, 2, 3], 1, 4),
        segment_ids: ints(&[1, 1, 1, 1], 1, 4),
        host_targets: None,
    });
    let grads = loss.sum.backward();
    let w: Tensor<AD, 2> = model.layers[0].self_attn.q_proj.weight.val();
    assert!(w.grad(&grads).is_none());
    assert!(model.embed_tokens.val().grad(&grads).is_none());
}
