//! What a training run will hold in memory, worked out from the model's shape before anything
//! is loaded (`newt plan`): weights, gradients, optimizer state and activations, per replica.
//!
//! The estimate follows what newt's trainer keeps, not a generic formula:
//! - weights in the backend's type (bf16 on CUDA, f32 on the CPU); a quantized base keeps its
//!   decoder linears at 4 or 8 bits a weight plus one scale per 64 (f32, or 8 bits plus one f32
//!   per 256 when double-quantized); LoRA's `A` and `B` in f32;
//! - gradients: each trained parameter's gradient in its own type, plus the flat f32 vector the
//!   optimizer step reads (clipping and AdamW run on one concatenated vector);
//! - AdamW: two f32 moments per trained parameter;
//! - activations of one micro-batch (`micro_batch_size × sequence_len` tokens, padded rows
//!   counted): what each decoder layer keeps for its backward pass (its input and normed input,
//!   q/k/v after RoPE, the attention output, the residual, the MLP's gate, up and product), for
//!   every layer, or with gradient checkpointing one layer input per layer plus one layer's
//!   worth; and the loss's logits, `chunk × vocab` at a time with their gradient, both in the
//!   backend's type (the CUDA kernel reads bf16 logits and writes a bf16 gradient), the gradient
//!   in f32 when the head itself trains.
//!
//! On CUDA the process holds more than these tensors: the context, and what CubeCL's pools
//! reserve for the step's transient buffers. [`MemoryEstimate::runtime`] counts both with a
//! factor measured on H100 runs, not derived from the operations.

use crate::config::ModelConfig;
use crate::full::Unfrozen;
use crate::lora::LoraConfig;

/// What trains.
#[derive(Debug, Clone)]
pub enum Trained<'a> {
    /// Every weight, or those `unfrozen` names.
    Full(Option<&'a Unfrozen>),
    /// A LoRA adapter (and its `modules_to_save`).
    Lora(&'a LoraConfig),
}

/// The run's shape, as far as memory goes.
#[derive(Debug, Clone)]
pub struct MemorySpec<'a> {
    /// What trains.
    pub trained: Trained<'a>,
    /// Bytes of a weight and an activation: 2 (bf16, CUDA) or 4 (f32, CPU).
    pub bytes_per_value: u64,
    /// Bits of a quantized base's decoder-linear weight (4 for QLoRA, 8 for `load_in_8bit`).
    pub quantized_bits: Option<u64>,
    /// The quantized base's scales are double-quantized (8 bits each, one f32 per 256).
    pub double_quant: bool,
    /// Rows per micro-batch.
    pub micro_batch_size: u64,
    /// Tokens per row (padded).
    pub sequence_len: u64,
    /// Recompute each decoder layer in the backward pass.
    pub gradient_checkpointing: bool,
    /// Tokens per chunk of the loss's logits.
    pub loss_chunk_tokens: u64,
    /// Count what a CUDA process holds beyond the training tensors ([`MemoryEstimate::runtime`]).
    pub cuda: bool,
}

/// What a CUDA process of newt holds outside CubeCL's memory pools (the context, cuBLASLt's
/// workspace): nvidia-smi's figure less the pools' reserved bytes, 0.57 GiB on every H100 row of
/// `bench/results/gpu_8b.md` (1B, 8B and SmolLM2 shapes alike).
pub const CUDA_CONTEXT: u64 = 584 << 20;

/// Bytes, by what holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryEstimate {
    /// Trained parameters (elements).
    pub trained_params: u64,
    /// Model weights (and adapters).
    pub weights: u64,
    /// Gradients, with the optimizer's flat f32 copy.
    pub gradients: u64,
    /// AdamW's two f32 moments.
    pub optimizer: u64,
    /// One micro-batch's saved activations and the loss's logits.
    pub activations: u64,
    /// On CUDA, what the process holds beyond the tensors above (0 on the CPU): the context
    /// ([`CUDA_CONTEXT`]) and the pools' reserve over the step's transient tensors, 0.6 × the
    /// gradients and activations (pools keep what they reserved, in their own page sizes). The
    /// factor is measured, not derived: fitted to nvidia-smi's peaks of four H100 runs in newt's
    /// pool layout (`kernels/vendor/cubecl-cuda/src/pools.rs`; 8B LoRA with and without
    /// checkpointing, 1B; `bench/results/gpu_8b.md`), which it reproduces within 4 %. Under
    /// CubeCL's default layout the same runs also held a page the size of the whole logits; the
    /// pool layout removed it, and with it that term.
    pub runtime: u64,
}

impl MemoryEstimate {
    /// The sum.
    pub fn total(&self) -> u64 {
        self.weights + self.gradients + self.optimizer + self.activations + self.runtime
    }
}

