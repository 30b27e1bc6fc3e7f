//! First-step parity with PEFT: newt's training loss and LoRA gradients on a fixed batch equal
//! what torch + PEFT compute for the same base model, adapter and batch.
//!
//! Goldens (adapter in PEFT's own format, loss, gradients) come from
//! `scripts/train_peft_first_step_golden.py`, run once on a machine with torch and committed
//! under `tests/train_fixtures/peft_first_step/`; the base model is the logits-parity fixture
//! `tests/goldens/llama`. The gradients are taken the way the trainer takes them
//! (`train::step_gradients` on `Autodiff<Flex>`: Σ token loss backward, divided by the trained
//! tokens), over one micro-batch holding a plain row and a packed row.

mod model_support;

use std::path::{Path, PathBuf};

use model_support::{AD, B, goldens_dir};
use newt_model::llama::Llama;
use newt_model::peft::load_adapter;
use newt_model::tensors::TensorStore;
use newt_model::train::{PackedRow, ParamGrads, TrainData, step_gradients};
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    goldens_dir().parent().unwrap().join("train_fixtures").join("peft_first_step")
}

fn ints(v: &Value) -> Vec<i32> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect()
}

/// The golden batch, in newt's row format (unshifted labels, positions restarting per sample).
fn golden_rows(golden: &Value) -> Vec<PackedRow> {
    golden["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| PackedRow {
            input_ids: ints(&r["input_ids"]),
            labels: ints(&r["labels"]),
            position_ids: ints(&r["position_ids"]),
        })
        .collect()
}

/// PEFT's key for a newt gradient path (`layers.0.self_attn.q_proj.lora.lora_a` →
/// `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).
fn peft_key(path: &str) -> String {
    let (module, part) = path.rsplit_once(".lora.").unwrap_or_else(|| panic!("{path} is not a LoRA parameter"));
    let part = match part {
        "lora_a" => "lora_A",
        "lora_b" => "lora_B",
        other => panic!("unexpected LoRA part {other} in {path}"),
    };
    format!("base_model.model.model.{module}.{part}.weight")
}

/// Loss and gradients of the trainer's first step on the golden batch, keyed by PEFT name.
fn newt_first_step(adapter: &Path, rows: Vec<PackedRow>, chunk_tokens: usize) -> (f64, usize, Vec<(String, Vec<f32>)>) {
    first_step(adapter, rows, chunk_tokens, false)
}

/// [`newt_first_step`], optionally with `gradient_checkpointing` (the model's own layer-by-layer
/// backward pass).
fn first_step(
    adapter: &Path,
    rows: Vec<PackedRow>,
    chunk_tokens: usize,
    checkpointing: bool,
) -> (f64, usize, Vec<(String, Vec<f32>)>) {
    let device = Default::default();
    let base = Llama::<AD>::from_hf_dir(&goldens_dir().join("llama"), &device).unwrap();
    let (mut model, _cfg) = load_adapter(base, adapter).unwrap();
    model.loss_chunk_tokens = chunk_tokens;
    model.gradient_checkpointing = checkpointing;
    let data = TrainData::from_rows(rows).unwrap();
    let all: Vec<usize> = (0..data.len()).collect();
    let own = newt_model::train::SelfBackward::self_backward(&model, &data.micro_batch::<AD>(&all, &device));
    assert_eq!(own.is_some(), checkpointing, "the model runs its own backward pass exactly when checkpointing");
    let step = step_gradients::<AD, _>(&model, &data, &[(0..data.len()).collect()], &device);
    let loss = step.loss();
    let tokens = step.trained_tokens;
    let mut grads: ParamGrads<_> = step.grads;
    let paths: Vec<String> = grads.paths().map(str::to_string).collect();
    let named = paths
        .into_iter()
        .map(|p| {
            let g = grads.remove(&p).unwrap();
            (peft_key(&p), g.into_data().convert::<f32>().into_vec::<f32>().unwrap())
        })
        .collect();
    (loss, tokens, named)
}

