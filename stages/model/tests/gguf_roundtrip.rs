//! GGUF export and import are inverses: a small synthetic Llama folder exported to GGUF reads
//! back with llama.cpp names, shapes, metadata and tokenizer, and imports back to the same
//! weights (exactly for F32, within the format's error for F16 and Q8_0). Bad files are errors.

use std::fs;
use std::path::Path;

use newt_model::gguf::tokenizer::{GgufVocab, token_type};
use newt_model::gguf::{
    GgmlType, GgufFile, GgufType, GgufWriter, MetaValue, export_gguf, import_to_hf, permute_rows, unpermute_rows,
};
use newt_model::tensors::{Dtype, TensorStore, encode_f32, write_single};
use serde_json::json;

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const INTER: usize = 96;
const LAYERS: usize = 2;

/// GPT-2's byte -> printable-char table.
fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).unwrap();
    }
    table
}

/// A tiny byte-level BPE vocabulary with a few merges and ChatML special tokens.
fn tiny_vocab() -> GgufVocab {
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
    let mut types = vec![token_type::CONTROL; 3];
    for c in bytes_to_unicode() {
        tokens.push(c.to_string());
        types.push(token_type::NORMAL);
    }
    let merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
        types.push(token_type::NORMAL);
    }
    GgufVocab {
        model: "gpt2".into(),
        pre: "smollm".into(),
        tokens,
        token_type: types,
        merges: merges.iter().map(|s| s.to_string()).collect(),
        bos: Some(1),
        eos: Some(2),
        unk: Some(0),
        pad: Some(2),
        eot: None,
        add_bos: false,
        add_eos: false,
        chat_template: Some(
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}".into(),
        ),
    }
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect()
}

/// Writes a synthetic HF Llama folder; returns (name, shape, values) of its tensors.
fn write_model(
    dir: &Path,
    vocab_rows: usize,
    tied: bool,
    rope_scaling: serde_json::Value,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    fs::create_dir_all(dir).unwrap();
    let mut shapes: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![vocab_rows, HIDDEN])];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        shapes.push((format!("{p}.input_layernorm.weight"), vec![HIDDEN]));
        shapes.push((format!("{p}.self_attn.q_proj.weight"), vec![HEADS * HEAD_DIM, HIDDEN]));
        shapes.push((format!("{p}.self_attn.k_proj.weight"), vec![KV * HEAD_DIM, HIDDEN]));
        shapes.push((format!("{p}.self_attn.v_proj.weight"), vec![KV * HEAD_DIM, HIDDEN]));
        shapes.push((format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, HEADS * HEAD_DIM]));
        shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]));
        shapes.push((format!("{p}.mlp.gate_proj.weight"), vec![INTER, HIDDEN]));
        shapes.push((format!("{p}.mlp.up_proj.weight"), vec![INTER, HIDDEN]));
        shapes.push((format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, INTER]));
    }
    shapes.push(("model.norm.weight".into(), vec![HIDDEN]));
    if !tied {
        shapes.push(("lm_head.weight".into(), vec![vocab_rows, HIDDEN]));
    }
    let tensors: Vec<_> = shapes
        .into_iter()
        .enumerate()
        .map(|(i, (n, s))| {
            let v = values(s.iter().product(), i as u64);
            (n, s, v)
        })
        .collect();
    let st: Vec<_> =
        tensors.iter().map(|(n, s, v)| (n.clone(), Dtype::F32, s.clone(), encode_f32(Dtype::F32, v))).collect();
    write_single(&dir.join("model.safetensors"), &st).unwrap();
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 2048, "vocab_size": vocab_rows,
        "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2, "rope_scaling": rope_scaling,
    });
    fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let v = tiny_vocab();
    fs::write(dir.join("tokenizer.json"), v.tokenizer_json().unwrap().to_string()).unwrap();
    fs::write(dir.join("tokenizer_config.json"), v.tokenizer_config(Some(2048)).to_string()).unwrap();
    tensors
}

const TEXTS: &[&str] = &["the tin ether", "<|im_start|>user\n a 12 the<|im_end|>", "  x  42 ünï 🦀"];