/// Every weight of a model of this shape, by Hugging Face name, with its element count and
/// whether it is a decoder linear (the weights a quantized base stores in 4 or 8 bits).
pub fn weights(c: &ModelConfig) -> Vec<(String, u64, bool)> {
    let (h, hd, v) = (c.hidden_size as u64, c.head_dim as u64, c.vocab_size as u64);
    let mut out = vec![("model.embed_tokens.weight".to_string(), v * h, false)];
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (name, out_f, in_f) in c.linear_shapes() {
            let (out_f, in_f) = (out_f as u64, in_f as u64);
            out.push((format!("{p}.{name}.weight"), out_f * in_f, true));
            let bias =
                if name.starts_with("self_attn") { c.attention_bias && name != "self_attn.o_proj" } else { c.mlp_bias };
            if bias {
                out.push((format!("{p}.{name}.bias"), out_f, false));
            }
        }
        if c.qk_norm {
            out.push((format!("{p}.self_attn.q_norm.weight"), hd, false));
            out.push((format!("{p}.self_attn.k_norm.weight"), hd, false));
        }
        out.push((format!("{p}.input_layernorm.weight"), h, false));
        out.push((format!("{p}.post_attention_layernorm.weight"), h, false));
    }
    out.push(("model.norm.weight".to_string(), h, false));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), v * h, false));
    }
    out
}

/// The estimate for training a model of shape `c` as `spec` says.
pub fn estimate(c: &ModelConfig, spec: &MemorySpec<'_>) -> MemoryEstimate {
    let w = spec.bytes_per_value;
    let all = weights(c);
    let (h, i, hd) = (c.hidden_size as u64, c.intermediate_size as u64, c.head_dim as u64);
    let (q, kv) = (c.num_attention_heads as u64 * hd, c.num_key_value_heads as u64 * hd);
    let v = c.vocab_size as u64;
    let mut weights_bytes: u64 = all
        .iter()
        .map(|(_, n, linear)| match (spec.quantized_bits, linear) {
            (Some(bits), true) if spec.double_quant => n * bits / 8 + n.div_ceil(64) + n.div_ceil(64 * 256) * 4,
            (Some(bits), true) => n * bits / 8 + n.div_ceil(64) * 4,
            _ => n * w,
        })
        .sum();
    // Trained elements, and the bytes of their gradients in their own type.
    let (trained, grad_bytes) = match &spec.trained {
        Trained::Full(unfrozen) => {
            let n: u64 = all.iter().filter(|(name, ..)| unfrozen.is_none_or(|u| u.matches(name))).map(|t| t.1).sum();
            (n, n * w)
        }
        Trained::Lora(l) => {
            let regex = l.regex().ok().flatten();
            let mut n = 0;
            for layer in 0..c.num_hidden_layers {
                for (module, out_f, in_f) in c.linear_shapes() {
                    if l.adapts(&format!("model.layers.{layer}.{module}"), regex.as_ref()) {
                        n += l.r as u64 * (in_f + out_f) as u64;
                    }
                }
            }
            // A and B are f32 weights beside the base.
            weights_bytes += n * 4;
            let saved = l.modules_to_save.len() as u64 * v * h;
            // A tied head named in modules_to_save gets its own copy.
            if l.modules_to_save.iter().any(|m| m == "lm_head") && c.tie_word_embeddings {
                weights_bytes += v * h * w;
            }
            (n + saved, n * 4 + saved * w)
        }
    };
    let tokens = spec.micro_batch_size * spec.sequence_len;
    let per_layer = tokens * (4 * h + 2 * q + 2 * kv + 3 * i) * w;
    let layers = c.num_hidden_layers as u64;
    let kept = if spec.gradient_checkpointing { layers * tokens * h * w + per_layer } else { layers * per_layer };
    let chunk = spec.loss_chunk_tokens.min(tokens).max(1);
    let head_name = if c.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
    let head_trains = match &spec.trained {
        Trained::Full(unfrozen) => unfrozen.is_none_or(|u| u.matches(head_name)),
        // The head's weight is `lm_head`, or the embedding when tied: an untied model's saved
        // embedding leaves the head frozen.
        Trained::Lora(l) => {
            l.modules_to_save.iter().any(|m| m == "lm_head" || (m == "embed_tokens" && c.tie_word_embeddings))
        }
    };
    let head = tokens * h * w * 2 + chunk * v * (w + if head_trains { 4 } else { w });
    let (gradients, activations) = (grad_bytes + trained * 4, kept + head);
    let runtime = if spec.cuda { CUDA_CONTEXT + (gradients + activations) * 3 / 5 } else { 0 };
    MemoryEstimate {
        trained_params: trained,
        weights: weights_bytes,
        gradients,
        optimizer: trained * 8,
        activations,
        runtime,
    }
}

