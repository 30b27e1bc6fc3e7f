//! Merge a PEFT LoRA adapter into its base model: W' = W + scale·B·A, computed in f32 and
//! streamed row-block by row-block, so merging needs neither a GPU nor the model in memory.
//!
//! PEFT's adapter layout (`get_peft_model_state_dict`): keys are the wrapped model's names
//! under `base_model.model.`, with the adapter name (`default`) removed:
//! - `<module>.lora_A.weight` [r, in] and `<module>.lora_B.weight` [out, r] for a Linear;
//! - `<module>.lora_embedding_A` [r, vocab] and `<module>.lora_embedding_B` [hidden, r] for an
//!   Embedding, whose delta is (B·A)ᵀ;
//! - `<module>.weight` (and `.bias`) for a whole tensor: `modules_to_save` are stored this way
//!   (PEFT turns `<m>.modules_to_save.default.weight` into `<m>.weight`), and so are embedding
//!   layers saved because they are LoRA targets or the vocabulary was resized (PEFT ≥ 0.13
//!   writes those as `<m>.base_layer.weight`). Such a tensor replaces the base tensor,
//!   and a LoRA on the same module then applies on top, as when PEFT loads the adapter.
//!
//! Tied embeddings follow PEFT's unmerged behaviour: the adapter changes only the modules it
//! names. When it changes `embed_tokens` but not `lm_head` of a tied model, the output head
//! keeps the base embedding, so the merged model is written untied (`lm_head.weight` = the base
//! embedding, `tie_word_embeddings: false`); likewise when it changes `lm_head` only.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::tensors::{Dtype, ShardedWriter, TensorError, TensorStore, decode_f32, encode_f32};

const PREFIX: &str = "base_model.model.";
const EMBED: &str = "model.embed_tokens.weight";
const LM_HEAD: &str = "lm_head.weight";
/// Rows are merged in blocks of about this many f32 bytes.
const BLOCK_BYTES: usize = 32 << 20;
/// Tokenizer files taken from the adapter folder when it has a tokenizer (training may have
/// added tokens), else from the base folder.

/// How to write the merged model.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// Shard size limit for the output safetensors.
    pub max_shard_bytes: u64,
    /// Output dtype; `None` keeps each base tensor's dtype.
    pub out_dtype: Option<Dtype>,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions { max_shard_bytes: 5_000_000_000, out_dtype: None }
    }
}

/// What a merge wrote.
#[derive(Debug, Clone)]
pub struct MergeSummary {
    pub n_tensors: usize,
    /// Tensors that received a LoRA delta.
    pub n_lora: usize,
    /// Tensors replaced by a whole tensor from the adapter (modules_to_save, resized embeddings).
    pub n_replaced: usize,
    pub vocab_size: Option<usize>,
    /// Whether a tied model had to be written untied.
    pub untied: bool,
    pub scale: f32,
    pub files: Vec<PathBuf>,
}

/// Errors from merging; each names the tensor or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Tensors(#[from] TensorError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    BadConfig { path: PathBuf, reason: String },
    #[error("shape mismatch for `{tensor}`: {what}")]
    Shape { tensor: String, what: String },
    #[error("the adapter names `{adapter}`, but the base model has no tensor `{base}`")]
    NoBaseTensor { adapter: String, base: String },
    #[error("adapter tensors newt cannot merge: {}", .0.join(", "))]
    Unrecognized(Vec<String>),
    #[error("{0}")]
    Unsupported(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> MergeError + '_ {
    move |source| MergeError::Io { path: path.to_path_buf(), source }
}

fn read_json(path: &Path) -> Result<Value, MergeError> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    serde_json::from_str(&text).map_err(|e| MergeError::BadConfig { path: path.to_path_buf(), reason: e.to_string() })
}

/// The LoRA hyperparameters of `adapter_config.json` that the merge needs.
#[derive(Debug, Clone)]
struct AdapterConfig {
    r: f64,
    alpha: f64,
    rslora: bool,
    fan_in_fan_out: bool,
    alpha_pattern: Vec<(String, f64)>,
}

