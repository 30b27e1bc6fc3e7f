//! Full fine-tuning against PyTorch: newt's first-step loss and the gradient of every weight,
//! and one AdamW step over all of them, equal what transformers + torch compute.
//!
//! Goldens come from `scripts/train_full_first_step_golden.py` (torch on the CPU, float64 for
//! the gradients, the step in f32), committed under `tests/train_fixtures/full_first_step/`
//! with the model they were taken on (the tiny Llama fixture with its RMSNorm weights
//! perturbed; tied embeddings, so the embedding's gradient has the LM head's share in it).

mod model_support;

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::tensor::{Tensor, TensorData};
use model_support::{AD, B, goldens_dir};
use newt_model::full::{Unfrozen, hf_name};
use newt_model::llama::Llama;
use newt_model::tensors::TensorStore;
use newt_model::train::{AdamW, AdamWParams, PackedRow, ParamGrads, TrainData, step_gradients, trainable_params};
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    goldens_dir().parent().unwrap().join("train_fixtures").join("full_first_step")
}

fn ints(v: &Value) -> Vec<i32> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect()
}

struct Golden {
    json: Value,
    rows: Vec<PackedRow>,
    grads: TensorStore,
    after: TensorStore,
}

fn golden() -> Golden {
    let dir = fixture_dir();
    let json: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let rows = json["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| PackedRow {
            input_ids: ints(&r["input_ids"]),
            labels: ints(&r["labels"]),
            position_ids: ints(&r["position_ids"]),
        })
        .collect();
    Golden {
        rows,
        grads: TensorStore::open_file(&dir.join("golden.safetensors")).unwrap(),
        after: TensorStore::open_file(&dir.join("after_step.safetensors")).unwrap(),
        json,
    }
}

fn model(checkpointing: bool) -> Llama<AD> {
    let mut m = Llama::<AD>::from_hf_dir(&fixture_dir(), &Default::default()).unwrap().train_full(None).unwrap();
    // A chunk that splits the 2 × 12 positions unevenly: the chunked loss is what is tested.
    m.loss_chunk_tokens = 7;
    m.gradient_checkpointing = checkpointing;
    m
}

/// Loss, trained tokens and the gradients of the trainer's first step, by Hugging Face name.
fn first_step(m: &Llama<AD>, rows: Vec<PackedRow>) -> (f64, usize, BTreeMap<String, Vec<f32>>) {
    let data = TrainData::from_rows(rows).unwrap();
    let step = step_gradients::<AD, _>(m, &data, &[(0..data.len()).collect()], &Default::default());
    let (loss, tokens) = (step.loss(), step.trained_tokens);
    let mut grads: ParamGrads<_> = step.grads;
    let paths: Vec<String> = grads.paths().map(str::to_string).collect();
    let named = paths
        .into_iter()
        .map(|p| {
            let g = grads.remove(&p).unwrap();
            (hf_name(&p), g.into_data().convert::<f32>().into_vec::<f32>().unwrap())
        })
        .collect();
    (loss, tokens, named)
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// max |a - b| / max |b|.
fn rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / max_abs(b).max(f32::MIN_POSITIVE)
}

/// The worst gradient's relative difference from torch's, after checking the names.
fn worst_gradient(g: &Golden, grads: &BTreeMap<String, Vec<f32>>) -> (f32, String) {
    let mut want: Vec<String> = g.grads.names();
    want.sort();
    assert_eq!(grads.keys().cloned().collect::<Vec<_>>(), want, "newt trains exactly torch's parameters");
    let mut worst = (0f32, String::new());
    for (name, got) in grads {
        let d = rel(got, &g.grads.read_f32(name).unwrap());
        if d >= worst.0 {
            worst = (d, name.clone());
        }
    }
    worst
}

