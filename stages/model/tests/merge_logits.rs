//! A merged model gives the logits of base + adapter (newt on both sides).

mod model_support;

use burn::module::Param;
use burn::tensor::{DType, Tensor, TensorData};
use model_support::*;
use newt_model::llama::Llama;
use newt_model::lora::LoraConfig;
use newt_model::merge::{MergeOptions, merge_lora};
use newt_model::peft::save_adapter;

const IDS: [i64; 8] = [3, 14, 15, 92, 65, 35, 89, 79];

/// Nonzero B everywhere, as after training.
fn trained<Bk: burn::tensor::backend::Backend>(model: Llama<Bk>) -> Llama<Bk> {
    let mut k = 0u64;
    model
        .map_linears(|_, mut lin| {
            if let Some(ad) = lin.lora.as_mut() {
                let [out, r] = ad.lora_b.dims();
                let vals: Vec<f32> = (0..out * r)
                    .map(|i| (((i as u64 * 7919 + k * 104_729) % 1000) as f32 / 1000.0 - 0.5) * 0.2)
                    .collect();
                k += 1;
                ad.lora_b = Param::from_tensor(Tensor::from_data(
                    TensorData::new(vals, [out, r]),
                    (&Default::default(), DType::F32),
                ));
            }
            Ok::<_, ()>(lin)
        })
        .unwrap()
}

#[test]
fn merged_model_logits_equal_base_plus_adapter_logits() {
    let dir = tiny_model_dir(3);
    let cfg = LoraConfig { r: 4, alpha: 8.0, target_linear: true, use_rslora: true, seed: 5, ..LoraConfig::default() };
    let adapted = trained(load::<B>(dir.path()).with_lora(&cfg).unwrap());
    let want = logits(&adapted, &IDS, 1);
    let base = logits(&load::<B>(dir.path()), &IDS, 1);
    assert!(rel_diff(&want, &base) > 1e-3, "the adapter must change the logits for this test to mean anything");
    let adapter = tempfile::tempdir().unwrap();
    save_adapter(&adapted, &cfg, "tiny", adapter.path()).unwrap();
    let merged = tempfile::tempdir().unwrap();
    let out = merged.path().join("m");
    merge_lora(dir.path(), adapter.path(), &out, MergeOptions::default()).unwrap();
    let got = logits(&load::<B>(&out), &IDS, 1);
    assert!(rel_diff(&got, &want) < 1e-5, "merged vs base+adapter: {}", rel_diff(&got, &want));
}
