//! LoRA adapters: initialisation, effect on the model, gradients, PEFT save/load.

mod model_support;

use burn::module::Param;
use model_support::*;
use newt_model::llama::TrainBatch;
use newt_model::lora::LoraConfig;
use newt_model::peft::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, save_adapter};
use newt_model::tensors::TensorStore;
use serde_json::Value;

const IDS: [i64; 8] = [3, 14, 15, 92, 65, 35, 89, 79];

fn all_linear(r: usize, seed: u64) -> LoraConfig {
    LoraConfig { r, alpha: 2.0 * r as f64, target_linear: true, seed, ..LoraConfig::default() }
}

/// `lora_target_modules` as one string: PEFT full-matches it against each module path, so a
/// regex can pick layers; the adapter config keeps the regex.
#[test]
fn regex_targets_match_module_paths_in_full_and_round_trip_through_peft() {
    let dir = tiny_model_dir(5);
    let cfg = LoraConfig {
        target_modules: Vec::new(),
        target_linear: false,
        target_regex: Some(r"model\.layers\.1\.(self_attn\.q|mlp\.up)_proj".into()),
        ..LoraConfig::default()
    };
    let m = load::<B>(dir.path()).with_lora(&cfg).unwrap();
    let adapted: Vec<String> = m.linears().into_iter().filter(|(_, l)| l.lora.is_some()).map(|(p, _)| p).collect();
    assert_eq!(adapted, ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"]);
    let out = tempfile::tempdir().unwrap();
    save_adapter(&m, &cfg, "newt:tiny", out.path()).unwrap();
    let text = std::fs::read_to_string(out.path().join(ADAPTER_CONFIG)).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["target_modules"], cfg.target_regex.clone().unwrap(), "{text}");
    let (again, read) = load_adapter(load::<B>(dir.path()), out.path()).unwrap();
    assert_eq!(read.target_regex, cfg.target_regex);
    let again: Vec<String> = again.linears().into_iter().filter(|(_, l)| l.lora.is_some()).map(|(p, _)| p).collect();
    assert_eq!(again, adapted);
}

#[test]
fn lora_b_zero_means_base_logits() {
    let dir = tiny_model_dir(5);
    let base = logits(&load::<B>(dir.path()), &IDS, 1);
    let adapted = load::<B>(dir.path()).with_lora(&all_linear(4, 1)).unwrap();
    assert_eq!(logits(&adapted, &IDS, 1), base);
    // ... and an adapter with a nonzero B does change them.
    let changed = logits(&perturb(adapted), &IDS, 1);
    assert!(rel_diff(&changed, &base) > 1e-3);
}

#[test]
fn same_seed_same_adapter() {
    let dir = tiny_model_dir(5);
    let a_of = |seed| {
        let m = load::<B>(dir.path()).with_lora(&all_linear(4, seed)).unwrap();
        floats(m.layers[1].mlp.down_proj.lora.as_ref().unwrap().lora_a.val())
    };
    assert_eq!(a_of(9), a_of(9));
    assert_ne!(a_of(9), a_of(10));
}

#[test]
fn only_targeted_linears_get_adapters() {
    let dir = tiny_model_dir(5);
    let cfg = LoraConfig {
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        target_linear: false,
        target_regex: None,
        ..LoraConfig::default()
    };
    let m = load::<B>(dir.path()).with_lora(&cfg).unwrap();
    let adapted: Vec<String> = m.linears().into_iter().filter(|(_, l)| l.lora.is_some()).map(|(p, _)| p).collect();
    assert_eq!(
        adapted,
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj"
        ]
    );
}

#[test]
fn lora_gradients_reach_the_adapter_and_not_the_base() {
    let dir = tiny_model_dir(6);
    let model = perturb(load::<AD>(dir.path()).with_lora(&all_linear(2, 3)).unwrap());
    let loss = model.loss(&TrainBatch {
        input_ids: ints(&IDS, 1, 8),
        labels: ints(&IDS, 1, 8),
        position_ids: ints(&(0..8).collect::<Vec<_>>(), 1, 8),
        segment_ids: ints(&[1; 8], 1, 8),
        host_targets: None,
    });
    let grads = loss.sum.backward();
    let lin = &model.layers[0].self_attn.q_proj;
    let ad = lin.lora.as_ref().unwrap();
    let ga = floats(ad.lora_a.val().grad(&grads).expect("A has a gradient"));
    let gb = floats(ad.lora_b.val().grad(&grads).expect("B has a gradient"));
    assert!(ga.iter().any(|g| *g != 0.0) && gb.iter().any(|g| *g != 0.0));
    assert!(lin.weight.val().grad(&grads).is_none());
}