fn encode_all(dir: &Path) -> Vec<Vec<u32>> {
    let t = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    TEXTS.iter().map(|s| t.encode(*s, true).unwrap().get_ids().to_vec()).collect()
}

#[test]
fn f32_export_reads_back_with_llama_cpp_names_and_imports_to_identical_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    let vocab_rows = tiny_vocab().tokens.len() + 3; // padded rows, as resized models have
    let tensors = write_model(&hf, vocab_rows, true, serde_json::Value::Null);
    let out = tmp.path().join("m.gguf");
    export_gguf(&hf, &out, GgufType::F32).unwrap();

    let g = GgufFile::open(&out).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.get("general.architecture").unwrap().as_str(), Some("llama"));
    assert_eq!(g.get("llama.attention.head_count_kv").unwrap().as_i64(), Some(KV as i64));
    assert_eq!(g.get("llama.rope.freq_base").unwrap().as_f64(), Some(500000.0));
    assert_eq!(g.get("tokenizer.ggml.pre").unwrap().as_str(), Some("smollm"));
    assert_eq!(g.get("tokenizer.ggml.eos_token_id").unwrap().as_i64(), Some(2));
    assert_eq!(g.get("tokenizer.chat_template").unwrap().as_str(), tiny_vocab().chat_template.as_deref());
    let toks = g.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap();
    assert_eq!(toks.len(), vocab_rows);
    assert_eq!(toks[vocab_rows - 1].as_str(), Some(format!("[PAD{}]", vocab_rows - 1).as_str()));
    assert_eq!(g.tensors.len(), tensors.len());
    assert_eq!(g.tensors[0].name, "token_embd.weight");
    assert_eq!(g.tensors[0].dims, vec![HIDDEN as u64, vocab_rows as u64]);
    assert!(g.tensor("output.weight").is_none(), "tied: no output tensor");
    let q_hf = &tensors.iter().find(|t| t.0 == "model.layers.1.self_attn.q_proj.weight").unwrap().2;
    assert_eq!(g.dequantize("blk.1.attn_q.weight").unwrap(), permute_rows(q_hf, HIDDEN, HEADS));
    let k_hf = &tensors.iter().find(|t| t.0 == "model.layers.1.self_attn.k_proj.weight").unwrap().2;
    assert_eq!(g.dequantize("blk.1.attn_k.weight").unwrap(), permute_rows(k_hf, KV * HEAD_DIM, KV));

    let back = tmp.path().join("back");
    import_to_hf(&out, &back).unwrap();
    let st = TensorStore::open(&back).unwrap();
    assert_eq!(st.names().len(), tensors.len());
    for (name, shape, v) in &tensors {
        assert_eq!(st.info(name).unwrap(), (Dtype::F32, shape.clone()), "{name}");
        assert_eq!(&st.read_f32(name).unwrap(), v, "{name}");
    }
    let cfg: serde_json::Value = serde_json::from_str(&fs::read_to_string(back.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["num_key_value_heads"], KV);
    assert_eq!(cfg["vocab_size"], vocab_rows);
    assert_eq!(encode_all(&back), encode_all(&hf));
}

#[test]
fn q8_0_export_stays_within_half_a_quantization_step_and_keeps_norms_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    let tensors = write_model(&hf, tiny_vocab().tokens.len(), false, serde_json::Value::Null);
    let out = tmp.path().join("m.gguf");
    export_gguf(&hf, &out, GgufType::Q8_0).unwrap();
    let g = GgufFile::open(&out).unwrap();
    assert_eq!(g.get("general.file_type").unwrap().as_i64(), Some(7));
    assert_eq!(g.tensor("output_norm.weight").unwrap().ty, GgmlType::F32);
    assert_eq!(g.tensor("blk.0.ffn_down.weight").unwrap().ty, GgmlType::Q8_0);
    assert!(g.tensor("output.weight").is_some(), "untied: output tensor kept");
    let back = tmp.path().join("back");
    import_to_hf(&out, &back).unwrap();
    let st = TensorStore::open(&back).unwrap();
    for (name, _, v) in &tensors {
        let got = st.read_f32(name).unwrap();
        for (blk, (a, b)) in v.chunks(32).zip(got.chunks(32)).enumerate() {
            let d = a.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= d * 0.5 + d * 127.0 * 1e-3 + 1e-9, "{name} block {blk}: {x} vs {y}");
            }
        }
    }
}