impl AdapterConfig {
    fn read(path: &Path) -> Result<Self, MergeError> {
        let c = read_json(path)?;
        let bad = |reason: String| MergeError::BadConfig { path: path.to_path_buf(), reason };
        if let Some(t) = c["peft_type"].as_str().filter(|t| *t != "LORA") {
            return Err(bad(format!("peft_type {t} is not LORA")));
        }
        if c["use_dora"].as_bool() == Some(true) {
            return Err(MergeError::Unsupported(format!("{}: DoRA adapters cannot be merged by newt", path.display())));
        }
        let r = c["r"].as_f64().ok_or_else(|| bad("missing `r`".into()))?;
        let alpha_pattern = c["alpha_pattern"]
            .as_object()
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()?))).collect())
            .unwrap_or_default();
        Ok(AdapterConfig {
            r,
            alpha: c["lora_alpha"].as_f64().unwrap_or(8.0),
            rslora: c["use_rslora"].as_bool().unwrap_or(false),
            fan_in_fan_out: c["fan_in_fan_out"].as_bool().unwrap_or(false),
            alpha_pattern,
        })
    }

    /// PEFT's scaling for a module of rank `r`: alpha/r, or alpha/√r with rsLoRA; alpha from
    /// `alpha_pattern` when a pattern matches the module name (PEFT: `(.*\.)?<key>$`).
    fn scale(&self, module: &str, r: usize) -> f32 {
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(k, _)| module == k || module.ends_with(&format!(".{k}")))
            .map_or(self.alpha, |(_, a)| *a);
        let r = r as f64;
        (if self.rslora { alpha / r.sqrt() } else { alpha / r }) as f32
    }
}

/// One LoRA to apply: delta = scale·B·A (Linear), or its transpose (Embedding, fan_in_fan_out).
#[derive(Debug, Clone)]
struct Lora {
    a: String,
    b: String,
    rank: usize,
    scale: f32,
    transposed: bool,
}

/// One output tensor: where its values come from and what is added.
#[derive(Debug, Clone)]
struct Planned {
    out: String,
    /// `(from_adapter, name)`: a base tensor, or a whole tensor stored in the adapter.
    source: (bool, String),
    shape: Vec<usize>,
    dtype: Dtype,
    lora: Option<Lora>,
}

fn shape_err(tensor: &str, what: String) -> MergeError {
    MergeError::Shape { tensor: tensor.to_string(), what }
}