#[test]
fn peft_adapter_save_then_load_gives_the_same_logits() {
    let dir = tiny_model_dir(7);
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.05,
        target_modules: vec!["q_proj".into(), "k_proj".into(), "v_proj".into(), "o_proj".into(), "down_proj".into()],
        target_linear: false,
        target_regex: None,
        use_rslora: true,
        modules_to_save: vec!["lm_head".into()],
        seed: 11,
    };
    let trained = perturb(load::<B>(dir.path()).with_lora(&cfg).unwrap());
    let want = logits(&trained, &IDS, 1);
    let out = tempfile::tempdir().unwrap();
    save_adapter(&trained, &cfg, "tiny-base", out.path()).unwrap();

    let json: Value = serde_json::from_str(&std::fs::read_to_string(out.path().join(ADAPTER_CONFIG)).unwrap()).unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["task_type"], "CAUSAL_LM");
    assert_eq!(json["r"], 4);
    assert_eq!(json["lora_alpha"], 8);
    assert_eq!(json["use_rslora"], true);
    assert_eq!(json["bias"], "none");
    assert_eq!(json["fan_in_fan_out"], false);
    assert_eq!(json["base_model_name_or_path"], "tiny-base");
    assert_eq!(json["modules_to_save"], serde_json::json!(["lm_head"]));
    let store = TensorStore::open_file(&out.path().join(ADAPTER_WEIGHTS)).unwrap();
    let names = store.names();
    assert!(names.contains(&"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string()));
    assert!(names.contains(&"base_model.model.model.layers.1.mlp.down_proj.lora_B.weight".to_string()));
    assert!(names.contains(&"base_model.model.lm_head.weight".to_string()));
    assert!(!names.iter().any(|n| n.contains("gate_proj")));
    for n in &names {
        assert_eq!(store.info(n).unwrap().0, newt_model::tensors::Dtype::F32, "{n}");
    }
    let (_, shape) = store.info("base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight").unwrap();
    assert_eq!(shape, vec![32, 4]);

    let (loaded, loaded_cfg) = load_adapter(load::<B>(dir.path()), out.path()).unwrap();
    assert_eq!(loaded_cfg.r, 4);
    assert!(loaded_cfg.use_rslora);
    assert_eq!(logits(&loaded, &IDS, 1), want);
}

#[test]
fn loading_an_adapter_with_a_foreign_tensor_fails() {
    let dir = tiny_model_dir(7);
    let cfg = all_linear(2, 1);
    let model = load::<B>(dir.path()).with_lora(&cfg).unwrap();
    let out = tempfile::tempdir().unwrap();
    save_adapter(&model, &cfg, "tiny", out.path()).unwrap();
    let mut json: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join(ADAPTER_CONFIG)).unwrap()).unwrap();
    json["target_modules"] = serde_json::json!(["q_proj"]);
    std::fs::write(out.path().join(ADAPTER_CONFIG), json.to_string()).unwrap();
    let err = load_adapter(load::<B>(dir.path()), out.path()).unwrap_err().to_string();
    assert!(err.contains("k_proj") || err.contains("up_proj") || err.contains("does not belong"), "{err}");
}

