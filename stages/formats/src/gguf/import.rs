//! GGUF -> Hugging Face folder: config.json from `<arch>.*` metadata, weights dequantized and
//! renamed to HF names (undoing llama.cpp's Q/K row permutation), and the tokenizer files.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::GgufError;
use super::quant::SUPPORTED;
use super::reader::{GgufFile, MetaValue};
use super::tokenizer::GgufVocab;
use crate::tensors::{Dtype, ShardedWriter, encode_f32};

/// GGUF architectures newt imports, with their HF class and model_type, and whether
/// llama.cpp's converter permuted Q/K rows (it does so only for the `llama` family, whose HF
/// checkpoints use rotate-half RoPE while ggml's kernel rotates adjacent pairs).
const ARCHES: &[(&str, &str, &str, bool)] = &[
    ("llama", "LlamaForCausalLM", "llama", true),
    ("qwen2", "Qwen2ForCausalLM", "qwen2", false),
    ("qwen3", "Qwen3ForCausalLM", "qwen3", false),
];

/// What an import produced.
#[derive(Debug, Clone)]
pub struct ImportSummary {
    pub arch: String,
    pub n_tensors: usize,
    pub n_params: usize,
    pub vocab_size: usize,
    /// Source tensor types and how many tensors had each (e.g. `Q4_1: 210`).
    pub source_types: BTreeMap<String, usize>,
    /// Files written into the output folder.
    pub files: Vec<PathBuf>,
}

/// Maps a llama.cpp tensor name to its Hugging Face name (`None` for names with no HF tensor
/// or that newt does not know).
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// llama.cpp's `permute` as applied by `convert_hf_to_gguf.py` to q_proj/k_proj: within each
/// head, rows ordered [first half, second half] (rotate-half RoPE) are interleaved into pairs.
/// HF row `h*d + j*d/2 + i` moves to row `h*d + 2i + j`.
pub fn permute_rows(w: &[f32], n_rows: usize, n_head: usize) -> Vec<f32> {
    reorder_rows(w, n_rows, n_head, true)
}

/// The inverse of [`permute_rows`]: restores HF's rotate-half row order.
pub fn unpermute_rows(w: &[f32], n_rows: usize, n_head: usize) -> Vec<f32> {
    reorder_rows(w, n_rows, n_head, false)
}

