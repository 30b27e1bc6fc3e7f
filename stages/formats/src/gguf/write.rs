//! GGUF v3 writer and the Hugging Face -> GGUF exporter (the inverse of `import`).
//!
//! The tensor-info table precedes the data, so the writer is given the full plan (names, dims,
//! types) up front, then receives tensors one at a time in plan order: one tensor in memory.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::GgufError;
use super::import::{hf_name, llama3_rope_factors, permute_rows};
use super::quant::{GgmlType, quantize_q8_0};
use super::reader::{DEFAULT_ALIGNMENT, MAGIC, MetaValue};
use super::tokenizer::GgufVocab;
use crate::tensors::{Dtype, TensorStore, encode_f32};

/// Tensor types the exporter writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    Q8_0,
}

impl GgufType {
    /// Parses the pipeline spelling (`f32`, `f16`, `q8_0`).
    pub fn parse(s: &str) -> Option<GgufType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Some(GgufType::F32),
            "f16" => Some(GgufType::F16),
            "q8_0" => Some(GgufType::Q8_0),
            _ => None,
        }
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`) for a file mostly of this type.
    fn file_type(self) -> u32 {
        match self {
            GgufType::F32 => 0,
            GgufType::F16 => 1,
            GgufType::Q8_0 => 7,
        }
    }

    /// The ggml type used for a tensor of `dims` (ggml order): 1-D tensors (norms, rope factors)
    /// stay F32 as llama.cpp keeps them; Q8_0 needs rows that are whole 32-element blocks and
    /// falls back to F16 otherwise.
    fn tensor_type(self, dims: &[u64]) -> GgmlType {
        if dims.len() < 2 {
            return GgmlType::F32;
        }
        match self {
            GgufType::F32 => GgmlType::F32,
            GgufType::F16 => GgmlType::F16,
            GgufType::Q8_0 if dims[0].is_multiple_of(32) => GgmlType::Q8_0,
            GgufType::Q8_0 => GgmlType::F16,
        }
    }
}

/// Encodes f32 values as a ggml tensor of type `ty` (F32, F16 or Q8_0).
pub fn encode_ggml(ty: GgmlType, values: &[f32]) -> Vec<u8> {
    match ty {
        GgmlType::F32 => encode_f32(Dtype::F32, values),
        GgmlType::F16 => encode_f32(Dtype::F16, values),
        GgmlType::Q8_0 => quantize_q8_0(values),
        other => panic!("encode_ggml: {other} is not a type newt writes"),
    }
}

/// A planned tensor: name, dims in ggml order, type.
pub type TensorPlan = (String, Vec<u64>, GgmlType);

/// Streaming GGUF v3 writer. Written to `<path>.partial` and renamed by [`GgufWriter::finish`].
pub struct GgufWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    plan: Vec<(TensorPlan, usize)>,
    next: usize,
    pos: u64,
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn put_value(buf: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => buf.push(*x),
        MetaValue::I8(x) => buf.push(*x as u8),
        MetaValue::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => buf.push(*x as u8),
        MetaValue::String(s) => put_str(buf, s),
        MetaValue::Array(ty, items) => {
            buf.extend_from_slice(&ty.to_le_bytes());
            buf.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                put_value(buf, it);
            }
        }
        MetaValue::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
    }
}

impl GgufWriter {
    /// Writes the header, metadata and tensor-info table for `tensors`, whose data must then be
    /// given in the same order through [`GgufWriter::write_tensor`].
    pub fn create(path: &Path, metadata: &[(String, MetaValue)], tensors: &[TensorPlan]) -> Result<Self, GgufError> {
        let align = DEFAULT_ALIGNMENT;
        let mut head = Vec::new();
        head.extend_from_slice(&MAGIC.to_le_bytes());
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            if let MetaValue::Array(ty, items) = v
                && items.iter().any(|i| i.type_id() != *ty)
            {
                return Err(GgufError::BadMetadata { key: k.clone(), reason: "array elements differ in type".into() });
            }
            put_str(&mut head, k);
            head.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut head, v);
        }
        let mut offset = 0u64;
        let mut plan = Vec::with_capacity(tensors.len());
        for (name, dims, ty) in tensors {
            let n: u64 = dims.iter().product();
            let len = ty.byte_len(n as usize).ok_or_else(|| GgufError::Quant {
                tensor: name.clone(),
                source: super::QuantError::Blocks { ty: *ty, n: n as usize, block: ty.block().map_or(0, |b| b.0) },
            })?;
            put_str(&mut head, name);
            head.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&ty.0.to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + len as u64).div_ceil(align) * align;
            plan.push(((name.clone(), dims.clone(), *ty), len));
        }
        head.resize((head.len() as u64).div_ceil(align) as usize * align as usize, 0);
        let tmp = path.with_extension("gguf.partial");
        let io = |source| GgufError::Io { path: tmp.clone(), source };
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(io)?);
        out.write_all(&head).map_err(io)?;
        Ok(GgufWriter { path: path.to_path_buf(), tmp, out, plan, next: 0, pos: 0 })
    }

    /// Appends the next planned tensor's encoded bytes.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<(), GgufError> {
        let Some(((want, _, ty), len)) = self.plan.get(self.next) else {
            return Err(GgufError::Unsupported(format!("tensor `{name}` was not planned")));
        };
        if want != name || *len != data.len() {
            return Err(GgufError::Unsupported(format!(
                "expected tensor `{want}` ({len} bytes of {ty}), got `{name}` ({} bytes)",
                data.len()
            )));
        }
        let io = |source| GgufError::Io { path: self.tmp.clone(), source };
        self.out.write_all(data).map_err(io)?;
        self.pos += data.len() as u64;
        let pad = self.pos.div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT - self.pos;
        self.out
            .write_all(&vec![0u8; pad as usize])
            .map_err(|source| GgufError::Io { path: self.tmp.clone(), source })?;
        self.pos += pad;
        self.next += 1;
        Ok(())
    }

    /// Checks every planned tensor was written, flushes, and moves the file into place.
    pub fn finish(self) -> Result<(), GgufError> {
        if self.next != self.plan.len() {
            return Err(GgufError::Unsupported(format!(
                "only {} of {} planned tensors were written",
                self.next,
                self.plan.len()
            )));
        }
        let tmp = self.tmp.clone();
        let io = |source| GgufError::Io { path: tmp.clone(), source };
        let f = self.out.into_inner().map_err(|e| e.into_error()).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&self.tmp, &self.path).map_err(|source| GgufError::Io { path: self.path.clone(), source })
    }
}

/// The llama.cpp name of an HF tensor (inverse of [`hf_name`]).
fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let g = [
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("self_attn.q_norm", "attn_q_norm"),
        ("self_attn.k_norm", "attn_k_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ]
    .iter()
    .find(|(h, _)| *h == part)?
    .1;
    let name = format!("blk.{layer}.{g}.{suffix}");
    (hf_name(&name).as_deref() == Some(hf)).then_some(name)
}

/// Exports a Hugging Face Llama-family folder to a GGUF v3 file llama.cpp loads: `<arch>.*`
/// hyperparameters, the tokenizer (tokens, merges, token types, special ids, chat template),
/// and tensors under llama.cpp names with the Q/K row permutation re-applied for `llama`.
pub fn export_gguf(hf_dir: &Path, out: &Path, ty: GgufType) -> Result<(), GgufError> {
    let cfg_path = hf_dir.join("config.json");
    let cfg: Value =
        fs::read_to_string(&cfg_path).map_err(|source| GgufError::Io { path: cfg_path.clone(), source }).and_then(
            |t| serde_json::from_str(&t).map_err(|e| GgufError::Unsupported(format!("{}: {e}", cfg_path.display()))),
        )?;
    let model_type = cfg["model_type"].as_str().unwrap_or("");
    let (arch, permute) = match model_type {
        "llama" | "mistral" => ("llama", true),
        "qwen2" => ("qwen2", false),
        "qwen3" => ("qwen3", false),
        other => {
            return Err(GgufError::Unsupported(format!(
                "model_type `{other}` cannot be exported to GGUF (supported: llama, mistral, qwen2, qwen3)"
            )));
        }
    };
    let need = |k: &str| cfg[k].as_u64().ok_or_else(|| GgufError::MissingKey(format!("config.json {k}")));
    let hidden = need("hidden_size")?;
    let n_head = need("num_attention_heads")?;
    let n_head_kv = cfg["num_key_value_heads"].as_u64().unwrap_or(n_head);
    let head_dim = cfg["head_dim"].as_u64().unwrap_or(hidden / n_head);
    let theta = cfg["rope_theta"].as_f64().unwrap_or(10000.0);
    let store = TensorStore::open(hf_dir)?;
    let embd = store
        .info("model.embed_tokens.weight")
        .ok_or_else(|| GgufError::MissingTensor("model.embed_tokens.weight".into()))?;
    let vocab = GgufVocab::from_hf_dir(hf_dir, embd.1[0])?;
    let tied = cfg["tie_word_embeddings"].as_bool().unwrap_or(false);

    let a = |k: &str| format!("{arch}.{k}");
    let name = cfg["_name_or_path"].as_str().unwrap_or("newt export").to_string();
    let mut meta: Vec<(String, MetaValue)> = vec![
        ("general.architecture".into(), MetaValue::String(arch.into())),
        ("general.name".into(), MetaValue::String(name)),
        ("general.file_type".into(), MetaValue::U32(ty.file_type())),
        ("general.quantization_version".into(), MetaValue::U32(2)),
        (a("block_count"), MetaValue::U32(need("num_hidden_layers")? as u32)),
        (a("context_length"), MetaValue::U32(need("max_position_embeddings")? as u32)),
        (a("embedding_length"), MetaValue::U32(hidden as u32)),
        (a("feed_forward_length"), MetaValue::U32(need("intermediate_size")? as u32)),
        (a("attention.head_count"), MetaValue::U32(n_head as u32)),
        (a("attention.head_count_kv"), MetaValue::U32(n_head_kv as u32)),
        (a("rope.freq_base"), MetaValue::F32(theta as f32)),
        (a("attention.layer_norm_rms_epsilon"), MetaValue::F32(cfg["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32)),
        (a("rope.dimension_count"), MetaValue::U32(head_dim as u32)),
        (a("vocab_size"), MetaValue::U32(embd.1[0] as u32)),
    ];
    if head_dim != hidden / n_head {
        meta.push((a("attention.key_length"), MetaValue::U32(head_dim as u32)));
        meta.push((a("attention.value_length"), MetaValue::U32(head_dim as u32)));
    }
    let mut rope_freqs = None;
    let rs = &cfg["rope_scaling"];
    match rs["rope_type"].as_str().or(rs["type"].as_str()) {
        None | Some("default") => {}
        Some("linear") => {
            meta.push((a("rope.scaling.type"), MetaValue::String("linear".into())));
            meta.push((a("rope.scaling.factor"), MetaValue::F32(rs["factor"].as_f64().unwrap_or(1.0) as f32)));
        }
        Some("llama3") => {
            let f = |k: &str, d: f64| rs[k].as_f64().unwrap_or(d);
            rope_freqs = Some(llama3_rope_factors(
                head_dim as usize,
                theta,
                f("factor", 8.0),
                f("low_freq_factor", 1.0),
                f("high_freq_factor", 4.0),
                f("original_max_position_embeddings", 8192.0),
            ));
        }
        Some(other) => return Err(GgufError::Unsupported(format!("rope_scaling type `{other}` cannot be exported"))),
    }
    meta.extend(vocab.to_metadata());

    // Plan: llama.cpp's order (embeddings, blocks by index, final norm, output).
    let mut tensors: Vec<(String, String)> = Vec::new();
    for hf in store.names() {
        if hf.ends_with("rotary_emb.inv_freq") || (tied && hf == "lm_head.weight") {
            continue;
        }
        let g = gguf_name(&hf).ok_or_else(|| GgufError::Unsupported(format!("tensor `{hf}` has no llama.cpp name")))?;
        tensors.push((g, hf));
    }
    let order = |g: &str| -> (usize, usize, String) {
        match g.strip_prefix("blk.").and_then(|r| r.split_once('.')) {
            Some((l, _)) => (1, l.parse().unwrap_or(0), g.to_string()),
            None if g.starts_with("token_embd") => (0, 0, g.to_string()),
            None => (2, 0, g.to_string()),
        }
    };
    tensors.sort_by_key(|(g, _)| order(g));
    let mut plan: Vec<TensorPlan> = tensors
        .iter()
        .map(|(g, hf)| {
            let shape = store.info(hf).expect("listed").1;
            let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
            let t = ty.tensor_type(&dims);
            (g.clone(), dims, t)
        })
        .collect();
    if let Some(f) = &rope_freqs {
        plan.push(("rope_freqs.weight".into(), vec![f.len() as u64], GgmlType::F32));
    }

    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|source| GgufError::Io { path: parent.to_path_buf(), source })?;
    }
    let mut w = GgufWriter::create(out, &meta, &plan)?;
    for ((g, hf), (_, dims, t)) in tensors.iter().zip(&plan) {
        let mut v = store.read_f32(hf)?;
        if permute {
            let rows = *dims.last().unwrap() as usize;
            if g.contains(".attn_q.") {
                v = permute_rows(&v, rows, n_head as usize);
            } else if g.contains(".attn_k.") {
                v = permute_rows(&v, rows, n_head_kv as usize);
            }
        }
        w.write_tensor(g, &encode_ggml(*t, &v))?;
    }
    if let Some(f) = &rope_freqs {
        w.write_tensor("rope_freqs.weight", &encode_ggml(GgmlType::F32, f))?;
    }
    w.finish()
}