/// Reads the adapter and checks it against the base model's headers; returns the plan.
fn plan(
    base: &TensorStore,
    adapter: &TensorStore,
    cfg: &AdapterConfig,
    base_cfg: &Value,
    opts: &MergeOptions,
) -> Result<(Vec<Planned>, bool), MergeError> {
    let mut loras: BTreeMap<String, (Option<String>, Option<String>, bool)> = BTreeMap::new();
    let mut whole: BTreeMap<String, String> = BTreeMap::new();
    let mut unknown = Vec::new();
    for key in adapter.names() {
        let Some(rest) = key.strip_prefix(PREFIX) else {
            unknown.push(key);
            continue;
        };
        let lora_part = [
            (".lora_A.weight", true, false),
            (".lora_B.weight", false, false),
            (".lora_embedding_A", true, true),
            (".lora_embedding_B", false, true),
        ]
        .into_iter()
        .find_map(|(suf, is_a, emb)| rest.strip_suffix(suf).map(|m| (m.to_string(), is_a, emb)));
        if let Some((module, is_a, emb)) = lora_part {
            let e = loras.entry(module).or_insert((None, None, emb));
            *(if is_a { &mut e.0 } else { &mut e.1 }) = Some(key.clone());
        } else if rest.ends_with(".weight") || rest.ends_with(".bias") {
            // `<m>.base_layer.weight`: PEFT saves a LoRA-wrapped embedding's base weight this way
            // when the embedding is a target (`save_embedding_layers`).
            let name = rest.replace(".modules_to_save.default", "").replace(".base_layer.", ".");
            whole.insert(name, key.clone());
        } else {
            unknown.push(key);
        }
    }
    if !unknown.is_empty() {
        return Err(MergeError::Unrecognized(unknown));
    }
    let tied = base_cfg["tie_word_embeddings"].as_bool().unwrap_or(false);
    let base_shape = |name: &str| base.info(name);
    // A tied model's head is its embedding.
    let resolve = |name: &str| -> Option<(String, Dtype, Vec<usize>)> {
        match base_shape(name) {
            Some((d, s)) => Some((name.to_string(), d, s)),
            None if tied && name == LM_HEAD => base_shape(EMBED).map(|(d, s)| (EMBED.to_string(), d, s)),
            None => None,
        }
    };
    let out_dtype = |d: Dtype| opts.out_dtype.unwrap_or(d);

    let mut plans: BTreeMap<String, Planned> = BTreeMap::new();
    for (name, key) in &whole {
        let (_, bd, bs) =
            resolve(name).ok_or_else(|| MergeError::NoBaseTensor { adapter: key.clone(), base: name.clone() })?;
        let (_, s) = adapter.info(key).expect("listed");
        let vocab = name == EMBED || name == LM_HEAD;
        // A resized vocabulary changes rows only; anything else must match exactly.
        let ok = if vocab { s.len() == 2 && s[1] == bs[1] } else { s == bs };
        if !ok {
            return Err(shape_err(name, format!("base {bs:?}, adapter `{key}` {s:?}")));
        }
        plans.insert(
            name.clone(),
            Planned { out: name.clone(), source: (true, key.clone()), shape: s, dtype: out_dtype(bd), lora: None },
        );
    }
    for (module, (a, b, emb)) in &loras {
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (a.clone(), b.clone()),
            (a, b) => {
                let has = a.as_ref().or(b.as_ref()).unwrap();
                return Err(MergeError::Unsupported(format!(
                    "`{has}` has no matching lora_{} tensor",
                    if a.is_some() { "B" } else { "A" }
                )));
            }
        };
        let name = format!("{module}.weight");
        let planned = match plans.get(&name) {
            Some(p) => p.clone(),
            None => {
                let (src, bd, bs) = resolve(&name)
                    .ok_or_else(|| MergeError::NoBaseTensor { adapter: a.clone(), base: name.clone() })?;
                Planned { out: name.clone(), source: (false, src), shape: bs, dtype: out_dtype(bd), lora: None }
            }
        };
        let (sa, sb) = (adapter.info(&a).expect("listed").1, adapter.info(&b).expect("listed").1);
        let w = &planned.shape;
        let transposed = *emb || cfg.fan_in_fan_out;
        // Linear: A [r, in], B [out, r], W [out, in]. Embedding / fan_in_fan_out: W = (B·A)ᵀ.
        let (rows_from, cols_from) = if transposed { (sa.get(1), sb.first()) } else { (sb.first(), sa.get(1)) };
        let fits = sa.len() == 2
            && sb.len() == 2
            && sa[0] == sb[1]
            && w.len() == 2
            && rows_from == Some(&w[0])
            && cols_from == Some(&w[1]);
        if !fits {
            return Err(shape_err(&name, format!("weight {w:?}, lora A `{a}` {sa:?}, lora B `{b}` {sb:?}")));
        }
        let lora = Lora { a, b, rank: sa[0], scale: cfg.scale(module, sa[0]), transposed };
        plans.insert(name.clone(), Planned { lora: Some(lora), ..planned });
    }

    // Output order: the base model's, with an untied head appended after the embedding.
    let changed: HashSet<&str> = plans.keys().map(String::as_str).collect();
    let head_in_base = base.info(LM_HEAD).is_some();
    // Any change to either side of a tied pair makes the two differ (see the module docs).
    let untie = tied && (changed.contains(EMBED) || changed.contains(LM_HEAD));
    let mut out = Vec::new();
    for name in base.names() {
        let p = plans.remove(&name).unwrap_or_else(|| {
            let (d, s) = base.info(&name).expect("listed");
            Planned { out: name.clone(), source: (false, name.clone()), shape: s, dtype: out_dtype(d), lora: None }
        });
        out.push(p);
        if name == EMBED && untie && !head_in_base {
            let head = plans.remove(LM_HEAD).unwrap_or_else(|| {
                let (d, s) = base.info(EMBED).expect("listed");
                Planned {
                    out: LM_HEAD.into(),
                    source: (false, EMBED.into()),
                    shape: s,
                    dtype: out_dtype(d),
                    lora: None,
                }
            });
            out.push(head);
        }
    }
    if let Some(leftover) = plans.into_keys().next() {
        return Err(MergeError::NoBaseTensor { adapter: leftover.clone(), base: leftover });
    }
    let rows = |n: &str| out.iter().find(|p| p.out == n).map(|p| p.shape[0]);
    if let (Some(e), Some(h)) = (rows(EMBED), rows(LM_HEAD))
        && e != h
    {
        return Err(shape_err(LM_HEAD, format!("{h} rows, but {EMBED} has {e}: resize both (lora_modules_to_save)")));
    }
    Ok((out, untie))
}

/// Adds scale·(B·A) (or its transpose) to rows `r0..r0 + block.len()/cols` of W.
fn add_delta(block: &mut [f32], r0: usize, cols: usize, lora: &Lora, a: &[f32], b: &[f32]) {
    let r = lora.rank;
    // Rows of the delta are combinations of the rows of `m` ([r, cols]) with coefficients
    // coef(row, k): B[row, k] with m = A; or A[k, row] with m = Bᵀ when transposed.
    let bt: Vec<f32>;
    let m: &[f32] = if lora.transposed {
        let hidden = b.len() / r;
        bt = (0..r * hidden).map(|i| b[(i % hidden) * r + i / hidden]).collect();
        &bt
    } else {
        a
    };
    let n_rows = block.len() / cols;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(n_rows.max(1));
    let per = n_rows.div_ceil(threads);
    std::thread::scope(|s| {
        for (t, chunk) in block.chunks_mut(per * cols).enumerate() {
            s.spawn(move || {
                for (i, row) in chunk.chunks_mut(cols).enumerate() {
                    let o = r0 + t * per + i;
                    for k in 0..r {
                        let c = lora.scale * if lora.transposed { a[k * (a.len() / r) + o] } else { b[o * r + k] };
                        for (w, x) in row.iter_mut().zip(&m[k * cols..(k + 1) * cols]) {
                            *w += c * x;
                        }
                    }
                }
            });
        }
    });
}

