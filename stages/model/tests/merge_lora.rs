//! LoRA merge: merged weights equal W + scale·B·A computed independently here, for plain,
//! rsLoRA, embedding and resized-vocabulary adapters, in the base dtype; bad adapters are
//! errors raised before anything is written.

use std::fs;
use std::path::Path;

use newt_model::merge::{MergeOptions, merge_lora};
use newt_model::tensors::{Dtype, TensorStore, decode_f32, encode_f32, write_single};
use serde_json::json;

const H: usize = 8; // hidden
const V: usize = 10; // vocab
const I: usize = 12; // intermediate

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.5
        })
        .collect()
}

type T = (String, Vec<usize>, Vec<f32>);

fn base_tensors(tied: bool) -> Vec<T> {
    let mut shapes = vec![
        ("model.embed_tokens.weight", vec![V, H]),
        ("model.layers.0.input_layernorm.weight", vec![H]),
        ("model.layers.0.self_attn.q_proj.weight", vec![H, H]),
        ("model.layers.0.self_attn.v_proj.weight", vec![H / 2, H]),
        ("model.layers.0.mlp.down_proj.weight", vec![H, I]),
        ("model.norm.weight", vec![H]),
    ];
    if !tied {
        shapes.push(("lm_head.weight", vec![V, H]));
    }
    shapes
        .into_iter()
        .enumerate()
        .map(|(i, (n, s))| (n.to_string(), s.clone(), values(s.iter().product(), i as u64)))
        .collect()
}

fn write_base(dir: &Path, tensors: &[T], dtype: Dtype, tied: bool) {
    fs::create_dir_all(dir).unwrap();
    let st: Vec<_> = tensors.iter().map(|(n, s, v)| (n.clone(), dtype, s.clone(), encode_f32(dtype, v))).collect();
    write_single(&dir.join("model.safetensors"), &st).unwrap();
    let cfg = json!({"model_type": "llama", "vocab_size": V, "hidden_size": H, "tie_word_embeddings": tied,
                     "torch_dtype": dtype.torch_name()});
    fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": 2}"#).unwrap();
    fs::write(dir.join("tokenizer.json"), r#"{"base": true}"#).unwrap();
    fs::write(dir.join("tokenizer_config.json"), "{}").unwrap();
}

fn write_adapter(dir: &Path, cfg: serde_json::Value, tensors: &[T]) {
    fs::create_dir_all(dir).unwrap();
    let st: Vec<_> = tensors
        .iter()
        .map(|(n, s, v)| (format!("base_model.model.{n}"), Dtype::F32, s.clone(), encode_f32(Dtype::F32, v)))
        .collect();
    write_single(&dir.join("adapter_model.safetensors"), &st).unwrap();
    fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
}

/// (A [r, in], B [out, r]) adapter tensors for `module`.
fn lora(module: &str, r: usize, out: usize, inp: usize, seed: u64) -> Vec<T> {
    vec![
        (format!("{module}.lora_A.weight"), vec![r, inp], values(r * inp, seed)),
        (format!("{module}.lora_B.weight"), vec![out, r], values(out * r, seed + 100)),
    ]
}

/// W + s·B·A by the definition.
fn expect_merged(w: &[f32], a: &[f32], b: &[f32], out: usize, inp: usize, r: usize, s: f32) -> Vec<f32> {
    let mut m = w.to_vec();
    for o in 0..out {
        for i in 0..inp {
            let mut acc = 0f64;
            for k in 0..r {
                acc += b[o * r + k] as f64 * a[k * inp + i] as f64;
            }
            m[o * inp + i] += s * acc as f32;
        }
    }
    m
}

fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
}

fn find<'a>(ts: &'a [T], n: &str) -> &'a [f32] {
    &ts.iter().find(|t| t.0.ends_with(n)).unwrap().2
}

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