fn reorder_rows(w: &[f32], n_rows: usize, n_head: usize, forward: bool) -> Vec<f32> {
    assert!(n_head > 0 && n_rows.is_multiple_of(2 * n_head), "rows {n_rows} not divisible by 2×{n_head} heads");
    let cols = w.len() / n_rows;
    let d = n_rows / n_head;
    let mut out = vec![0.0; w.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..d / 2 {
                let hf = h * d + j * (d / 2) + i;
                let gg = h * d + 2 * i + j;
                let (src, dst) = if forward { (hf, gg) } else { (gg, hf) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Llama 3 RoPE frequency factors, as llama.cpp's converter computes `rope_freqs.weight` from
/// an HF `rope_scaling` of type `llama3`.
pub(crate) fn llama3_rope_factors(
    head_dim: usize,
    theta: f64,
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original_ctx: f64,
) -> Vec<f32> {
    let low_wavelen = original_ctx / low_freq_factor;
    let high_wavelen = original_ctx / high_freq_factor;
    (0..head_dim / 2)
        .map(|k| {
            let freq = 1.0 / theta.powf((2 * k) as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor as f32
            } else {
                let smooth = (original_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect()
}

struct Hparams {
    arch: &'static (&'static str, &'static str, &'static str, bool),
    n_head: usize,
    n_head_kv: usize,
    config: Value,
}

fn hparams(g: &GgufFile, vocab: &GgufVocab) -> Result<Hparams, GgufError> {
    let name = g
        .get("general.architecture")
        .and_then(MetaValue::as_str)
        .ok_or_else(|| GgufError::MissingKey("general.architecture".into()))?;
    let arch = ARCHES.iter().find(|a| a.0 == name).ok_or_else(|| {
        let names: Vec<_> = ARCHES.iter().map(|a| a.0).collect();
        GgufError::Unsupported(format!("GGUF architecture `{name}` is not supported (supported: {})", names.join(", ")))
    })?;
    let key = |k: &str| format!("{name}.{k}");
    let int = |k: &str| -> Result<usize, GgufError> {
        g.get(&key(k)).and_then(MetaValue::as_i64).map(|v| v as usize).ok_or_else(|| GgufError::MissingKey(key(k)))
    };
    let float = |k: &str| g.get(&key(k)).and_then(MetaValue::as_f64);
    // Sizes are checked before any is used: a zero or absurd one is the file's fault, said by key.
    let sized = |k: &str, max: usize| -> Result<usize, GgufError> {
        let v = int(k)?;
        if v == 0 || v > max {
            return Err(GgufError::BadMetadata {
                key: key(k),
                reason: format!("{v} is outside the sizes newt accepts (1 to {max})"),
            });
        }
        Ok(v)
    };
    let limits = crate::config::SIZE_LIMITS;
    let hidden = sized("embedding_length", limits.hidden_size)?;
    let n_head = sized("attention.head_count", limits.heads)?;
    let n_head_kv = match int("attention.head_count_kv") {
        Ok(_) => sized("attention.head_count_kv", limits.heads)?,
        Err(_) => n_head,
    };
    sized("block_count", limits.num_hidden_layers)?;
    sized("feed_forward_length", limits.intermediate_size)?;
    let head_dim = int("attention.key_length").unwrap_or(hidden / n_head.max(1));
    if let Ok(rot) = int("rope.dimension_count")
        && rot != head_dim
    {
        return Err(GgufError::Unsupported(format!(
            "partial rotary embeddings ({name}.rope.dimension_count {rot} < head dim {head_dim})"
        )));
    }
    let embd = g.tensor("token_embd.weight").ok_or_else(|| GgufError::MissingTensor("token_embd.weight".into()))?;
    let vocab_size = int("vocab_size").unwrap_or(embd.shape()[0]);
    let theta = float("rope.freq_base").unwrap_or(10000.0);
    let ctx = int("context_length")?;
    let rope_scaling = rope_scaling(g, name, head_dim, theta)?;
    let eos = match vocab.eot {
        Some(eot) => json!([vocab.eos, eot]),
        None => json!(vocab.eos),
    };
    let mut config = json!({
        "architectures": [arch.1],
        "model_type": arch.2,
        "hidden_size": hidden,
        "intermediate_size": int("feed_forward_length")?,
        "num_hidden_layers": int("block_count")?,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float("attention.layer_norm_rms_epsilon")
            .ok_or_else(|| GgufError::MissingKey(key("attention.layer_norm_rms_epsilon")))?,
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": ctx,
        "vocab_size": vocab_size,
        "tie_word_embeddings": g.tensor("output.weight").is_none(),
        "bos_token_id": vocab.bos,
        "eos_token_id": eos,
        "attention_bias": g.tensor("blk.0.attn_q.bias").is_some(),
        "mlp_bias": false,
        "initializer_range": 0.02,
        "use_cache": true,
        "torch_dtype": "float32",
    });
    if let Some(p) = vocab.pad {
        config["pad_token_id"] = json!(p);
    }
    Ok(Hparams { arch, n_head, n_head_kv, config })
}

/// HF `rope_scaling` from the GGUF: linear scaling from metadata; Llama 3 scaling recovered
/// from the `rope_freqs.weight` factors, checked against the factors the HF parameters imply.
fn rope_scaling(g: &GgufFile, arch: &str, head_dim: usize, theta: f64) -> Result<Value, GgufError> {
    let ty = g.get(&format!("{arch}.rope.scaling.type")).and_then(MetaValue::as_str);
    let factor = g.get(&format!("{arch}.rope.scaling.factor")).and_then(MetaValue::as_f64);
    match (ty, factor) {
        (Some("linear"), Some(f)) => return Ok(json!({"rope_type": "linear", "factor": f})),
        (Some("yarn"), _) => return Err(GgufError::Unsupported("YaRN rope scaling".into())),
        _ => {}
    }
    if g.tensor("rope_freqs.weight").is_none() {
        return Ok(Value::Null);
    }
    let freqs = g.dequantize("rope_freqs.weight")?;
    let factor = freqs.iter().cloned().fold(1.0f32, f32::max) as f64;
    let orig =
        g.get(&format!("{arch}.rope.scaling.original_context_length")).and_then(MetaValue::as_f64).unwrap_or(8192.0);
    let expect = llama3_rope_factors(head_dim, theta, factor, 1.0, 4.0, orig);
    let close =
        expect.len() == freqs.len() && expect.iter().zip(&freqs).all(|(a, b)| (a - b).abs() <= 1e-3 * a.abs().max(1.0));
    if !close {
        return Err(GgufError::Unsupported(
            "rope_freqs.weight does not match Llama 3 rope scaling with low/high frequency factors \
             1/4; newt cannot express these frequencies in config.json"
                .into(),
        ));
    }
    Ok(json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": orig as u64}))
}

fn write_json(path: &Path, v: &Value) -> Result<PathBuf, GgufError> {
    let text = serde_json::to_string_pretty(v).expect("json serializes") + "\n";
    fs::write(path, text).map_err(|source| GgufError::Io { path: path.to_path_buf(), source })?;
    Ok(path.to_path_buf())
}

/// Imports a GGUF file into a Hugging Face model folder at `out_dir` (created if missing):
/// config.json, generation_config.json, tokenizer.json, tokenizer_config.json,
/// special_tokens_map.json and model.safetensors (sharded past 5 GB).
///
/// Weights are written in F32: a dequantized value is `d·q (+ m)` with an f16 scale and a small
/// integer, which f32 holds exactly (or within one f32 rounding), whereas BF16's 8-bit
/// mantissa would round the already-quantized weights a second time and F16 can overflow on
/// outliers. The cost, 4 bytes per parameter, is small for the models one imports from GGUF
/// to fine-tune on one machine (540 MB for SmolLM2-135M).
///
/// Everything that can fail on the input (architecture, tensor types and names, tokenizer) is
/// checked before anything is written.
pub fn import_to_hf(gguf: &Path, out_dir: &Path) -> Result<ImportSummary, GgufError> {
    let g = GgufFile::open(gguf)?;
    let vocab = GgufVocab::from_gguf(&g)?;
    let hp = hparams(&g, &vocab)?;
    let mut plan = Vec::new();
    let mut source_types = BTreeMap::new();
    for t in &g.tensors {
        if t.name == "rope_freqs.weight" {
            continue; // folded into config.json's rope_scaling
        }
        let hf = hf_name(&t.name)
            .ok_or_else(|| GgufError::Unsupported(format!("tensor `{}` has no Hugging Face counterpart", t.name)))?;
        if !t.ty.is_supported() {
            let names: Vec<_> = SUPPORTED.iter().filter_map(|t| t.name()).collect();
            return Err(GgufError::Unsupported(format!(
                "{}: tensor `{}` is {}, which newt cannot dequantize (supported: {})",
                gguf.display(),
                t.name,
                t.ty,
                names.join(", ")
            )));
        }
        *source_types.entry(t.ty.name().unwrap_or("?").to_string()).or_insert(0) += 1;
        plan.push((t.clone(), hf));
    }
    let tok_json = vocab.tokenizer_json()?;
    let tok_bytes = serde_json::to_vec(&tok_json).expect("json serializes");
    tokenizers::Tokenizer::from_bytes(&tok_bytes)
        .map_err(|e| GgufError::Tokenizer(format!("rebuilt tokenizer.json does not load: {e}")))?;

    fs::create_dir_all(out_dir).map_err(|source| GgufError::Io { path: out_dir.to_path_buf(), source })?;
    let mut files = Vec::new();
    let tj = out_dir.join("tokenizer.json");
    fs::write(&tj, &tok_bytes).map_err(|source| GgufError::Io { path: tj.clone(), source })?;
    files.push(tj);
    let ctx = hp.config["max_position_embeddings"].as_u64();
    files.push(write_json(&out_dir.join("tokenizer_config.json"), &vocab.tokenizer_config(ctx))?);
    files.push(write_json(&out_dir.join("special_tokens_map.json"), &vocab.special_tokens_map())?);
    files.push(write_json(&out_dir.join("config.json"), &hp.config)?);
    let mut gen_cfg = json!({"bos_token_id": vocab.bos, "eos_token_id": hp.config["eos_token_id"]});
    if let Some(p) = vocab.pad {
        gen_cfg["pad_token_id"] = json!(p);
    }
    files.push(write_json(&out_dir.join("generation_config.json"), &gen_cfg)?);

    let mut w = ShardedWriter::new(out_dir, 5_000_000_000)?;
    let mut n_params = 0;
    for (t, hf) in &plan {
        let mut v = g.dequantize(&t.name)?;
        let shape = t.shape();
        if hp.arch.3 {
            if t.name.contains(".attn_q.") {
                v = unpermute_rows(&v, shape[0], hp.n_head);
            } else if t.name.contains(".attn_k.") {
                v = unpermute_rows(&v, shape[0], hp.n_head_kv);
            }
        }
        n_params += v.len();
        w.add(hf, Dtype::F32, &shape, &encode_f32(Dtype::F32, &v))?;
    }
    files.extend(w.finish()?);
    Ok(ImportSummary {
        arch: hp.arch.0.to_string(),
        n_tensors: plan.len(),
        n_params,
        vocab_size: hp.config["vocab_size"].as_u64().unwrap_or(0) as usize,
        source_types,
        files,
    })
}
