//! A merged model gives the logits of base + adapter (newt on both sides).

mod model_support;

use model_support::*;
use newt_model::lora::LoraConfig;
use newt_model::merge::{MergeOptions, merge_lora};
use newt_model::peft::save_adapter;

const IDS: [i64; 8] = [3, 14, 15, 92, 65, 35, 89, 79];

#[test]
fn merged_model_logits_equal_base_plus_adapter_logits() {
    let dir = tiny_model_dir(3);
    let cfg = LoraConfig { r: 4, alpha: 8.0, target_linear: true, use_rslora: true, seed: 5, ..LoraConfig::default() };
    let adapted = perturb(load::<B>(dir.path()).with_lora(&cfg).unwrap());
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