/// Whether an estimate of `total` bytes comes within 10 % of a device of `device` bytes, where
/// the estimate's error decides whether the run fits (an 8B run in CubeCL's default pool layout
/// ran out at 79.2 of 79.6 GiB; `bench/results/gpu_8b.md`).
pub fn nearly_full(total: u64, device: u64) -> bool {
    total > device / 10 * 9
}

/// What to say about a run that [`nearly_full`] flags.
pub const NEARLY_FULL: &str = "the run may stop with an out-of-memory error (bench/results/gpu_8b.md); \
     gradient_checkpointing or a smaller micro_batch_size leaves room";

/// The runtime's share as `newt plan` prints it after the activations: " + CUDA runtime and
/// allocator X", or nothing on the CPU.
pub fn runtime_part(e: &MemoryEstimate) -> String {
    if e.runtime == 0 { String::new() } else { format!(" + CUDA runtime and allocator {}", gib(e.runtime)) }
}

/// `bytes` as GiB with one decimal (two below 1 GiB), or MiB below 0.01 GiB.
pub fn gib(bytes: u64) -> String {
    let g = bytes as f64 / (1u64 << 30) as f64;
    match g {
        g if g < 0.01 => format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64),
        g if g < 1.0 => format!("{g:.2} GiB"),
        g => format!("{g:.1} GiB"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA_8B: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "max_position_embeddings": 131072, "tie_word_embeddings": false}"#;

    fn llama_8b() -> ModelConfig {
        config(LLAMA_8B)
    }

    fn spec<'a>(trained: Trained<'a>, quantized_bits: Option<u64>) -> MemorySpec<'a> {
        MemorySpec {
            trained,
            bytes_per_value: 2,
            quantized_bits,
            double_quant: false,
            micro_batch_size: 2,
            sequence_len: 4096,
            gradient_checkpointing: true,
            loss_chunk_tokens: 1024,
            cuda: false,
        }
    }

    #[test]
    fn weights_count_what_the_config_says() {
        let c = llama_8b();
        let n: u64 = weights(&c).iter().map(|t| t.1).sum();
        assert_eq!(n, c.num_parameters() as u64);
        assert_eq!(n, 8_030_261_248, "Llama-3.1-8B's parameter count");
    }

    #[test]
    fn the_production_shapes_come_out_where_the_arithmetic_puts_them() {
        let c = llama_8b();
        let n = c.num_parameters() as u64;
        // Full fine-tune, bf16: 2 bytes of weight, 2 + 4 of gradient, 8 of AdamW per parameter.
        let full = estimate(&c, &spec(Trained::Full(None), None));
        assert_eq!(full.trained_params, n);
        assert_eq!((full.weights, full.gradients, full.optimizer), (2 * n, 6 * n, 8 * n));
        assert!(full.total() > 16 * n && full.total() < 16 * n + (8 << 30), "{}", gib(full.total()));
        // LoRA r=32 on every linear: 83.9M adapter parameters (PEFT's count for this shape).
        let lora = LoraConfig { r: 32, ..Default::default() };
        let l = estimate(&c, &spec(Trained::Lora(&lora), None));
        assert_eq!(l.trained_params, 83_886_080);
        // QLoRA: the decoder linears at 4 bits + a scale per 64, embedding and head in bf16.
        let q = estimate(&c, &spec(Trained::Lora(&lora), Some(4)));
        let linear: u64 = weights(&c).iter().filter(|t| t.2).map(|t| t.1).sum();
        assert_eq!(l.weights - q.weights, linear * 2 - (linear / 2 + linear / 64 * 4));
        // Double-quantized scales: 8 bits each and one f32 per 256 of them, 0.33 GB less here.
        let dq = estimate(&c, &MemorySpec { double_quant: true, ..spec(Trained::Lora(&lora), Some(4)) });
        assert_eq!(q.weights - dq.weights, linear / 64 * 3 - linear / (64 * 256) * 4);
        assert!(q.total() < 24 << 30, "QLoRA 8B at 2×4096 with checkpointing: {}", gib(q.total()));
        // Checkpointing keeps one layer input per layer instead of every layer's activations.
        let plain = estimate(&c, &MemorySpec { gradient_checkpointing: false, ..spec(Trained::Lora(&lora), None) });
        assert!(plain.activations > 5 * l.activations, "{} vs {}", gib(plain.activations), gib(l.activations));
    }

    fn config(json: &str) -> ModelConfig {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), json).unwrap();
        ModelConfig::from_dir(dir.path()).unwrap()
    }

    /// The rows of bench/results/gpu_8b.md measured in newt's pool layout (LoRA r 32 on every
    /// linear, every row a full sequence): the CUDA estimate against each run's whole-process
    /// nvidia-smi peak. [`MemoryEstimate::runtime`]'s factor was fitted to runs in an earlier
    /// layout (the first three rows, and the 8B 2×4096 row of the same runs); every row after
    /// them was measured after the fit (H100, `bench/gpu_8b_all.sh` and `bench/gpu_8b.sh`) and is
    /// held out.
    #[test]
    fn the_cuda_estimate_is_within_15_percent_of_the_measured_peaks() {
        let llama = |h: u32, i: u32, layers: u32, heads: u32, tied: bool| {
            config(&format!(
                r#"{{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": {h},
                "intermediate_size": {i}, "num_hidden_layers": {layers}, "num_attention_heads": {heads},
                "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                "max_position_embeddings": 131072, "tie_word_embeddings": {tied}}}"#
            ))
        };
        let b8 = llama_8b();
        let b1 = llama(2048, 8192, 16, 32, true);
        let smol = config(
            r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
            "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "vocab_size": 49152, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
            "max_position_embeddings": 8192, "tie_word_embeddings": true}"#,
        );
        let lora = LoraConfig { r: 32, ..Default::default() };
        // (model, NF4 base, rows, sequence, checkpointing, measured GiB)
        let rows = [
            // The runtime factor was fitted to these (H100, runs/pools_flash_h100_2026-12-06 and
            // runs/final_h100_2026-12-06), measured before the bf16 loss kernel and the 512 MB
            // pages, which lowered every 8B peak measured since (not rerun).
            (&b1, false, 4, 2048, false, 19.71),
            (&b8, false, 2, 2048, false, 47.27),
            (&b8, false, 3, 2048, false, 57.40),
            // With the bf16 loss kernel and newt's pages of 512 MB (H100, runs/h100_2026-12-07c/
            // pools): 22,741, 12,117, 22,741 and 68,567 MiB.
            (&b8, false, 2, 4096, true, 22.21),
            (&b8, true, 2, 4096, true, 11.83),
            (&b8, false, 4, 2048, true, 22.21),
            (&b8, false, 4, 2048, false, 66.96),
            // With the bf16 loss kernel, in the pages of 2 GB before (same run): 7,385 MiB; in
            // the pages of 512 MB 7,381 (runs/h100_2026-12-07e/small).
            (&smol, false, 4, 2048, false, 7.21),
            // The 1B in the pages of 512 MB (same run): 17,621 MiB.
            (&b1, false, 4, 2048, false, 17.21),
        ];
        for (c, nf4, rows, seq, ckpt, measured) in rows {
            let spec = MemorySpec {
                quantized_bits: nf4.then_some(4),
                double_quant: nf4,
                micro_batch_size: rows,
                sequence_len: seq,
                gradient_checkpointing: ckpt,
                loss_chunk_tokens: crate::llama::default_chunk_tokens(c.vocab_size) as u64,
                cuda: true,
                ..spec(Trained::Lora(&lora), None)
            };
            let e = estimate(c, &spec);
            let got = e.total() as f64 / (1u64 << 30) as f64;
            assert!(
                (got / measured - 1.0).abs() < 0.15,
                "{} layers, {rows}×{seq}, checkpointing {ckpt}, NF4 {nf4}: estimate {got:.1} GiB, measured {measured} GiB",
                c.num_hidden_layers
            );
            // On the CPU there is no runtime share.
            assert_eq!(estimate(c, &MemorySpec { cuda: false, ..spec }).runtime, 0);
        }
    }

    /// The loss's gradient is held in f32 only when the head's weight trains (`chunk × vocab × 2`
    /// bytes more): `lm_head` saved, or `embed_tokens` saved on a model whose head is the
    /// embedding; an untied model's saved embedding leaves the head frozen.
    #[test]
    fn the_loss_gradient_is_f32_only_when_the_head_trains() {
        let activations = |c: &ModelConfig, saved: &[&str]| {
            let lora = LoraConfig {
                r: 32,
                modules_to_save: saved.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            };
            estimate(c, &spec(Trained::Lora(&lora), None)).activations
        };
        let (untied, tied) = (
            llama_8b(),
            config(&LLAMA_8B.replace(r#""tie_word_embeddings": false"#, r#""tie_word_embeddings": true"#)),
        );
        let f32_part = 1024 * 128_256 * 2;
        for c in [&untied, &tied] {
            assert_eq!(activations(c, &["lm_head"]), activations(c, &[]) + f32_part);
        }
        assert_eq!(activations(&untied, &["embed_tokens"]), activations(&untied, &[]));
        assert_eq!(activations(&tied, &["embed_tokens"]), activations(&tied, &[]) + f32_part);
    }

    #[test]
    fn unfrozen_parameters_count_only_what_they_name() {
        let c = llama_8b();
        let u = Unfrozen::parse(&["^lm_head.weight$".into()]).unwrap();
        let e = estimate(&c, &spec(Trained::Full(Some(&u)), None));
        assert_eq!(e.trained_params, 128_256 * 4096);
    }
}