#[test]
fn f16_export_rounds_each_weight_to_f16() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    let tensors = write_model(&hf, tiny_vocab().tokens.len(), true, serde_json::Value::Null);
    let out = tmp.path().join("m.gguf");
    export_gguf(&hf, &out, GgufType::F16).unwrap();
    let g = GgufFile::open(&out).unwrap();
    let (_, _, up) = tensors.iter().find(|t| t.0 == "model.layers.0.mlp.up_proj.weight").unwrap();
    let want: Vec<f32> = up.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
    assert_eq!(g.dequantize("blk.0.ffn_up.weight").unwrap(), want);
}

#[test]
fn llama3_rope_scaling_survives_export_and_import() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    let rs = json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192});
    write_model(&hf, tiny_vocab().tokens.len(), true, rs.clone());
    let out = tmp.path().join("m.gguf");
    export_gguf(&hf, &out, GgufType::F32).unwrap();
    let g = GgufFile::open(&out).unwrap();
    let f = g.dequantize("rope_freqs.weight").unwrap();
    assert_eq!(f.len(), HEAD_DIM / 2);
    assert_eq!(f[0], 1.0, "highest frequency is not scaled");
    let back = tmp.path().join("back");
    import_to_hf(&out, &back).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&fs::read_to_string(back.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["rope_scaling"], rs);
}

#[test]
fn permutation_is_inverted_by_unpermute() {
    let w = values(KV * HEAD_DIM * 5, 9);
    let p = permute_rows(&w, KV * HEAD_DIM, KV);
    assert_ne!(p, w);
    assert_eq!(unpermute_rows(&p, KV * HEAD_DIM, KV), w);
    // Row h*d + i (first half) goes to h*d + 2i; row h*d + d/2 + i to h*d + 2i + 1.
    let rows = |v: &[f32], r: usize| v[r * 5..r * 5 + 5].to_vec();
    assert_eq!(rows(&p, HEAD_DIM + 2 * 3), rows(&w, HEAD_DIM + 3));
    assert_eq!(rows(&p, HEAD_DIM + 2 * 3 + 1), rows(&w, HEAD_DIM + HEAD_DIM / 2 + 3));
}