/// The gradients by parameter path (newt's), flattened to f32, in path order.
fn by_path(mut grads: ParamGrads<B>) -> Vec<(String, Vec<f32>)> {
    let paths: Vec<String> = grads.paths().map(str::to_string).collect();
    paths
        .into_iter()
        .map(|p| (p.clone(), grads.remove(&p).unwrap().into_data().convert::<f32>().into_vec::<f32>().unwrap()))
        .collect()
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// The goldens: loss, trained tokens, the batch, and the gradient file.
struct Golden {
    loss: f64,
    tokens: usize,
    rows: Vec<PackedRow>,
    grads: TensorStore,
}

fn golden() -> Golden {
    let dir = fixture_dir();
    let json: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    Golden {
        loss: json["loss"].as_f64().unwrap(),
        tokens: json["trained_tokens"].as_u64().unwrap() as usize,
        rows: golden_rows(&json),
        grads: TensorStore::open_file(&dir.join("golden.safetensors")).unwrap(),
    }
}

/// Relative loss difference and the worst gradient's max |newt - PEFT| / max |PEFT| (with its
/// name), after checking that newt trains exactly the golden's parameters.
fn differences(g: &Golden, loss: f64, grads: &[(String, Vec<f32>)]) -> (f64, f32, String) {
    let mut want_names = g.grads.names();
    want_names.sort();
    let mut got_names: Vec<String> = grads.iter().map(|(k, _)| k.clone()).collect();
    got_names.sort();
    assert_eq!(got_names, want_names, "newt trains exactly the adapter's parameters");
    let mut worst = (0f32, String::new());
    for (name, got) in grads {
        let want = g.grads.read_f32(name).unwrap();
        assert_eq!(got.len(), want.len(), "{name} size");
        let scale = max_abs(&want);
        assert!(scale > 0.0, "{name}: a zero golden gradient tests nothing");
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
        if diff >= worst.0 {
            worst = (diff, name.clone());
        }
    }
    (((loss - g.loss) / g.loss).abs(), worst.0, worst.1)
}

#[test]
fn first_step_loss_and_lora_grads_match_peft() {
    let g = golden();
    assert!(g.rows.iter().any(|r| r.position_ids.iter().skip(1).any(|&p| p == 0)), "the batch must hold a packed row");
    // A chunk size that splits the 2×12 positions unevenly, so the chunked loss is what is tested.
    let (loss, tokens, grads) = newt_first_step(&fixture_dir().join("adapter"), g.rows.clone(), 7);
    assert_eq!(tokens, g.tokens, "trained tokens");
    let (loss_rel, grad_rel, worst) = differences(&g, loss, &grads);
    println!("loss newt {loss:.9} PEFT {:.9}: rel diff {loss_rel:.2e}", g.loss);
    println!("{} LoRA gradients: worst max|newt - PEFT|/max|PEFT| {grad_rel:.2e} ({worst})", grads.len());
    assert!(loss_rel < 1e-5, "loss {loss} vs PEFT {}: rel diff {loss_rel:.2e}", g.loss);
    assert!(grad_rel < 1e-4, "{worst}: max |newt - PEFT| / max |PEFT| = {grad_rel:.2e}");
}

/// The tolerances above are tight enough to notice a LoRA scale off by 1% (alpha 10.1 for 10).
#[test]
fn a_one_percent_wrong_lora_scale_misses_the_peft_goldens() {
    let g = golden();
    let adapter = tempfile::tempdir().unwrap();
    let src = fixture_dir().join("adapter");
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(src.join(f), adapter.path().join(f)).unwrap();
    }
    let cfg_path = adapter.path().join("adapter_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["lora_alpha"] = serde_json::json!(cfg["lora_alpha"].as_f64().unwrap() * 1.01);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let (loss, _, grads) = newt_first_step(adapter.path(), g.rows.clone(), 7);
    let (loss_rel, grad_rel, _) = differences(&g, loss, &grads);
    println!("alpha × 1.01: loss rel diff {loss_rel:.2e}, worst gradient rel diff {grad_rel:.2e}");
    assert!(loss_rel > 1e-5 && grad_rel > 1e-4, "a wrong scale went unnoticed: {loss_rel:.2e}, {grad_rel:.2e}");
}

/// Gradient checkpointing (each layer recomputed and back-propagated alone) gives PEFT's loss and
/// gradients too, and the same as the ordinary backward pass to float rounding.
#[test]
fn gradient_checkpointing_gives_the_same_loss_and_grads() {
    let g = golden();
    let adapter = fixture_dir().join("adapter");
    let (loss, tokens, grads) = first_step(&adapter, g.rows.clone(), 7, true);
    assert_eq!(tokens, g.tokens);
    let (loss_rel, grad_rel, worst) = differences(&g, loss, &grads);
    println!("checkpointed: loss rel diff {loss_rel:.2e}, worst gradient rel diff {grad_rel:.2e} ({worst})");
    assert!(loss_rel < 1e-5 && grad_rel < 1e-4, "{worst}: {loss_rel:.2e}, {grad_rel:.2e}");
    let (plain_loss, _, plain) = first_step(&adapter, g.rows.clone(), 7, false);
    assert!(((loss - plain_loss) / plain_loss).abs() < 1e-6);
    for ((name, a), (name_b, b)) in grads.iter().zip(&plain) {
        assert_eq!(name, name_b);
        let scale = max_abs(b);
        let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff <= 1e-5 * scale, "{name}: checkpointed vs plain differ by {diff} (scale {scale})");
    }
}

