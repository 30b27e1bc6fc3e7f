//! A full fine-tune's output is a Hugging Face model folder: after a few steps of training every
//! weight, `full::save_model`'s folder (sharded, with its index) loads in transformers and gives
//! the logits newt's trained model gives, for a tied and an untied LM head.
//!
//! Needs Python with torch and transformers: NEWT_TORCH_PATH is put on PYTHONPATH (`.ci/run`
//! installs them there from PyPI and sets NEWT_REQUIRE_TORCH=1, which turns a missing import
//! into a failure instead of a skip).

mod model_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::tensor::{Int, Tensor, TensorData};
use model_support::{AD, goldens_dir};
use newt_model::llama::Llama;
use newt_model::tensors::{Dtype, TensorStore, encode_f32, write_single};
use newt_model::train::{self, NoHooks, PackedRow, TrainConfig, TrainData, TrainRun};

fn fixture_dir() -> PathBuf {
    goldens_dir().parent().unwrap().join("train_fixtures").join("full_first_step")
}

/// `python3` with NEWT_TORCH_PATH on its path, when it imports torch and transformers.
fn python_with_torch() -> Option<Command> {
    let py = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let cmd = || {
        let mut c = Command::new(&py);
        if let Some(p) = std::env::var_os("NEWT_TORCH_PATH") {
            c.env("PYTHONPATH", p);
        }
        c
    };
    let found = cmd().args(["-c", "import torch, transformers"]).output().is_ok_and(|o| o.status.success());
    if found {
        return Some(cmd());
    }
    assert!(
        std::env::var_os("NEWT_REQUIRE_TORCH").is_none(),
        "NEWT_REQUIRE_TORCH is set but `{py} -c 'import torch, transformers'` fails (NEWT_TORCH_PATH={:?})",
        std::env::var_os("NEWT_TORCH_PATH")
    );
    eprintln!("skipped: torch and transformers are not importable (set NEWT_TORCH_PATH to where they are)");
    None
}

/// The fixture with its own `lm_head.weight` (a copy of the embedding) and
/// `tie_word_embeddings: false`.
fn untied_copy(into: &Path) {
    let src = TensorStore::open(&fixture_dir()).unwrap();
    let mut tensors = Vec::new();
    for name in src.names() {
        let (_, shape) = src.info(&name).unwrap();
        let values = src.read_f32(&name).unwrap();
        if name == "model.embed_tokens.weight" {
            tensors.push(("lm_head.weight".to_string(), Dtype::F32, shape.clone(), encode_f32(Dtype::F32, &values)));
        }
        tensors.push((name, Dtype::F32, shape, encode_f32(Dtype::F32, &values)));
    }
    write_single(&into.join("model.safetensors"), &tensors).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("config.json")).unwrap()).unwrap();
    config["tie_word_embeddings"] = false.into();
    std::fs::write(into.join("config.json"), config.to_string()).unwrap();
}

fn rows() -> Vec<PackedRow> {
    (0..4)
        .map(|r| {
            let ids: Vec<i32> = (0..12).map(|t| ((r * 37 + t * 11) % 256) as i32).collect();
            PackedRow { labels: ids.clone(), input_ids: ids, position_ids: (0..12).collect() }
        })
        .collect()
}

fn check(model_dir: &Path, tied: bool, mut py: Command) {
    let dev = Default::default();
    let model = Llama::<AD>::from_hf_dir(model_dir, &dev).unwrap().train_full(None).unwrap();
    assert_eq!(model.lm_head.is_none(), tied);
    let cfg = TrainConfig {
        micro_batch_size: 2,
        max_steps: Some(3),
        learning_rate: 1e-2,
        weight_decay: 0.1,
        ..Default::default()
    };
    let work = tempfile::tempdir().unwrap();
    let data = TrainData::from_rows(rows()).unwrap();
    let (trained, _) =
        train::train(model, &data, &cfg, &TrainRun::new(work.path().join("ckpt")), &mut NoHooks, &dev).unwrap();
    let trained = burn::module::AutodiffModule::valid(&trained);
    let out = work.path().join("model");
    // Small shards: the index is exercised too.
    let files = newt_model::full::save_model(&trained, model_dir, model_dir, &out, 100_000).unwrap();
    assert!(files.iter().any(|f| f.ends_with("model.safetensors.index.json")), "{files:?}");
    let saved = TensorStore::open(&out).unwrap();
    assert_eq!(saved.names().contains(&"lm_head.weight".to_string()), !tied);
    // Training moved the weights away from the file's.
    let before = TensorStore::open(model_dir).unwrap();
    let moved = |name: &str| {
        let (a, b) = (before.read_f32(name).unwrap(), saved.read_f32(name).unwrap());
        a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
    };
    assert!(moved("model.layers.1.mlp.down_proj.weight") > 1e-3 && moved("model.norm.weight") > 1e-3);

    let ids: Vec<i64> = vec![5, 17, 200, 3, 99, 42, 7, 7, 128, 250, 1, 64];
    let t = ids.len();
    let newt: Vec<f32> = trained
        .forward(
            Tensor::<_, 2, Int>::from_data(TensorData::new(ids.clone(), [1, t]), &dev),
            Tensor::<_, 2, Int>::from_data(TensorData::new((0..t as i64).collect::<Vec<_>>(), [1, t]), &dev),
            Tensor::<_, 2, Int>::from_data(TensorData::new(vec![1i64; t], [1, t]), &dev),
        )
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap();
    let ids_file = work.path().join("ids.json");
    std::fs::write(&ids_file, serde_json::json!({ "input_ids": ids }).to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/hf_full_logits.py");
    let o = py.arg(script).arg(&out).arg(&ids_file).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let hf: Vec<f32> = v["logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    assert_eq!(hf.len(), newt.len());
    let scale = hf.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = hf.iter().zip(&newt).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!(
        "tied {tied}: transformers {} vs newt logits: max |diff| {diff:.2e} (max |logit| {scale:.2})",
        v["transformers"]
    );
    assert!(diff < 1e-4 * scale.max(1.0), "max |diff| {diff}");
}

#[test]
fn a_saved_full_fine_tune_loads_in_transformers_and_gives_newts_logits() {
    let Some(py) = python_with_torch() else { return };
    check(&fixture_dir(), true, py);
    let untied = tempfile::tempdir().unwrap();
    untied_copy(untied.path());
    check(untied.path(), false, python_with_torch().unwrap());
}