/// Writes a base model, an adapter (rsLoRA, dropout, lm_head trained in full) and newt's logits
/// into `$NEWT_PEFT_EXPORT` for `scripts/model_peft_check.py`, which loads them with PEFT.
#[test]
fn export_adapter_for_the_peft_check() {
    let Some(out) = std::env::var_os("NEWT_PEFT_EXPORT").map(std::path::PathBuf::from) else {
        eprintln!("skipping: NEWT_PEFT_EXPORT is not set (scripts/model_peft_check.py uses it)");
        return;
    };
    let base = out.join("base");
    std::fs::create_dir_all(&base).unwrap();
    let spec = newt_model::tiny::TinySpec { seed: 21, vocab_size: 400, ..Default::default() };
    newt_model::tiny::write_tiny_model(&base, &spec, &corpus()).unwrap();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.1,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "o_proj".into(), "up_proj".into(), "down_proj".into()],
        target_linear: false,
        target_regex: None,
        use_rslora: true,
        modules_to_save: vec!["lm_head".into()],
        seed: 5,
    };
    let mut model = perturb(load::<B>(&base).with_lora(&cfg).unwrap());
    // A trained lm_head differs from the embedding it was copied from.
    let head = model.lm_head.take().unwrap().val();
    model.lm_head = Some(Param::from_tensor(head.clone() + head.ones_like().mul_scalar(0.01)));
    save_adapter(&model, &cfg, "tiny-base", &out.join("adapter")).unwrap();
    let ids: Vec<i64> = IDS.iter().chain(IDS.iter().rev()).copied().collect();
    let l = logits(&model, &ids, 2);
    let json = serde_json::json!({ "input_ids": [ids[..8].to_vec(), ids[8..].to_vec()], "logits": l });
    std::fs::write(out.join("newt_logits.json"), json.to_string()).unwrap();
}

/// QLoRA: with its linears in NF4 the model computes exactly what the same model computes with
/// those linears' weights replaced by their dequantized values — forward, and the adapter's
/// gradients through the quantized base — and it differs from the full-precision model.
#[test]
fn nf4_base_equals_a_model_holding_the_dequantized_weights() {
    use burn::tensor::DType;
    use newt_model::llama::Llama;
    let dir = tiny_model_dir(7);
    let cfg = all_linear(4, 3);
    let quantized = perturb(load::<AD>(dir.path()).quantize_nf4().with_lora(&cfg).unwrap());
    let dequantized = perturb(
        load::<AD>(dir.path())
            .map_linears(|_, mut lin| {
                let q = newt_model::lora::Nf4Weight::quantize(&lin.weight.val());
                lin.weight = burn::module::Param::from_tensor(q.dequantize(DType::F32)).set_require_grad(false);
                Ok::<_, std::convert::Infallible>(lin)
            })
            .unwrap()
            .with_lora(&cfg)
            .unwrap(),
    );
    let full = perturb(load::<AD>(dir.path()).with_lora(&cfg).unwrap());
    let ids: Vec<i64> = (0..24).map(|i| (i * 37 % 400) as i64).collect();
    let (lq, ld, lf) = (logits(&quantized, &ids, 2), logits(&dequantized, &ids, 2), logits(&full, &ids, 2));
    assert!(rel_diff(&lq, &ld) < 1e-5, "NF4 path vs dequantized weights: {}", rel_diff(&lq, &ld));
    assert!(rel_diff(&lq, &lf) > 1e-3, "quantization must change the logits: {}", rel_diff(&lq, &lf));

    let grads = |m: &Llama<AD>| {
        let pos: Vec<i64> = (0..2).flat_map(|_| 0..12).collect();
        let out = m.forward(ints(&ids, 2, 12), ints(&pos, 2, 12), ints(&[1; 24], 2, 12));
        let g = out.sum().backward();
        let a = &m.layers[0].self_attn.q_proj.lora.as_ref().unwrap().lora_a;
        floats(a.val().grad(&g).expect("the adapter gets a gradient"))
    };
    let (gq, gd) = (grads(&quantized), grads(&dequantized));
    assert!(rel_diff(&gq, &gd) < 1e-4, "adapter gradients through NF4: {}", rel_diff(&gq, &gd));
    // Parameter counts see the weights the codes stand for (the 1×1 placeholders add one a layer).
    let (cq, cf) = (newt_model::train::count_params(&quantized), newt_model::train::count_params(&full));
    assert_eq!(cq.trainable, cf.trainable);
    let linears = 7 * full.layers.len();
    assert_eq!(cq.frozen, cf.frozen + linears, "{cq:?} vs {cf:?}");
    // The base stays frozen: the NF4 model has no full-precision weights left to train.
    assert_eq!(quantized.layers[0].mlp.down_proj.weight.dims(), [1, 1]);
    assert_eq!(quantized.layers[0].mlp.down_proj.dims(), full.layers[0].mlp.down_proj.dims());
}