#[test]
fn first_step_loss_and_every_gradient_match_torch() {
    let g = golden();
    let (loss, tokens, grads) = first_step(&model(false), g.rows.clone());
    assert_eq!(tokens as u64, g.json["trained_tokens"].as_u64().unwrap());
    let want = g.json["loss"].as_f64().unwrap();
    let loss_rel = ((loss - want) / want).abs();
    let (grad_rel, name) = worst_gradient(&g, &grads);
    println!(
        "loss newt {loss:.9} torch {want:.9} (rel {loss_rel:.2e}); {} gradients, worst rel {grad_rel:.2e} ({name})",
        grads.len()
    );
    assert_eq!(grads.len(), 20, "2 layers × (7 linears + 2 norms) + embedding + final norm");
    assert!(loss_rel < 1e-5, "loss rel diff {loss_rel:.2e}");
    assert!(grad_rel < 1e-4, "{name}: {grad_rel:.2e}");
}

/// Gradient checkpointing (the model's own layer-by-layer backward, the embedding's gradient
/// taken last) gives the same loss and gradients.
#[test]
fn gradient_checkpointing_gives_the_same_full_gradients() {
    let g = golden();
    let m = model(true);
    let data = TrainData::from_rows(g.rows.clone()).unwrap();
    let all: Vec<usize> = (0..data.len()).collect();
    let own = newt_model::train::SelfBackward::self_backward(&m, &data.micro_batch::<AD>(&all, &Default::default()));
    assert!(own.is_some(), "a trained embedding no longer turns checkpointing off");
    let (loss, _, grads) = first_step(&m, g.rows.clone());
    let (plain_loss, _, plain) = first_step(&model(false), g.rows.clone());
    assert!(((loss - plain_loss) / plain_loss).abs() < 1e-6);
    for (name, got) in &grads {
        let d = rel(got, &plain[name]);
        assert!(d < 1e-5, "{name}: checkpointed vs plain {d:.2e}");
    }
    let (grad_rel, name) = worst_gradient(&g, &grads);
    assert!(grad_rel < 1e-4, "{name}: {grad_rel:.2e}");
}

/// One optimizer step over every weight from torch's gradients: global-norm clipping, then
/// AdamW with the Trainer's decay groups (norm weights not decayed), equals torch's step.
#[test]
fn one_adamw_step_over_all_weights_matches_torch() {
    let g = golden();
    let opt = &g.json["optimizer"];
    let m = model(false);
    let device = Default::default();
    let paths: Vec<String> = trainable_params(&m).into_keys().collect();
    let mut grads = ParamGrads::<B>::default();
    for p in &paths {
        let values = g.grads.read_f32(&hf_name(p)).unwrap();
        let n = values.len();
        grads.insert(p.clone(), Tensor::from_data(TensorData::new(values, [n]), &device));
    }
    let norm = grads.clip_global_norm(opt["max_grad_norm"].as_f64().unwrap());
    let want_norm = g.json["grad_norm_before_clip"].as_f64().unwrap();
    assert!((norm - want_norm).abs() < 1e-5 * want_norm, "grad norm {norm} vs torch {want_norm}");
    let betas = opt["betas"].as_array().unwrap();
    let mut adamw = AdamW::<B>::new(AdamWParams {
        beta1: betas[0].as_f64().unwrap(),
        beta2: betas[1].as_f64().unwrap(),
        eps: opt["eps"].as_f64().unwrap(),
        weight_decay: opt["weight_decay"].as_f64().unwrap(),
    });
    let stepped = adamw.step::<AD, _>(m, grads, opt["lr"].as_f64().unwrap());
    let after = trainable_params(&stepped);
    let before = trainable_params(&model(false));
    let mut worst = (0f32, String::new());
    for (p, v) in &after {
        let name = hf_name(p);
        let want = g.after.read_f32(&name).unwrap();
        let d = v.values.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        if d >= worst.0 {
            worst = (d, name);
        }
        assert!(rel(&v.values, &before[p].values) > 1e-5, "{p} did not move");
    }
    println!("after one AdamW step: worst max |newt - torch| {:.2e} ({}); lr {}", worst.0, worst.1, opt["lr"]);
    // Each weight moved by about lr = 1e-3; f32 rounding is ~1e-7.
    assert!(worst.0 < 2e-6, "{}: {:.2e}", worst.1, worst.0);
}

