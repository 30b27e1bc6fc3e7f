//! A quantized base loaded three ways — quantized on the device after loading (the old path),
//! quantized on the host as each weight is read, and read back from the `quantize` stage's
//! artifact — holds the same codes and computes the same logits; double quantization changes
//! the scales by at most one 8-bit step and the logits little.

mod model_support;

use burn::tensor::DType;
use model_support::*;
use newt_kernels::nf4::QuantCode;
use newt_model::llama::{Linears, Llama, LoadError};
use newt_model::lora::Nf4Weight;
use newt_model::quantized::{self, META_FILE, QuantizedBase};

fn nf4s(model: &Llama<B>) -> Vec<(String, &Nf4Weight<B>)> {
    let mut out = Vec::new();
    for (i, l) in model.layers.iter().enumerate() {
        let a = &l.self_attn;
        let m = &l.mlp;
        for (name, lin) in [
            ("q", &a.q_proj),
            ("k", &a.k_proj),
            ("v", &a.v_proj),
            ("o", &a.o_proj),
            ("gate", &m.gate_proj),
            ("up", &m.up_proj),
            ("down", &m.down_proj),
        ] {
            out.push((format!("{i}.{name}"), lin.nf4.as_ref().expect("a quantized linear")));
        }
    }
    out
}

fn ints(t: burn::tensor::Tensor<B, 1, burn::tensor::Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().into_vec().unwrap()
}

/// The same codes and scales, tensor for tensor.
fn assert_same_codes(a: &Llama<B>, b: &Llama<B>) {
    let (qa, qb) = (nf4s(a), nf4s(b));
    assert_eq!(qa.len(), qb.len());
    for ((name, x), (_, y)) in qa.iter().zip(&qb) {
        assert_eq!(ints(x.packed.val()), ints(y.packed.val()), "{name}: codes");
        assert_eq!(floats(x.absmax.val()), floats(y.absmax.val()), "{name}: scales");
        assert_eq!(x.absmax_codes.as_ref().map(|c| ints(c.val())), y.absmax_codes.as_ref().map(|c| ints(c.val())));
        assert_eq!(x.absmax_offset, y.absmax_offset, "{name}: offset");
    }
}

fn ids() -> Vec<i64> {
    (0..24).map(|i| (i * 37 % 400) as i64).collect()
}

#[test]
fn quantizing_as_each_weight_is_read_equals_quantizing_after_loading() {
    let dir = tiny_model_dir(7);
    let device = Default::default();
    for code in [QuantCode::Nf4, QuantCode::Int8] {
        let after = load::<B>(dir.path()).quantize_base(code);
        let streamed = Llama::<B>::from_hf_dir_with(dir.path(), Linears::Quantize(code, false), &device).unwrap();
        assert_same_codes(&after, &streamed);
        assert_eq!(logits(&after, &ids(), 2), logits(&streamed, &ids(), 2), "{code:?}");
        // Nothing full-precision is left in a quantized linear.
        assert_eq!(streamed.layers[0].mlp.up_proj.weight.dims(), [1, 1]);
    }
}

#[test]
fn a_written_base_loads_the_codes_it_was_quantized_to() {
    let dir = tiny_model_dir(8);
    let device = Default::default();
    for (code, dq) in [(QuantCode::Nf4, true), (QuantCode::Nf4, false), (QuantCode::Int8, false)] {
        let out = tempfile::tempdir().unwrap();
        let mut calls = Vec::new();
        let s = quantized::write(dir.path(), out.path(), code, dq, |done, total| calls.push((done, total))).unwrap();
        let config = newt_model::config::ModelConfig::from_dir(dir.path()).unwrap();
        assert_eq!(s.weights, 7 * config.num_hidden_layers);
        assert_eq!(calls.last(), Some(&(s.weights, s.weights)));
        let base = QuantizedBase::open(out.path()).unwrap();
        assert_eq!((base.code(), base.meta().double_quant), (code, dq));
        let stored = Llama::<B>::from_hf_dir_with(dir.path(), Linears::Stored(&base), &device).unwrap();
        let streamed = Llama::<B>::from_hf_dir_with(dir.path(), Linears::Quantize(code, dq), &device).unwrap();
        assert_same_codes(&stored, &streamed);
        assert_eq!(logits(&stored, &ids(), 2), logits(&streamed, &ids(), 2), "{code:?} dq {dq}");
        assert_eq!(nf4s(&stored)[0].1.absmax_codes.is_some(), dq);
    }
}

#[test]
fn double_quantization_moves_each_scale_by_at_most_one_step_and_the_logits_little() {
    let dir = tiny_model_dir(9);
    let device = Default::default();
    let single = Llama::<B>::from_hf_dir_with(dir.path(), Linears::Quantize(QuantCode::Nf4, false), &device).unwrap();
    let double = Llama::<B>::from_hf_dir_with(dir.path(), Linears::Quantize(QuantCode::Nf4, true), &device).unwrap();
    for ((name, s), (_, d)) in nf4s(&single).iter().zip(&nf4s(&double)) {
        assert_eq!(ints(s.packed.val()), ints(d.packed.val()), "{name}: the weights' codes are the same");
        let (a, b) = (floats(s.scales()), floats(d.scales()));
        let range = a.iter().fold(0f32, |m, v| m.max((v - d.absmax_offset).abs()));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= range / 254.0 + 1e-6, "{name}: scale {x} came back as {y}");
        }
        // 8 bits a scale (four to an i32) instead of 32.
        assert_eq!(d.absmax_codes.as_ref().unwrap().val().dims()[0] * 4, a.len().next_multiple_of(256));
    }
    let (ls, ld) = (logits(&single, &ids(), 2), logits(&double, &ids(), 2));
    let diff = rel_diff(&ld, &ls);
    assert!(diff > 0.0 && diff < 2e-2, "double quantization: logits moved by {diff}");
    // The dequantized weight is what the scales say.
    let w = floats(nf4s(&double)[0].1.dequantize(DType::F32));
    assert_eq!(w.len(), nf4s(&double)[0].1.out_features * nf4s(&double)[0].1.in_features);
}

#[test]
fn a_damaged_artifact_is_refused_with_its_folder_and_tensor_named() {
    let dir = tiny_model_dir(10);
    let out = tempfile::tempdir().unwrap();
    quantized::write(dir.path(), out.path(), QuantCode::Nf4, true, |_, _| {}).unwrap();
    let device = Default::default();
    // A description of another format.
    let meta = out.path().join(META_FILE);
    let good = std::fs::read_to_string(&meta).unwrap();
    std::fs::write(&meta, good.replace("\"block\": 64", "\"block\": 32")).unwrap();
    let e = QuantizedBase::open(out.path()).unwrap_err();
    assert!(matches!(e, LoadError::Quantized { .. }) && e.to_string().contains("blocks of 32"), "{e}");
    // A description that lists weights it does not have: the missing tensor is named.
    std::fs::write(&meta, &good).unwrap();
    let base = QuantizedBase::open(out.path()).unwrap();
    let e = base.weight("model.layers.99.mlp.up_proj.weight", [4, 4]).unwrap_err();
    assert!(e.to_string().contains("model.layers.99.mlp.up_proj.weight.codes"), "{e}");
    // A weight of another shape than the model's.
    let e = base.weight("model.layers.0.mlp.up_proj.weight", [3, 64]).unwrap_err();
    assert!(matches!(e, LoadError::Shape { .. }), "{e}");
    let _ = Llama::<B>::from_hf_dir_with(dir.path(), Linears::Stored(&base), &device).unwrap();
}
