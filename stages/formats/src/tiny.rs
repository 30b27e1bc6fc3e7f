//! A tiny built-in model for the offline quickstart: a small Llama whose weights are drawn from
//! a seed and whose byte-level BPE tokenizer is trained (by the tokenizers crate) on the
//! pipeline's own texts. It is written as a complete Hugging Face folder, so every later stage
//! treats it like a downloaded model. It is random: it learns what the quickstart teaches it,
//! nothing more.
//!
//! Deterministic: the same spec and texts give byte-identical files.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, Tokenizer,
    TokenizerBuilder,
};

use crate::config::{Architecture, ModelConfig};
use crate::tensors::{Dtype, TensorError, encode_f32, write_single};

/// Special tokens, in id order (0, 1, 2), as SmolLM2 numbers them.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// The ChatML template written into `tokenizer_config.json`.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Why the tiny model could not be written.
#[derive(Debug, thiserror::Error)]
pub enum TinyError {
    /// Tokenizer training or serialization failed.
    #[error("training the tiny tokenizer: {0}")]
    Tokenizer(String),
    /// No text to train on.
    #[error("the tiny model needs some text to train its tokenizer on; none was given")]
    NoText,
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The weights could not be written.
    #[error(transparent)]
    Tensors(#[from] TensorError),
}

/// The tiny model's shape and seed.
#[derive(Debug, Clone, PartialEq)]
pub struct TinySpec {
    /// Seed of the weights.
    pub seed: u64,
    /// Target vocabulary (the trained tokenizer may end up smaller on little text).
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Longest context.
    pub max_position_embeddings: usize,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            seed: 0,
            vocab_size: 1024,
            hidden_size: 64,
            intermediate_size: 256,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 2048,
        }
    }
}

/// How much of each text the tiny tokenizer is trained on.
pub const TOKENIZER_SAMPLE_BYTES: usize = 64 << 10;

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn head(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Trains a byte-level BPE tokenizer (GPT-2 style, no prefix space) with [`SPECIAL_TOKENS`].
pub fn train_tokenizer<S: AsRef<str>>(texts: &[S], vocab_size: usize) -> Result<Tokenizer, TinyError> {
    if texts.iter().all(|t| t.as_ref().is_empty()) {
        return Err(TinyError::NoText);
    }
    let err = |e: tokenizers::Error| TinyError::Tokenizer(e.to_string());
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(2)
        .initial_alphabet(alphabet)
        .special_tokens(SPECIAL_TOKENS.iter().map(|t| AddedToken::from(t.to_string(), true)).collect())
        .build();
    let byte_level = ByteLevel::new(false, true, true);
    let mut tokenizer =
        TokenizerBuilder::<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(byte_level.into()))
            .with_post_processor(Some(ByteLevel::new(false, false, true).into()))
            .with_decoder(Some(byte_level.into()))
            .build()
            .map_err(err)?;
    // The vocabulary is learnt from each text's first TOKENIZER_SAMPLE_BYTES: BPE training
    // time grows with the longest word, and one huge unbroken row would stall it.
    let owned: Vec<String> = texts.iter().map(|t| head(t.as_ref(), TOKENIZER_SAMPLE_BYTES).to_string()).collect();
    tokenizer.train(&mut trainer, owned.into_iter()).map_err(err)?;
    let json = tokenizer.to_string(false).map_err(err)?;
    json.parse::<Tokenizer>().map_err(err)
}

/// Normal(0, std) values from `rng` (Box–Muller; `rand` alone has no normal distribution).
fn normal(rng: &mut StdRng, n: usize, std: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        out.push((r * theta.cos()) as f32 * std);
        out.push((r * theta.sin()) as f32 * std);
    }
    out.truncate(n);
    out
}

fn write_json(path: &Path, value: &Value) -> Result<(), TinyError> {
    let text = serde_json::to_string_pretty(value).expect("json serializes") + "\n";
    std::fs::write(path, text).map_err(|source| TinyError::Io { path: path.to_path_buf(), source })
}