#[test]
fn merged_weights_equal_w_plus_alpha_over_r_times_b_a_and_the_rest_is_untouched() {
    let t = tempfile::tempdir().unwrap();
    let (base, ad, out) = (t.path().join("base"), t.path().join("ad"), t.path().join("out"));
    let bt = base_tensors(false);
    write_base(&base, &bt, Dtype::F32, false);
    let q = "model.layers.0.self_attn.q_proj";
    let v = "model.layers.0.self_attn.v_proj";
    let mut at = lora(q, 4, H, H, 1);
    at.extend(lora(v, 4, H / 2, H, 2));
    write_adapter(
        &ad,
        json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
        &at,
    );
    let s = merge_lora(&base, &ad, &out, MergeOptions::default()).unwrap();
    assert_eq!((s.n_lora, s.n_replaced, s.scale), (2, 0, 2.0));
    let st = TensorStore::open(&out).unwrap();
    let want_q = expect_merged(
        find(&bt, "q_proj.weight"),
        find(&at, "q_proj.lora_A.weight"),
        find(&at, "q_proj.lora_B.weight"),
        H,
        H,
        4,
        2.0,
    );
    assert!(close(&st.read_f32(&format!("{q}.weight")).unwrap(), &want_q, 1e-6));
    let want_v = expect_merged(
        find(&bt, "v_proj.weight"),
        find(&at, "v_proj.lora_A.weight"),
        find(&at, "v_proj.lora_B.weight"),
        H / 2,
        H,
        4,
        2.0,
    );
    assert!(close(&st.read_f32(&format!("{v}.weight")).unwrap(), &want_v, 1e-6));
    assert_ne!(want_q, find(&bt, "q_proj.weight"), "the delta is not zero");
    for (n, _, vals) in &bt {
        if !n.contains("q_proj") && !n.contains("v_proj") {
            assert_eq!(&st.read_f32(n).unwrap(), vals, "{n} is untouched");
        }
    }
    assert_eq!(st.names().len(), bt.len());
    assert_eq!(config(&out)["tie_word_embeddings"], false);
    assert_eq!(fs::read_to_string(out.join("tokenizer.json")).unwrap(), r#"{"base": true}"#);
    assert!(out.join("generation_config.json").is_file());
}

#[test]
fn rslora_scales_by_alpha_over_sqrt_r_and_alpha_pattern_overrides_per_module() {
    let t = tempfile::tempdir().unwrap();
    let (base, ad) = (t.path().join("base"), t.path().join("ad"));
    let bt = base_tensors(false);
    write_base(&base, &bt, Dtype::F32, false);
    let mut at = lora("model.layers.0.self_attn.q_proj", 4, H, H, 3);
    at.extend(lora("model.layers.0.mlp.down_proj", 4, H, I, 4));
    write_adapter(&ad, json!({"r": 4, "lora_alpha": 8, "use_rslora": true, "alpha_pattern": {"down_proj": 2}}), &at);
    let out = t.path().join("out");
    let s = merge_lora(&base, &ad, &out, MergeOptions::default()).unwrap();
    assert_eq!(s.scale, 4.0); // 8 / sqrt(4)
    let st = TensorStore::open(&out).unwrap();
    let q = expect_merged(
        find(&bt, "q_proj.weight"),
        find(&at, "q_proj.lora_A.weight"),
        find(&at, "q_proj.lora_B.weight"),
        H,
        H,
        4,
        4.0,
    );
    assert!(close(&st.read_f32("model.layers.0.self_attn.q_proj.weight").unwrap(), &q, 1e-6));
    let d = expect_merged(
        find(&bt, "down_proj.weight"),
        find(&at, "down_proj.lora_A.weight"),
        find(&at, "down_proj.lora_B.weight"),
        H,
        I,
        4,
        1.0,
    );
    assert!(close(&st.read_f32("model.layers.0.mlp.down_proj.weight").unwrap(), &d, 1e-6));
}

#[test]
fn a_bf16_base_is_merged_in_f32_and_written_back_in_bf16() {
    let t = tempfile::tempdir().unwrap();
    let (base, ad, out) = (t.path().join("base"), t.path().join("ad"), t.path().join("out"));
    let bt: Vec<T> = base_tensors(false)
        .into_iter()
        .map(|(n, s, v)| (n, s, decode_f32(Dtype::BF16, &encode_f32(Dtype::BF16, &v))))
        .collect();
    write_base(&base, &bt, Dtype::BF16, false);
    let at = lora("model.layers.0.self_attn.q_proj", 2, H, H, 5);
    write_adapter(&ad, json!({"r": 2, "lora_alpha": 16}), &at);
    merge_lora(&base, &ad, &out, MergeOptions::default()).unwrap();
    let st = TensorStore::open(&out).unwrap();
    assert_eq!(st.info("model.layers.0.self_attn.q_proj.weight").unwrap().0, Dtype::BF16);
    let merged =
        expect_merged(find(&bt, "q_proj.weight"), find(&at, "lora_A.weight"), find(&at, "lora_B.weight"), H, H, 2, 8.0);
    let want = decode_f32(Dtype::BF16, &encode_f32(Dtype::BF16, &merged));
    let got = st.read_f32("model.layers.0.self_attn.q_proj.weight").unwrap();
    // One bf16 rounding of the f32 result; f64 vs f32 accumulation may flip a tie-adjacent ulp.
    assert!(close(&got, &want, 2.0f32.powi(-7)), "{got:?} vs {want:?}");
    let bytes = |d: &Path| st_bytes(d, "model.norm.weight");
    assert_eq!(bytes(&out), bytes(&base), "untouched tensors are copied bit for bit");

    let out32 = t.path().join("out32");
    merge_lora(&base, &ad, &out32, MergeOptions { out_dtype: Some(Dtype::F32), ..Default::default() }).unwrap();
    assert_eq!(TensorStore::open(&out32).unwrap().info("model.norm.weight").unwrap().0, Dtype::F32);
    assert_eq!(config(&out32)["torch_dtype"], "float32");
}

fn st_bytes(dir: &Path, name: &str) -> Vec<u8> {
    TensorStore::open(dir).unwrap().read_raw(name).unwrap().2.to_vec()
}

#[test]
fn the_output_is_sharded_with_an_index_past_max_shard_bytes() {
    let t = tempfile::tempdir().unwrap();
    let (base, ad, out) = (t.path().join("base"), t.path().join("ad"), t.path().join("out"));
    let bt = base_tensors(false);
    write_base(&base, &bt, Dtype::F32, false);
    write_adapter(&ad, json!({"r": 2, "lora_alpha": 2}), &lora("model.layers.0.self_attn.q_proj", 2, H, H, 6));
    let s = merge_lora(&base, &ad, &out, MergeOptions { max_shard_bytes: 400, out_dtype: None }).unwrap();
    let shards = s.files.iter().filter(|f| f.to_string_lossy().contains("-of-")).count();
    assert!(shards >= 3, "{:?}", s.files);
    assert!(out.join("model.safetensors.index.json").is_file());
    assert_eq!(TensorStore::open(&out).unwrap().names().len(), bt.len());
}

#[test]
fn a_shape_mismatch_names_the_tensor_and_both_shapes_and_writes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let (base, ad, out) = (t.path().join("base"), t.path().join("ad"), t.path().join("out"));
    write_base(&base, &base_tensors(false), Dtype::F32, false);
    // A trained for in = 6, but q_proj has in = 8.
    write_adapter(&ad, json!({"r": 2, "lora_alpha": 2}), &lora("model.layers.0.self_attn.q_proj", 2, H, 6, 7));
    let msg = merge_lora(&base, &ad, &out, MergeOptions::default()).unwrap_err().to_string();
    assert!(msg.contains("model.layers.0.self_attn.q_proj.weight"), "{msg}");
    assert!(msg.contains("[8, 8]") && msg.contains("[2, 6]") && msg.contains("[8, 2]"), "{msg}");
    assert!(!out.exists(), "nothing may be written");
}