/// Merges the PEFT LoRA adapter in `adapter_dir` into the Hugging Face model in `base_dir`,
/// writing a complete model folder to `out_dir`: sharded safetensors (+ index), config.json
/// (vocab_size and tie_word_embeddings updated as needed), generation_config.json and the
/// tokenizer files (from the adapter folder when it has tokenizer.json, else from the base).
///
/// Everything is validated from headers before anything is written; then each output tensor
/// is produced in row blocks of ~32 MB: decoded to f32, the delta added, re-encoded, appended.
pub fn merge_lora(
    base_dir: &Path,
    adapter_dir: &Path,
    out_dir: &Path,
    opts: MergeOptions,
) -> Result<MergeSummary, MergeError> {
    let cfg = AdapterConfig::read(&adapter_dir.join("adapter_config.json"))?;
    let adapter_file = adapter_dir.join("adapter_model.safetensors");
    if !adapter_file.is_file() && adapter_dir.join("adapter_model.bin").is_file() {
        return Err(MergeError::Unsupported(format!(
            "{}: only adapter_model.safetensors is supported (found a pickled adapter_model.bin)",
            adapter_dir.display()
        )));
    }
    let adapter = TensorStore::open_file(&adapter_file)?;
    let base = TensorStore::open(base_dir)?;
    let base_cfg_path = base_dir.join("config.json");
    let mut config = read_json(&base_cfg_path)?;
    let (plan, untie) = plan(&base, &adapter, &cfg, &config, &opts)?;
    let tok_src = if adapter_dir.join("tokenizer.json").is_file() { adapter_dir } else { base_dir };
    if !tok_src.join("tokenizer.json").is_file() {
        return Err(MergeError::Unsupported(format!(
            "no tokenizer.json in {} or {}",
            adapter_dir.display(),
            base_dir.display()
        )));
    }

    fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let mut w = ShardedWriter::new(out_dir, opts.max_shard_bytes)?;
    let (mut n_lora, mut n_replaced) = (0, 0);
    for p in &plan {
        let store = if p.source.0 { &adapter } else { &base };
        let (sd, _, raw) = store.read_raw(&p.source.1)?;
        let lora = match &p.lora {
            Some(l) => Some((l, adapter.read_f32(&l.a)?, adapter.read_f32(&l.b)?)),
            None => None,
        };
        n_lora += lora.is_some() as usize;
        n_replaced += p.source.0 as usize;
        w.begin_tensor(&p.out, p.dtype, &p.shape)?;
        if lora.is_none() && sd == p.dtype {
            // Untouched: copy bytes as they are (bit-exact, no f32 round trip).
            for c in raw.chunks(BLOCK_BYTES) {
                w.write_chunk(c)?;
            }
        } else {
            let cols = p.shape.get(1..).map_or(1, |s| s.iter().product::<usize>()).max(1);
            let rows_per = (BLOCK_BYTES / 4 / cols).max(1);
            let row_bytes = cols * sd.size();
            for (i, chunk) in raw.chunks(rows_per * row_bytes).enumerate() {
                let mut block = decode_f32(sd, chunk);
                if let Some((l, a, b)) = &lora {
                    add_delta(&mut block, i * rows_per, cols, l, a, b);
                }
                w.write_chunk(&encode_f32(p.dtype, &block))?;
            }
        }
        w.end_tensor()?;
        store.release(&p.source.1);
    }
    let mut files = w.finish()?;

    let vocab = plan.iter().find(|p| p.out == EMBED).map(|p| p.shape[0]);
    if let Some(v) = vocab {
        config["vocab_size"] = v.into();
    }
    if untie {
        config["tie_word_embeddings"] = false.into();
    }
    if let Some(d) = opts.out_dtype {
        config["torch_dtype"] = d.torch_name().into();
    }
    let cp = out_dir.join("config.json");
    fs::write(&cp, serde_json::to_string_pretty(&config).expect("json") + "\n").map_err(io(&cp))?;
    files.push(cp);
    let mut copy = |from: &Path, name: &str| -> Result<(), MergeError> {
        if from.join(name).is_file() {
            let to = out_dir.join(name);
            fs::copy(from.join(name), &to).map_err(io(&to))?;
            files.push(to);
        }
        Ok(())
    };
    copy(base_dir, "generation_config.json")?;
    for f in crate::hf::TOKENIZER_FILES {
        copy(tok_src, f)?;
    }
    Ok(MergeSummary {
        n_tensors: plan.len(),
        n_lora,
        n_replaced,
        vocab_size: vocab,
        untied: untie,
        scale: cfg.scale("", cfg.r as usize),
        files,
    })
}