/// Writes the tiny model into `dir` (created if missing): `config.json`, `model.safetensors`,
/// `tokenizer.json`, `tokenizer_config.json`, `generation_config.json`. Returns its config.
pub fn write_tiny_model<S: AsRef<str>>(dir: &Path, spec: &TinySpec, texts: &[S]) -> Result<ModelConfig, TinyError> {
    std::fs::create_dir_all(dir).map_err(|source| TinyError::Io { path: dir.to_path_buf(), source })?;
    let tokenizer = train_tokenizer(texts, spec.vocab_size)?;
    let vocab = tokenizer.get_vocab_size(true);
    let id = |t: &str| tokenizer.token_to_id(t).expect("special token is in the vocabulary");
    let head_dim = spec.hidden_size / spec.num_attention_heads;
    let config = ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: vocab,
        hidden_size: spec.hidden_size,
        intermediate_size: spec.intermediate_size,
        num_hidden_layers: spec.num_hidden_layers,
        num_attention_heads: spec.num_attention_heads,
        num_key_value_heads: spec.num_key_value_heads,
        head_dim,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: spec.max_position_embeddings,
        tie_word_embeddings: true,
        attention_bias: false,
        mlp_bias: false,
        qk_norm: false,
        sliding_window: None,
        bos_token_id: Some(id(SPECIAL_TOKENS[1])),
        eos_token_ids: vec![id(SPECIAL_TOKENS[2])],
    };

    // Weights in checkpoint order, drawn in that order from one seeded stream.
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let h = spec.hidden_size;
    let mut tensors = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, values: Vec<f32>| {
        tensors.push((name, Dtype::F32, shape, encode_f32(Dtype::F32, &values)));
    };
    add("model.embed_tokens.weight".into(), vec![vocab, h], normal(&mut rng, vocab * h, 0.02));
    for l in 0..spec.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (name, out, input) in config.linear_shapes() {
            add(format!("{p}.{name}.weight"), vec![out, input], normal(&mut rng, out * input, 0.02));
        }
        add(format!("{p}.input_layernorm.weight"), vec![h], vec![1.0; h]);
        add(format!("{p}.post_attention_layernorm.weight"), vec![h], vec![1.0; h]);
    }
    add("model.norm.weight".into(), vec![h], vec![1.0; h]);
    write_single(&dir.join("model.safetensors"), &tensors)?;

    write_json(&dir.join("config.json"), &config.to_hf_json())?;
    let tokenizer_json = tokenizer.to_string(true).map_err(|e| TinyError::Tokenizer(e.to_string()))?;
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, tokenizer_json + "\n").map_err(|source| TinyError::Io { path, source })?;
    let added: serde_json::Map<String, Value> = SPECIAL_TOKENS
        .iter()
        .map(|t| {
            (
                id(t).to_string(),
                json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false,
                       "single_word": false, "special": true}),
            )
        })
        .collect();
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "added_tokens_decoder": added,
            "additional_special_tokens": [SPECIAL_TOKENS[1], SPECIAL_TOKENS[2]],
            "bos_token": SPECIAL_TOKENS[1],
            "chat_template": CHATML_TEMPLATE,
            "clean_up_tokenization_spaces": false,
            "eos_token": SPECIAL_TOKENS[2],
            "model_max_length": spec.max_position_embeddings,
            "pad_token": SPECIAL_TOKENS[2],
            "tokenizer_class": "PreTrainedTokenizerFast",
            "unk_token": SPECIAL_TOKENS[0],
        }),
    )?;
    write_json(
        &dir.join("generation_config.json"),
        &json!({
            "bos_token_id": id(SPECIAL_TOKENS[1]),
            "eos_token_id": [id(SPECIAL_TOKENS[2]), id(SPECIAL_TOKENS[0])],
            "pad_token_id": id(SPECIAL_TOKENS[2]),
        }),
    )?;
    Ok(config)
}