#[test]
fn adapter_modules_the_base_lacks_and_unknown_adapter_tensors_are_errors() {
    let t = tempfile::tempdir().unwrap();
    let (base, ad, out) = (t.path().join("base"), t.path().join("ad"), t.path().join("out"));
    write_base(&base, &base_tensors(false), Dtype::F32, false);
    write_adapter(&ad, json!({"r": 2, "lora_alpha": 2}), &lora("model.layers.7.self_attn.q_proj", 2, H, H, 8));
    let msg = merge_lora(&base, &ad, &out, MergeOptions::default()).unwrap_err().to_string();
    assert!(msg.contains("model.layers.7.self_attn.q_proj.weight"), "{msg}");
    let mut at = lora("model.layers.0.self_attn.q_proj", 2, H, H, 8);
    at.push(("model.layers.0.self_attn.q_proj.lora_magnitude_vector".into(), vec![H], values(H, 1)));
    write_adapter(&ad, json!({"r": 2, "lora_alpha": 2}), &at);
    let msg = merge_lora(&base, &ad, &out, MergeOptions::default()).unwrap_err().to_string();
    assert!(msg.contains("lora_magnitude_vector"), "{msg}");
    assert!(!out.exists());
}

#[test]
fn modules_to_save_with_a_resized_vocabulary_replace_embed_and_head_and_update_config() {
    let t = tempfile::tempdir().unwrap();
    let (base, ad, out) = (t.path().join("base"), t.path().join("ad"), t.path().join("out"));
    write_base(&base, &base_tensors(false), Dtype::F32, false);
    let new_v = V + 2;
    // PEFT saves modules_to_save as `base_model.model.<module>.weight` (".modules_to_save.default" stripped).
    let mut at = vec![
        ("model.embed_tokens.weight".to_string(), vec![new_v, H], values(new_v * H, 40)),
        ("lm_head.weight".to_string(), vec![new_v, H], values(new_v * H, 41)),
    ];
    at.extend(lora("model.layers.0.self_attn.q_proj", 2, H, H, 9));
    write_adapter(&ad, json!({"r": 2, "lora_alpha": 4, "modules_to_save": ["embed_tokens", "lm_head"]}), &at);
    fs::write(ad.join("tokenizer.json"), r#"{"added": true}"#).unwrap();
    let s = merge_lora(&base, &ad, &out, MergeOptions::default()).unwrap();
    assert_eq!((s.n_replaced, s.vocab_size), (2, Some(new_v)));
    let st = TensorStore::open(&out).unwrap();
    assert_eq!(st.read_f32("model.embed_tokens.weight").unwrap(), at[0].2);
    assert_eq!(st.read_f32("lm_head.weight").unwrap(), at[1].2);
    assert_eq!(config(&out)["vocab_size"], new_v);
    assert_eq!(
        fs::read_to_string(out.join("tokenizer.json")).unwrap(),
        r#"{"added": true}"#,
        "tokenizer from the adapter"
    );

    // Resizing the embedding alone leaves the untied head with the old vocabulary: an error.
    write_adapter(&ad, json!({"r": 2, "lora_alpha": 4}), &at[..1]);
    let msg = merge_lora(&base, &ad, &t.path().join("o2"), MergeOptions::default()).unwrap_err().to_string();
    assert!(msg.contains("lm_head.weight") && msg.contains("12") && msg.contains("10"), "{msg}");
}

#[test]
fn changing_the_embedding_of_a_tied_model_unties_it_keeping_the_base_head() {
    let t = tempfile::tempdir().unwrap();
    let (base, ad, out) = (t.path().join("base"), t.path().join("ad"), t.path().join("out"));
    let bt = base_tensors(true);
    write_base(&base, &bt, Dtype::F32, true);
    let new_embed = values(V * H, 50);
    write_adapter(
        &ad,
        json!({"r": 2, "lora_alpha": 4, "modules_to_save": ["embed_tokens"]}),
        &[("model.embed_tokens.weight".into(), vec![V, H], new_embed.clone())],
    );
    let s = merge_lora(&base, &ad, &out, MergeOptions::default()).unwrap();
    assert!(s.untied);
    let st = TensorStore::open(&out).unwrap();
    assert_eq!(st.read_f32("model.embed_tokens.weight").unwrap(), new_embed);
    assert_eq!(
        st.read_f32("lm_head.weight").unwrap(),
        find(&bt, "embed_tokens.weight"),
        "head keeps the base embedding"
    );
    assert_eq!(config(&out)["tie_word_embeddings"], false);

    // With nothing touching embed or head, a tied model stays tied and has no lm_head.
    let out2 = t.path().join("o2");
    write_adapter(&ad, json!({"r": 2, "lora_alpha": 4}), &lora("model.layers.0.self_attn.q_proj", 2, H, H, 3));
    let s = merge_lora(&base, &ad, &out2, MergeOptions::default()).unwrap();
    assert!(!s.untied);
    assert!(TensorStore::open(&out2).unwrap().info("lm_head.weight").is_none());
    assert_eq!(config(&out2)["tie_word_embeddings"], true);
}

#[test]
fn a_lora_on_the_head_of_a_tied_model_is_applied_to_a_copy_of_the_embedding() {
    let t = tempfile::tempdir().unwrap();
    let (base, ad, out) = (t.path().join("base"), t.path().join("ad"), t.path().join("out"));
    let bt = base_tensors(true);
    write_base(&base, &bt, Dtype::F32, true);
    let at = lora("lm_head", 2, V, H, 11);
    write_adapter(&ad, json!({"r": 2, "lora_alpha": 2}), &at);
    merge_lora(&base, &ad, &out, MergeOptions::default()).unwrap();
    let st = TensorStore::open(&out).unwrap();
    let embed = find(&bt, "embed_tokens.weight");
    let want = expect_merged(embed, find(&at, "lora_A.weight"), find(&at, "lora_B.weight"), V, H, 2, 1.0);
    assert!(close(&st.read_f32("lm_head.weight").unwrap(), &want, 1e-6));
    assert_eq!(st.read_f32("model.embed_tokens.weight").unwrap(), embed);
}

#[test]
fn an_embedding_lora_adds_the_transpose_of_b_times_a() {
    let t = tempfile::tempdir().unwrap();
    let (base, ad, out) = (t.path().join("base"), t.path().join("ad"), t.path().join("out"));
    let bt = base_tensors(false);
    write_base(&base, &bt, Dtype::F32, false);
    let r = 3;
    let a = values(r * V, 60); // lora_embedding_A [r, vocab]
    let b = values(H * r, 61); // lora_embedding_B [hidden, r]
    write_adapter(
        &ad,
        json!({"r": r, "lora_alpha": 6}),
        &[
            ("model.embed_tokens.lora_embedding_A".into(), vec![r, V], a.clone()),
            ("model.embed_tokens.lora_embedding_B".into(), vec![H, r], b.clone()),
        ],
    );
    merge_lora(&base, &ad, &out, MergeOptions::default()).unwrap();
    let embed = find(&bt, "embed_tokens.weight");
    let mut want = embed.to_vec();
    for v in 0..V {
        for h in 0..H {
            let d: f32 = (0..r).map(|k| b[h * r + k] * a[k * V + v]).sum();
            want[v * H + h] += 2.0 * d;
        }
    }
    let got = TensorStore::open(&out).unwrap().read_f32("model.embed_tokens.weight").unwrap();
    assert!(close(&got, &want, 1e-6));
}

#[test]
fn a_saved_base_layer_of_a_lora_wrapped_embedding_replaces_the_base_and_gets_the_delta() {
    let t = tempfile::tempdir().unwrap();
    let (base, ad, out) = (t.path().join("base"), t.path().join("ad"), t.path().join("out"));
    write_base(&base, &base_tensors(false), Dtype::F32, false);
    let r = 2;
    let saved = values(V * H, 70); // PEFT: `<m>.base_layer.weight` when the embedding is a target
    let (a, b) = (values(r * V, 71), values(H * r, 72));
    write_adapter(
        &ad,
        json!({"r": r, "lora_alpha": 2}),
        &[
            ("model.embed_tokens.base_layer.weight".into(), vec![V, H], saved.clone()),
            ("model.embed_tokens.lora_embedding_A".into(), vec![r, V], a.clone()),
            ("model.embed_tokens.lora_embedding_B".into(), vec![H, r], b.clone()),
        ],
    );
    let s = merge_lora(&base, &ad, &out, MergeOptions::default()).unwrap();
    assert_eq!((s.n_lora, s.n_replaced), (1, 1));
    let mut want = saved;
    for v in 0..V {
        for h in 0..H {
            want[v * H + h] += (0..r).map(|k| b[h * r + k] * a[k * V + v]).sum::<f32>();
        }
    }
    let got = TensorStore::open(&out).unwrap().read_f32("model.embed_tokens.weight").unwrap();
    assert!(close(&got, &want, 1e-6));
}
