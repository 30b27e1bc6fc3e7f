//! A frozen base quantized once and kept: the `quantize` stage's artifact, so that a QLoRA (or
//! `load_in_8bit`) run loads the decoder linears' codes directly instead of quantizing the model
//! again, and never holds a full-precision copy of them on the device.
//!
//! The folder is a safetensors checkpoint (one file, or shards with an index) plus
//! [`META_FILE`]. For each decoder linear `W` (`model.layers.{i}.{self_attn,mlp}.*.weight`):
//!
//! - `W.codes`: I32, the codes packed [`QuantCode::per_word`] to a word ([`newt_kernels::nf4`]);
//! - without double quantization, `W.absmax`: F32, one scale per 64 weights;
//! - with it, `W.absmax_codes` (I32, the scales' 8-bit codes, four a word), `W.absmax_scales` (F32,
//!   one per 256 scales) and `W.absmax_offset` (F32 `[1]`, the scales' mean).
//!
//! Everything else (embedding, norms, head, biases) is read from the model folder as before.
//! Writing streams: one weight is read, quantized (on every core) and written at a time, so the
//! host holds about one layer's matrix, not the model.

use std::path::{Path, PathBuf};

use newt_kernels::nf4::{DoubleQuant, Nf4Host, QuantCode};
use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::llama::LoadError;
use crate::tensors::{Dtype, ShardedWriter, TensorStore};

/// The artifact's description, beside its tensors.
pub const META_FILE: &str = "quantized.json";
const FORMAT: &str = "newt-quantized-base";
/// Shards of the written checkpoint.
const SHARD_BYTES: u64 = 4 << 30;

/// [`META_FILE`]'s contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantizedMeta {
    /// Always `newt-quantized-base`.
    pub format: String,
    /// `nf4` or `int8`.
    pub code: String,
    /// Whether the scales are double-quantized.
    pub double_quant: bool,
    /// Weights per scale.
    pub block: usize,
    /// Scales per second-level scale (double quantization).
    pub dq_block: usize,
    /// The quantized weights, in the order written.
    pub weights: Vec<String>,
}

/// The code book's name in [`META_FILE`] (`nf4`, `int8`).
pub fn code_name(code: QuantCode) -> &'static str {
    match code {
        QuantCode::Nf4 => "nf4",
        QuantCode::Int8 => "int8",
    }
}

/// The decoder linears of a model of `config`'s shape: name and `[out, in]`.
pub fn decoder_linears(config: &ModelConfig) -> Vec<(String, [usize; 2])> {
    let c = config;
    let (h, hd) = (c.hidden_size, c.head_dim);
    let (q_out, kv_out) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    let mut out = Vec::with_capacity(7 * c.num_hidden_layers);
    for i in 0..c.num_hidden_layers {
        for (name, shape) in [
            ("self_attn.q_proj", [q_out, h]),
            ("self_attn.k_proj", [kv_out, h]),
            ("self_attn.v_proj", [kv_out, h]),
            ("self_attn.o_proj", [h, q_out]),
            ("mlp.gate_proj", [c.intermediate_size, h]),
            ("mlp.up_proj", [c.intermediate_size, h]),
            ("mlp.down_proj", [h, c.intermediate_size]),
        ] {
            out.push((format!("model.layers.{i}.{name}.weight"), shape));
        }
    }
    out
}

/// Quantizes one weight's values with `code`; with `double_quant` its scales too.
pub fn quantize_weight(values: &[f32], code: QuantCode, double_quant: bool) -> (Nf4Host, Option<DoubleQuant>) {
    let q = newt_kernels::nf4::quantize_with(values, code);
    let dq = double_quant.then(|| newt_kernels::nf4::double_quantize(&q.absmax));
    (q, dq)
}

/// What [`write`] did.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizeSummary {
    /// Weights quantized.
    pub weights: usize,
    /// Values in them.
    pub values: u64,
    /// Bytes of the checkpoint written.
    pub bytes: u64,
    /// The checkpoint's files.
    pub files: Vec<PathBuf>,
}

fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Quantizes the decoder linears of the model in `model_dir` into `out` (see the module docs),
/// one weight at a time; `progress(done, total)` after each.
pub fn write(
    model_dir: &Path,
    out: &Path,
    code: QuantCode,
    double_quant: bool,
    mut progress: impl FnMut(usize, usize),
) -> Result<QuantizeSummary, LoadError> {
    let config = ModelConfig::from_dir(model_dir)?;
    let store = TensorStore::open(model_dir)?;
    let linears = decoder_linears(&config);
    let mut writer = ShardedWriter::new(out, SHARD_BYTES)?;
    let mut values_total = 0u64;
    for (i, (name, shape)) in linears.iter().enumerate() {
        let values = crate::llama::read_checked(&store, model_dir, name, shape)?
            .ok_or_else(|| LoadError::Missing { dir: model_dir.to_path_buf(), name: name.clone() })?;
        values_total += values.len() as u64;
        let (q, dq) = quantize_weight(&values, code, double_quant);
        drop(values);
        writer.add(&format!("{name}.codes"), Dtype::I32, &[q.packed.len()], &i32_bytes(&q.packed))?;
        match dq {
            None => writer.add(&format!("{name}.absmax"), Dtype::F32, &[q.absmax.len()], &f32_bytes(&q.absmax))?,
            Some(dq) => {
                writer.add(&format!("{name}.absmax_codes"), Dtype::I32, &[dq.codes.len()], &i32_bytes(&dq.codes))?;
                writer.add(&format!("{name}.absmax_scales"), Dtype::F32, &[dq.scales.len()], &f32_bytes(&dq.scales))?;
                writer.add(&format!("{name}.absmax_offset"), Dtype::F32, &[1], &f32_bytes(&[dq.offset]))?;
            }
        }
        progress(i + 1, linears.len());
    }
    let files = writer.finish()?;
    let meta = QuantizedMeta {
        format: FORMAT.into(),
        code: code_name(code).into(),
        double_quant,
        block: newt_kernels::nf4::NF4_BLOCK,
        dq_block: newt_kernels::nf4::DQ_BLOCK,
        weights: linears.iter().map(|(n, _)| n.clone()).collect(),
    };
    let path = out.join(META_FILE);
    let text = serde_json::to_string_pretty(&meta).expect("meta serializes") + "\n";
    std::fs::write(&path, text).map_err(|e| LoadError::Quantized { dir: out.to_path_buf(), reason: e.to_string() })?;
    let bytes = files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
    Ok(QuantizeSummary { weights: linears.len(), values: values_total, bytes, files })
}

/// An open [`write`] artifact.
pub struct QuantizedBase {
    dir: PathBuf,
    meta: QuantizedMeta,
    store: TensorStore,
}

impl std::fmt::Debug for QuantizedBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantizedBase").field("dir", &self.dir).field("meta", &self.meta).finish()
    }
}

impl QuantizedMeta {
    /// The description of the artifact in `dir`, checked to be one this newt reads; the tensors
    /// are not opened.
    pub fn read(dir: &Path) -> Result<Self, LoadError> {
        let bad = |reason: String| LoadError::Quantized { dir: dir.to_path_buf(), reason };
        let text = std::fs::read_to_string(dir.join(META_FILE)).map_err(|e| bad(format!("{META_FILE}: {e}")))?;
        let meta: QuantizedMeta = serde_json::from_str(&text).map_err(|e| bad(format!("{META_FILE}: {e}")))?;
        if meta.format != FORMAT
            || meta.block != newt_kernels::nf4::NF4_BLOCK
            || meta.dq_block != newt_kernels::nf4::DQ_BLOCK
            || !matches!(meta.code.as_str(), "nf4" | "int8")
        {
            return Err(bad(format!(
                "{META_FILE} describes {} {} in blocks of {}/{}, not a base this newt reads",
                meta.format, meta.code, meta.block, meta.dq_block
            )));
        }
        Ok(meta)
    }
}

impl QuantizedBase {
    /// Opens the artifact in `dir`, checking its description.
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        let meta = QuantizedMeta::read(dir)?;
        Ok(QuantizedBase { dir: dir.to_path_buf(), store: TensorStore::open(dir)?, meta })
    }

    /// The code book the weights use.
    pub fn code(&self) -> QuantCode {
        if self.meta.code == "int8" { QuantCode::Int8 } else { QuantCode::Nf4 }
    }

    /// Its description.
    pub fn meta(&self) -> &QuantizedMeta {
        &self.meta
    }

    /// The weight `name` of shape `[out, in]`: its codes and scales.
    pub fn weight(&self, name: &str, [out, input]: [usize; 2]) -> Result<(Nf4Host, Option<DoubleQuant>), LoadError> {
        let code = self.code();
        let n = out * input;
        let blocks = n.div_ceil(newt_kernels::nf4::NF4_BLOCK);
        // A tensor of the artifact is there with the length the shape implies.
        let check = |suffix: &str, len: usize| -> Result<(), LoadError> {
            let full = format!("{name}.{suffix}");
            let Some((_, shape)) = self.store.info(&full) else {
                return Err(LoadError::Missing { dir: self.dir.clone(), name: full });
            };
            if shape != [len] {
                return Err(LoadError::Shape { dir: self.dir.clone(), name: full, expected: vec![len], found: shape });
            }
            Ok(())
        };
        let words = blocks * newt_kernels::nf4::NF4_BLOCK / code.per_word();
        check("codes", words)?;
        let packed = self.store.read_i32(&format!("{name}.codes"))?;
        if !self.meta.double_quant {
            check("absmax", blocks)?;
            let absmax = self.store.read_f32(&format!("{name}.absmax"))?;
            return Ok((Nf4Host { code, packed, absmax, len: n }, None));
        }
        let dq_blocks = blocks.div_ceil(newt_kernels::nf4::DQ_BLOCK);
        check("absmax_codes", dq_blocks * newt_kernels::nf4::DQ_BLOCK / QuantCode::Int8.per_word())?;
        check("absmax_scales", dq_blocks)?;
        check("absmax_offset", 1)?;
        let dq = DoubleQuant {
            codes: self.store.read_i32(&format!("{name}.absmax_codes"))?,
            scales: self.store.read_f32(&format!("{name}.absmax_scales"))?,
            offset: self.store.read_f32(&format!("{name}.absmax_offset"))?[0],
            len: blocks,
        };
        Ok((Nf4Host { code, packed, absmax: Vec::new(), len: n }, Some(dq)))
    }
}