/// LoRA dropout with gradient checkpointing: each recomputed layer draws the masks its forward
/// pass drew (both seeded from the micro-batch's seed and the layer), so the checkpointed
/// gradients are the ordinary pass's with the same masks. Dropout is on: the gradients differ
/// from a run without it.
#[test]
fn gradient_checkpointing_with_lora_dropout_recomputes_the_same_masks() {
    let g = golden();
    let device = Default::default();
    let run = |checkpointing: bool, dropout: f64| {
        let base = Llama::<AD>::from_hf_dir(&goldens_dir().join("llama"), &device).unwrap();
        let (model, _) = load_adapter(base, &fixture_dir().join("adapter")).unwrap();
        let mut model = model
            .map_linears(|_, mut linear| {
                if let Some(a) = linear.lora.as_mut() {
                    a.dropout = dropout;
                }
                Ok::<_, std::convert::Infallible>(linear)
            })
            .unwrap();
        model.gradient_checkpointing = checkpointing;
        let data = TrainData::from_rows(g.rows.clone()).unwrap();
        let all: Vec<usize> = (0..data.len()).collect();
        let batch = data.micro_batch::<AD>(&all, &device);
        let own = newt_model::train::with_batch_seed(9, || {
            newt_model::train::SelfBackward::self_backward(&model, &batch).is_some()
        });
        assert_eq!(own, checkpointing, "checkpointing runs with dropout inside the training loop");
        if dropout > 0.0 {
            // Outside it there is no seed to redraw the masks from: the ordinary pass.
            assert!(newt_model::train::SelfBackward::self_backward(&model, &batch).is_none());
        }
        let step = step_gradients::<AD, _>(&model, &data, &[all], &device);
        let loss = step.loss();
        (loss, by_path(step.grads))
    };
    let (plain_loss, plain) = run(false, 0.3);
    let (ckpt_loss, ckpt) = run(true, 0.3);
    let (off_loss, off) = run(false, 0.0);
    assert!(((plain_loss - ckpt_loss) / plain_loss).abs() < 1e-6, "{plain_loss} vs {ckpt_loss}");
    let mut moved = 0f32;
    for (((name, a), (_, b)), (_, c)) in plain.iter().zip(&ckpt).zip(&off) {
        let scale = max_abs(a);
        let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff <= 1e-5 * scale, "{name}: checkpointed vs plain differ by {diff} (scale {scale})");
        moved = moved.max(a.iter().zip(c).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale.max(1e-12));
    }
    assert!(moved > 1e-2, "dropout must change the gradients (largest relative change {moved})");
    assert_ne!(plain_loss, off_loss);
}

/// A quantized base (QLoRA's NF4, `load_in_8bit`'s int8) with gradient checkpointing: each
/// recomputed layer's `down_proj` computes no product (the layer's output is the next layer's
/// saved input), and the loss and gradients are still the ordinary backward pass's. (The bf16
/// fused path and the dropout path are the two tests above.)
#[test]
fn gradient_checkpointing_on_a_quantized_base_gives_the_ordinary_grads() {
    use newt_kernels::nf4::QuantCode;
    let g = golden();
    let device = Default::default();
    for code in [QuantCode::Nf4, QuantCode::Int8] {
        let run = |checkpointing: bool| {
            let base = Llama::<AD>::from_hf_dir(&goldens_dir().join("llama"), &device).unwrap().quantize_base(code);
            let (mut model, _) = load_adapter(base, &fixture_dir().join("adapter")).unwrap();
            model.gradient_checkpointing = checkpointing;
            let data = TrainData::from_rows(g.rows.clone()).unwrap();
            let all: Vec<usize> = (0..data.len()).collect();
            let own = newt_model::train::SelfBackward::self_backward(&model, &data.micro_batch::<AD>(&all, &device));
            assert_eq!(own.is_some(), checkpointing);
            let step = step_gradients::<AD, _>(&model, &data, &[all], &device);
            let loss = step.loss();
            (loss, by_path(step.grads))
        };
        let ((plain_loss, plain), (ckpt_loss, ckpt)) = (run(false), run(true));
        assert!(((plain_loss - ckpt_loss) / plain_loss).abs() < 1e-6, "{code:?}: {plain_loss} vs {ckpt_loss}");
        assert_eq!(plain.len(), ckpt.len());
        assert!(plain.iter().any(|(name, _)| name.contains("down_proj")), "down_proj's adapter is trained");
        for ((name, a), (name_b, b)) in plain.iter().zip(&ckpt) {
            assert_eq!(name, name_b);
            let scale = max_abs(a);
            assert!(scale > 0.0 || !name.contains("down_proj"), "{code:?} {name}: a zero gradient compares nothing");
            let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(diff <= 1e-5 * scale, "{code:?} {name}: checkpointed vs plain differ by {diff} (scale {scale})");
        }
    }
}
