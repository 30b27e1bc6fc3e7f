//! Helpers shared by the model, LoRA and generation tests (CPU backend, tiny models).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData};
use newt_model::llama::Llama;
use newt_model::tiny::{TinySpec, write_tiny_model};

/// The backend every test runs on.
pub type B = burn::backend::Flex;
/// With autodiff.
pub type AD = burn::backend::Autodiff<B>;

/// A few lines of text to train the tiny tokenizer on.
pub fn corpus() -> Vec<String> {
    let lines = [
        "The capital of France is Paris.",
        "The capital of Italy is Rome.",
        "What is the capital of Spain? Madrid.",
        "Rust is a systems programming language.",
        "A cat sat on the mat, and the dog sat on the log.",
        "Fine-tuning adapts a pretrained model to a task.",
        "One, two, three, four, five, six, seven, eight, nine, ten.",
    ];
    (0..4).flat_map(|_| lines.iter().map(|s| s.to_string())).collect()
}

/// A tiny random Llama written into a fresh temporary folder.
pub fn tiny_model_dir(seed: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec { seed, vocab_size: 400, ..TinySpec::default() };
    write_tiny_model(dir.path(), &spec, &corpus()).unwrap();
    dir
}

/// Loads a model folder on `Backend`.
pub fn load<Bk: burn::tensor::backend::Backend>(dir: &Path) -> Llama<Bk> {
    Llama::from_hf_dir(dir, &Default::default()).unwrap()
}

/// `[rows, cols]` int tensor.
pub fn ints<Bk: burn::tensor::backend::Backend>(v: &[i64], rows: usize, cols: usize) -> Tensor<Bk, 2, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), [rows, cols]), &Default::default())
}

/// Values of a float tensor.
pub fn floats<Bk: burn::tensor::backend::Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

/// `max |a - b| / max |b|`.
pub fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

/// Logits of one unpacked sequence per row (positions 0.., one segment).
pub fn logits<Bk: newt_model::backend::KernelBackend>(model: &Llama<Bk>, ids: &[i64], rows: usize) -> Vec<f32> {
    let cols = ids.len() / rows;
    let pos: Vec<i64> = (0..rows).flat_map(|_| 0..cols as i64).collect();
    floats(model.forward(ints(ids, rows, cols), ints(&pos, rows, cols), ints(&vec![1; ids.len()], rows, cols)))
}

/// `stages/model/tests/goldens` (found through the run-time `CARGO_MANIFEST_DIR` when set, so
/// a test binary copied to another machine finds the repo it runs in).
pub fn goldens_dir() -> PathBuf {
    let root = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from);
    root.unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR"))).join("tests").join("goldens")
}

/// Gives every adapter's B deterministic nonzero values, as if it had been trained.
pub fn perturb<Bk: burn::tensor::backend::Backend>(model: Llama<Bk>) -> Llama<Bk> {
    let mut k = 0u64;
    model
        .map_linears(|_, mut lin| {
            if let Some(ad) = lin.lora.as_mut() {
                let [out, r] = ad.lora_b.dims();
                let vals: Vec<f32> = (0..out * r)
                    .map(|i| (((i as u64 * 7919 + k * 104_729) % 1000) as f32 / 1000.0 - 0.5) * 0.2)
                    .collect();
                k += 1;
                ad.lora_b = burn::module::Param::from_tensor(Tensor::from_data(
                    burn::tensor::TensorData::new(vals, [out, r]),
                    (&Default::default(), burn::tensor::DType::F32),
                ));
            }
            Ok::<_, ()>(lin)
        })
        .unwrap()
}