/// `unfrozen_parameters` trains the weights it names and nothing else.
#[test]
fn unfrozen_parameters_train_only_what_they_name() {
    let dev = Default::default();
    let base = || Llama::<AD>::from_hf_dir(&fixture_dir(), &dev).unwrap();
    let u = Unfrozen::parse(&["model.layers.1.mlp".into(), "^model.norm.weight$".into()]).unwrap();
    let m = base().train_full(Some(&u)).unwrap();
    let names: Vec<String> = trainable_params(&m).into_keys().map(|p| hf_name(&p)).collect();
    assert_eq!(
        names,
        [
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.1.mlp.gate_proj.weight",
            "model.layers.1.mlp.up_proj.weight",
            "model.norm.weight"
        ]
    );
    let g = golden();
    let (_, _, grads) = first_step(&m, g.rows.clone());
    assert_eq!(grads.keys().cloned().collect::<Vec<_>>(), names, "only the unfrozen weights get gradients");
    for (name, got) in &grads {
        assert!(rel(got, &g.grads.read_f32(name).unwrap()) < 1e-4, "{name}");
    }
    let none = Unfrozen::parse(&["^nothing$".into()]).unwrap();
    let err = base().train_full(Some(&none)).unwrap_err().to_string();
    assert!(err.contains("matches no parameter") && err.contains("model.embed_tokens.weight"), "{err}");
}

/// Stops the run once `at` steps are done.
struct StopAt {
    at: usize,
    done: usize,
}

impl<M> newt_model::train::TrainHooks<M> for StopAt {
    fn on_step(&mut self, r: &newt_model::train::StepReport) {
        self.done = r.step;
    }
    fn cancelled(&self) -> bool {
        self.done >= self.at
    }
}

/// A full fine-tune stopped mid-run and resumed from its checkpoint (every weight and its AdamW
/// moments) ends where an uninterrupted run ends.
#[test]
fn a_stopped_full_fine_tune_resumes_to_the_uninterrupted_weights() {
    use newt_model::train::{NoHooks, TrainConfig, TrainError, TrainRun};
    let dev = Default::default();
    let rows: Vec<PackedRow> = (0..8)
        .map(|r| {
            let ids: Vec<i32> = (0..10).map(|t| ((r * 29 + t * 13) % 256) as i32).collect();
            PackedRow { labels: ids.clone(), input_ids: ids, position_ids: (0..10).collect() }
        })
        .collect();
    let data = TrainData::from_rows(rows).unwrap();
    let cfg = TrainConfig {
        micro_batch_size: 2,
        gradient_accumulation_steps: 2,
        num_epochs: 3.0, // 4 micro-batches → 2 steps an epoch, 6 in all
        learning_rate: 5e-3,
        weight_decay: 0.1,
        warmup_steps: Some(1),
        save_steps: Some(2),
        ..Default::default()
    };
    let a_dir = tempfile::tempdir().unwrap();
    let (a, _) =
        newt_model::train::train(model(false), &data, &cfg, &TrainRun::new(a_dir.path()), &mut NoHooks, &dev).unwrap();

    let b_dir = tempfile::tempdir().unwrap();
    let run = TrainRun::new(b_dir.path());
    let err =
        newt_model::train::train(model(false), &data, &cfg, &run, &mut StopAt { at: 3, done: 0 }, &dev).unwrap_err();
    assert!(matches!(err, TrainError::Cancelled { step: 3, checkpoint: Some(3) }), "{err}");
    let (b, summary) = newt_model::train::train(model(false), &data, &cfg, &run, &mut NoHooks, &dev).unwrap();
    assert_eq!(summary.resumed_from, Some(3));
    let (pa, pb) = (trainable_params(&a), trainable_params(&b));
    assert_eq!(pa.len(), 20, "every weight is in the checkpoint");
    let base = trainable_params(&model(false));
    for (k, v) in &pa {
        let diff = v.values.iter().zip(&pb[k].values).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-6, "{k}: resumed differs by {diff}");
        assert!(rel(&v.values, &base[k].values) > 1e-4, "{k} did not train");
    }
}