/// Rewrites `src` with tensor `name` replaced by raw bytes of type `ty`.
fn with_tensor_type(src: &Path, dst: &Path, name: &str, ty: GgmlType) {
    let g = GgufFile::open(src).unwrap();
    let plan: Vec<_> =
        g.tensors.iter().map(|t| (t.name.clone(), t.dims.clone(), if t.name == name { ty } else { t.ty })).collect();
    let mut w = GgufWriter::create(dst, &g.metadata, &plan).unwrap();
    for (n, dims, t) in &plan {
        let len = t.byte_len(dims.iter().product::<u64>() as usize).unwrap();
        let bytes = if n == name { vec![0u8; len] } else { g.tensor_bytes(g.tensor(n).unwrap()).to_vec() };
        w.write_tensor(n, &bytes).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn a_tensor_of_an_unsupported_quant_type_fails_the_import_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    write_model(&hf, tiny_vocab().tokens.len(), true, serde_json::Value::Null);
    let good = tmp.path().join("good.gguf");
    export_gguf(&hf, &good, GgufType::F32).unwrap();
    let bad = tmp.path().join("bad.gguf");
    with_tensor_type(&good, &bad, "blk.0.attn_q.weight", GgmlType(11));
    let out = tmp.path().join("out");
    let msg = import_to_hf(&bad, &out).unwrap_err().to_string();
    assert!(msg.contains("Q3_K") && msg.contains("blk.0.attn_q.weight"), "{msg}");
    assert!(!out.exists(), "nothing may be written for a file that cannot be imported");
}

#[test]
fn an_unknown_type_id_and_a_truncated_file_are_errors_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    write_model(&hf, tiny_vocab().tokens.len(), true, serde_json::Value::Null);
    let good = tmp.path().join("good.gguf");
    export_gguf(&hf, &good, GgufType::F32).unwrap();
    let mut bytes = fs::read(&good).unwrap();

    // The tensor info of model.norm: name, n_dims = 1, dims[0], type (u32).
    let name = b"output_norm.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4 + 8;
    let mut unknown = bytes.clone();
    unknown[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    let p = tmp.path().join("unknown.gguf");
    fs::write(&p, &unknown).unwrap();
    let msg = GgufFile::open(&p).err().unwrap().to_string();
    assert!(msg.contains("output_norm.weight") && msg.contains("99"), "{msg}");

    bytes.truncate(bytes.len() - 100);
    let p = tmp.path().join("short.gguf");
    fs::write(&p, &bytes).unwrap();
    let msg = GgufFile::open(&p).err().unwrap().to_string();
    assert!(msg.contains("short.gguf") && msg.contains("truncated"), "{msg}");
}

#[test]
fn metadata_of_every_value_type_round_trips_through_writer_and_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("meta.gguf");
    let meta = vec![
        ("a.u8".to_string(), MetaValue::U8(200)),
        ("a.i8".into(), MetaValue::I8(-5)),
        ("a.u16".into(), MetaValue::U16(60000)),
        ("a.i16".into(), MetaValue::I16(-3000)),
        ("a.u32".into(), MetaValue::U32(4_000_000_000)),
        ("a.i32".into(), MetaValue::I32(-7)),
        ("a.f32".into(), MetaValue::F32(1.5)),
        ("a.bool".into(), MetaValue::Bool(true)),
        ("a.str".into(), MetaValue::String("héllo".into())),
        ("a.u64".into(), MetaValue::U64(1 << 40)),
        ("a.i64".into(), MetaValue::I64(-(1 << 40))),
        ("a.f64".into(), MetaValue::F64(-2.25)),
        ("a.arr".into(), MetaValue::Array(5, vec![MetaValue::I32(1), MetaValue::I32(-2)])),
        ("a.empty".into(), MetaValue::Array(8, vec![])),
    ];
    let plan = vec![("t".to_string(), vec![3u64], GgmlType::F32), ("u".to_string(), vec![2u64], GgmlType::F32)];
    let mut w = GgufWriter::create(&p, &meta, &plan).unwrap();
    w.write_tensor("t", &encode_f32(Dtype::F32, &[1.0, 2.0, 3.0])).unwrap();
    w.write_tensor("u", &encode_f32(Dtype::F32, &[4.0, 5.0])).unwrap();
    w.finish().unwrap();
    let g = GgufFile::open(&p).unwrap();
    assert_eq!(g.metadata, meta);
    assert_eq!(g.dequantize("u").unwrap(), vec![4.0, 5.0]);
    // Each tensor's data starts on a 32-byte boundary.
    assert_eq!(g.tensor("u").unwrap().offset, 32);
}

#[test]
fn version_2_files_read_and_version_1_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("v.gguf");
    let plan = vec![("t".to_string(), vec![4u64], GgmlType::F32)];
    let mut w = GgufWriter::create(&p, &[("a".into(), MetaValue::U32(1))], &plan).unwrap();
    w.write_tensor("t", &encode_f32(Dtype::F32, &[1.0, 2.0, 3.0, 4.0])).unwrap();
    w.finish().unwrap();
    let mut bytes = fs::read(&p).unwrap();
    // v2 has v3's little-endian layout (v3 only added big-endian files).
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    fs::write(&p, &bytes).unwrap();
    let g = GgufFile::open(&p).unwrap();
    assert_eq!((g.version, g.dequantize("t").unwrap()), (2, vec![1.0, 2.0, 3.0, 4.0]));
    bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
    fs::write(&p, &bytes).unwrap();
    let msg = GgufFile::open(&p).err().unwrap().to_string();
    assert!(msg.contains("version 1") && msg.contains("v2 and v3"), "{msg}");
}
