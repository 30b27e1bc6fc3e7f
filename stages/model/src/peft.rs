//! LoRA adapters in PEFT's on-disk format, so `PeftModel.from_pretrained` loads what newt
//! trains and newt loads what PEFT (or an earlier newt run, via `lora_model_dir`) saved.
//!
//! `adapter_config.json` holds the hyper-parameters; `adapter_model.safetensors` holds f32
//! tensors under PEFT's names, the adapter name (`default`) removed as PEFT removes it:
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, `….lora_B.weight`, and for
//! modules trained in full `base_model.model.model.embed_tokens.weight`,
//! `base_model.model.lm_head.weight`.
//!
//! The format itself (LoRA's settings, `adapter_config.json`, the names, the folder writer) is
//! `newt_formats::adapter`, without Burn; this module moves the tensors between it and a [`Llama`].

use std::collections::BTreeSet;
use std::path::Path;

use burn::module::Param;
use burn::tensor::{DType, Tensor, TensorData, backend::Backend};

use crate::llama::Llama;
use crate::lora::{LINEAR_TARGETS, LoraConfig};
use crate::tensors::{Dtype, TensorStore, encode_f32};

pub use newt_formats::adapter::{
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX, PeftError, adapter_config_json, read_adapter_config, write_adapter,
};

/// Host f32 copy of a tensor with its shape.
fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> (Vec<usize>, Vec<u8>) {
    let shape = t.dims().to_vec();
    let values: Vec<f32> = t.cast(DType::F32).into_data().convert::<f32>().into_vec().expect("f32 tensor data");
    (shape, encode_f32(Dtype::F32, &values))
}

/// Writes `model`'s adapter (and fully trained modules) into `dir` in PEFT's format.
pub fn save_adapter<B: Backend>(
    model: &Llama<B>,
    lora: &LoraConfig,
    base_model_name_or_path: &str,
    dir: &Path,
) -> Result<(), PeftError> {
    let mut tensors = Vec::new();
    for (path, linear) in model.linears() {
        if let Some(adapter) = &linear.lora {
            for (part, t) in [("lora_A", adapter.lora_a.val()), ("lora_B", adapter.lora_b.val())] {
                let (shape, bytes) = host(t);
                tensors.push((format!("{PREFIX}{path}.{part}.weight"), Dtype::F32, shape, bytes));
            }
        }
    }
    for module in &lora.modules_to_save {
        let (name, t) = match module.as_str() {
            "embed_tokens" => ("model.embed_tokens.weight", model.embed_tokens.val()),
            _ => ("lm_head.weight", model.lm_head_weight()),
        };
        let (shape, bytes) = host(t);
        tensors.push((format!("{PREFIX}{name}"), Dtype::F32, shape, bytes));
    }
    write_adapter(dir, lora, base_model_name_or_path, &tensors)
}

/// Attaches the adapter saved in `dir` to `model` (weights trainable, so training can go on
/// from it) and returns it with the adapter's settings.
pub fn load_adapter<B: Backend>(model: Llama<B>, dir: &Path) -> Result<(Llama<B>, LoraConfig), PeftError> {
    let config = read_adapter_config(dir)?;
    let path = dir.join(ADAPTER_WEIGHTS);
    let store = TensorStore::open_file(&path)?;
    let mut unused: BTreeSet<String> = store.names().into_iter().collect();
    let bad = |reason: String| PeftError::BadTensor { path: path.clone(), reason };
    let mut read = |name: String, shape: [usize; 2], device: &B::Device| -> Result<Param<Tensor<B, 2>>, PeftError> {
        let found = store.info(&name).ok_or_else(|| bad(format!("tensor `{name}` is missing")))?.1;
        if found != shape {
            return Err(bad(format!("tensor `{name}` has shape {found:?}, expected {shape:?}")));
        }
        unused.remove(&name);
        let values = store.read_f32(&name)?;
        Ok(Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), (device, DType::F32))))
    };

    // An adapter trained with tokens added to the vocabulary carries the grown embedding and
    // head (modules_to_save): grow the base to match first, as PEFT's users do with
    // `resize_token_embeddings(len(tokenizer))` before loading it.
    let [vocab, hidden] = model.embed_tokens.dims();
    let grown = ["model.embed_tokens.weight", "lm_head.weight"]
        .iter()
        .filter_map(|n| store.info(&format!("{PREFIX}{n}")).map(|(_, shape)| shape))
        .filter(|s| s.len() == 2 && s[1] == hidden && s[0] > vocab)
        .map(|s| s[0])
        .max();
    let model = match grown {
        Some(n) => model.resize_vocab(n),
        None => model,
    };
    let model = model.with_lora(&config)?;
    let mut model = model.map_linears(|path, mut linear| {
        let [out, input] = linear.dims();
        if let Some(adapter) = linear.lora.as_mut() {
            let device = linear.weight.device();
            let r = config.r;
            adapter.lora_a = read(format!("{PREFIX}{path}.lora_A.weight"), [r, input], &device)?;
            adapter.lora_b = read(format!("{PREFIX}{path}.lora_B.weight"), [out, r], &device)?;
        }
        Ok::<_, PeftError>(linear)
    })?;
    let device = model.embed_tokens.device();
    let [vocab, hidden] = model.embed_tokens.dims();
    for module in &config.modules_to_save {
        let dtype = model.embed_tokens.val().dtype();
        match module.as_str() {
            "embed_tokens" => {
                let p = read(format!("{PREFIX}model.embed_tokens.weight"), [vocab, hidden], &device)?;
                model.embed_tokens = Param::from_tensor(p.val().cast(dtype));
            }
            _ => {
                let p = read(format!("{PREFIX}lm_head.weight"), [vocab, hidden], &device)?;
                model.lm_head = Some(Param::from_tensor(p.val().cast(dtype)));
            }
        }
    }
    if let Some(name) = unused.into_iter().next() {
        return Err(bad(format!(
            "tensor `{name}` does not belong to a LoRA adapter on {} of this model",
            LINEAR_TARGETS.join("/")
        )));
    }
    Ok((model, config))
}
