//! Optimizer, clipping, schedule and step-plan behaviour of the training loop, against goldens
//! from `scripts/train_adamw_golden.py` and `scripts/train_schedule_golden.py`.

mod train_support;

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use newt_model::train::{AdamW, LrSchedule, ParamGrads, TrainConfig, decays};
use serde_json::Value;
use train_support::{Ad, flat, max_abs_diff};

fn golden(name: &str) -> Value {
    let path = format!("{}/tests/train_fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[derive(Module, Debug)]
struct Layer<B: Backend> {
    weight: Param<Tensor<B, 2>>,
    bias: Param<Tensor<B, 1>>,
}

#[derive(Module, Debug)]
struct Net<B: Backend> {
    layer: Layer<B>,
}

#[test]
fn adamw_matches_torch_formula() {
    adamw_golden(false);
}

/// The trainer creates the moments before the first step (so that step runs the same
/// operations as every later one); the updates must not change.
#[test]
fn adamw_with_moments_prepared_before_the_first_step_matches_torch_formula() {
    adamw_golden(true);
}

fn adamw_golden(prepare: bool) {
    let g = golden("adamw_golden.json");
    let dev = Default::default();
    let init = &g["init"];
    let mut net = Net::<Ad> {
        layer: Layer {
            weight: Param::from_tensor(Tensor::from_data(TensorData::new(floats(&init["layer.weight"]), [3, 4]), &dev)),
            bias: Param::from_tensor(Tensor::from_data(TensorData::new(floats(&init["layer.bias"]), [4]), &dev)),
        },
    };
    let cfg = TrainConfig {
        weight_decay: g["weight_decay"].as_f64().unwrap(),
        adam_beta1: g["beta1"].as_f64().unwrap(),
        adam_beta2: g["beta2"].as_f64().unwrap(),
        adam_epsilon: g["eps"].as_f64().unwrap(),
        ..Default::default()
    };
    let max_norm = g["max_grad_norm"].as_f64().unwrap();
    let mut opt = AdamW::new(cfg.adamw());
    if prepare {
        assert_eq!(opt.prepare::<Ad, _>(&net, &dev), 2, "one moment pair per trainable parameter");
        assert_eq!(opt.prepare::<Ad, _>(&net, &dev), 0, "prepared state is kept");
        assert_eq!(opt.paths().collect::<Vec<_>>(), ["layer.bias", "layer.weight"]);
    }
    let mut clipped_any = (false, false);
    for (i, step) in g["steps"].as_array().unwrap().iter().enumerate() {
        let mut grads = ParamGrads::default();
        for path in ["layer.weight", "layer.bias"] {
            let v = floats(&step["grads"][path]);
            let n = v.len();
            grads.insert(path, Tensor::from_data(TensorData::new(v, [n]), &dev));
        }
        let norm = grads.clip_global_norm(max_norm);
        let want_norm = step["grad_norm"].as_f64().unwrap();
        assert!((norm - want_norm).abs() < 1e-5 * want_norm, "step {i}: norm {norm} vs {want_norm}");
        if step["clipped"].as_bool().unwrap() {
            clipped_any.0 = true;
        } else {
            clipped_any.1 = true;
        }
        net = opt.step::<Ad, _>(net, grads, step["lr"].as_f64().unwrap());
        let w = flat(net.layer.weight.val());
        let b = flat(net.layer.bias.val());
        let dw = max_abs_diff(&w, &floats(&step["params_after"]["layer.weight"]));
        let db = max_abs_diff(&b, &floats(&step["params_after"]["layer.bias"]));
        assert!(dw < 2e-6 && db < 2e-6, "step {}: weight diff {dw}, bias diff {db}", i + 1);
    }
    assert_eq!(clipped_any, (true, true), "goldens must cover clipped and unclipped steps");
}

/// The update runs over one flat vector of all parameters; a step in which one parameter has no
/// gradient must leave that parameter and its moments alone (as torch skips a `None` grad), and
/// the parameter must pick up its moments again at the next step it has a gradient.
#[test]
fn a_parameter_without_a_gradient_keeps_its_value_and_moments() {
    let dev = Default::default();
    let mut net = Net::<Ad> {
        layer: Layer {
            weight: Param::from_tensor(Tensor::from_data(TensorData::new(vec![0.5f32; 12], [3, 4]), &dev)),
            bias: Param::from_tensor(Tensor::from_data(TensorData::new(vec![0.25f32; 4], [4]), &dev)),
        },
    };
    let grad = |v: f32, n: usize| Tensor::from_data(TensorData::new(vec![v; n], [n]), &dev);
    let mut opt = AdamW::new(TrainConfig::default().adamw());
    let mut both = ParamGrads::default();
    both.insert("layer.weight", grad(0.1, 12));
    both.insert("layer.bias", grad(-0.2, 4));
    net = opt.step::<Ad, _>(net, both, 0.01);
    let after_first = opt.export();
    let bias_after_first = flat(net.layer.bias.val());
    assert!(bias_after_first.iter().all(|b| *b > 0.25), "the bias moved against its negative gradient");

    let mut weight_only = ParamGrads::default();
    weight_only.insert("layer.weight", grad(0.1, 12));
    net = opt.step::<Ad, _>(net, weight_only, 0.01);
    let after_second = opt.export();
    assert_eq!(flat(net.layer.bias.val()), bias_after_first, "no gradient: the bias must not move");
    assert_eq!(after_second["layer.bias"], after_first["layer.bias"], "its moments must be kept as they were");
    assert_eq!(after_second["layer.weight"].step, 2);
    assert_ne!(after_second["layer.weight"].exp_avg, after_first["layer.weight"].exp_avg);

    // Back in the flat state with its moments: its second update is AdamW's second step (moments
    // 0.1·g then 0.19·g; bias-corrected m/√v is then exactly sign(g)).
    let mut both = ParamGrads::default();
    both.insert("layer.weight", grad(0.1, 12));
    both.insert("layer.bias", grad(-0.2, 4));
    net = opt.step::<Ad, _>(net, both, 0.01);
    let m = &opt.export()["layer.bias"];
    assert!((m.exp_avg[0] - (-0.2 * 0.1 * 0.9 - 0.2 * 0.1)).abs() < 1e-6, "first moment {}", m.exp_avg[0]);
    let moved = flat(net.layer.bias.val())[0] - bias_after_first[0];
    assert!(moved > 0.0099 && moved < 0.0101, "the bias moved {moved}, not lr·sign(-g) (weight decay aside)");
}

#[test]
fn global_norm_clipping_scales_all_params_together() {
    let dev = Default::default();
    let t = |v: Vec<f32>| {
        let n = v.len();
        Tensor::<burn::backend::Flex, 1>::from_data(TensorData::new(v, [n]), &dev)
    };
    // Norm over both = sqrt(3² + 4² + 12²) = 13; per-parameter clipping would give 1 and 1.
    let mut grads = ParamGrads::default();
    grads.insert("a", t(vec![3.0, 4.0]));
    grads.insert("b", t(vec![12.0]));
    let before = grads.clip_global_norm(1.0);
    assert!((before - 13.0).abs() < 1e-5);
    let coef = 1.0 / (13.0 + 1e-6);
    let a = flat(grads.get("a").unwrap().clone());
    let b = flat(grads.get("b").unwrap().clone());
    assert!(max_abs_diff(&a, &[3.0 * coef as f32, 4.0 * coef as f32]) < 1e-7);
    assert!(max_abs_diff(&b, &[12.0 * coef as f32]) < 1e-7);
    assert!((grads.global_norm() - 1.0).abs() < 1e-5);

    // Below the threshold nothing changes; max_norm 0 only measures.
    let mut small = ParamGrads::default();
    small.insert("a", t(vec![0.3, 0.4]));
    assert!((small.clip_global_norm(1.0) - 0.5).abs() < 1e-6);
    assert_eq!(flat(small.get("a").unwrap().clone()), vec![0.3, 0.4]);
    let mut off = ParamGrads::default();
    off.insert("a", t(vec![30.0, 40.0]));
    assert!((off.clip_global_norm(0.0) - 50.0).abs() < 1e-4);
    assert_eq!(flat(off.get("a").unwrap().clone()), vec![30.0, 40.0]);
}

/// The gradient norm's sum of squares in two stages (rows of SUM_ROW, then their sums) counts every
/// value once at every length: shorter than a row, whole rows, whole rows and a remainder. The
/// values' squares are small integers, so each sum is exact in f32 in any order.
#[test]
fn sum_squares_counts_every_value_once() {
    use newt_model::grads::{SUM_ROW, sum_squares};
    let dev = Default::default();
    for n in [1, 7, SUM_ROW - 1, SUM_ROW, 2 * SUM_ROW - 1, 2 * SUM_ROW, 2 * SUM_ROW + 5, 4 * SUM_ROW - 1] {
        let v: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
        let want: f64 = v.iter().map(|x| (*x as f64) * (*x as f64)).sum();
        let x = Tensor::<burn::backend::Flex, 1>::from_data(TensorData::new(v, [n]), &dev);
        let got = flat(sum_squares(x));
        assert_eq!(got.len(), 1, "n = {n}");
        assert_eq!(got[0] as f64, want, "n = {n}");
    }
}

#[test]
fn schedules_match_hf_formulas() {
    let g = golden("schedule_golden.json");
    let base = g["base_lr"].as_f64().unwrap();
    let cases = g["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let total = case["total"].as_u64().unwrap() as usize;
        let warmup = case["warmup"].as_u64().unwrap() as usize;
        let min_ratio = case["min_lr_ratio"].as_f64();
        let s = LrSchedule::from_name(name, base, warmup, total, min_ratio).unwrap();
        for (step, want) in case["lrs"].as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got = s.lr(step);
            assert!(
                (got - want).abs() <= 1e-12 + 1e-9 * want.abs(),
                "{name} warmup {warmup} total {total} min {min_ratio:?} step {step}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn plan_follows_axolotl_step_math() {
    let cfg =
        TrainConfig { micro_batch_size: 4, gradient_accumulation_steps: 2, num_epochs: 2.0, ..Default::default() };
    // 101 rows → 26 micro-batches (the last holds 1 row) → 13 steps per epoch.
    let p = cfg.plan(101).unwrap();
    assert_eq!((p.micro_batches_per_epoch, p.steps_per_epoch, p.total_steps), (26, 13, 26));
    // Default warmup: min(floor(0.03 · 26), 100) = 0; default save/eval: once per epoch.
    assert_eq!((p.warmup_steps, p.save_every, p.eval_every), (0, 13, 13));

    let ratio =
        TrainConfig { warmup_ratio: Some(0.1), saves_per_epoch: Some(2), evals_per_epoch: Some(4), ..cfg.clone() };
    let p = ratio.plan(101).unwrap();
    // floor(0.1 · 26) = 2; save ratio 1/(2·2) → ceil(26/4) = 7; eval 1/(4·2) → ceil(26/8) = 4.
    assert_eq!((p.warmup_steps, p.save_every, p.eval_every), (2, 7, 4));

    // A warmup of 1 becomes 2 (Axolotl); max_steps wins over epochs; explicit steps win.
    let one = TrainConfig { warmup_steps: Some(1), max_steps: Some(5), save_steps: Some(3), ..cfg.clone() };
    let p = one.plan(101).unwrap();
    assert_eq!((p.warmup_steps, p.total_steps, p.save_every), (2, 5, 3));

    let half = TrainConfig { num_epochs: 0.5, ..cfg.clone() };
    assert_eq!(half.plan(101).unwrap().total_steps, 7); // ceil(0.5 · 13)
    assert!(cfg.plan(0).is_err());
}

#[test]
fn optimizer_names_map_to_adamw_or_fail_listing_accepted() {
    let ok = TrainConfig { optimizer: "adamw_torch_fused".into(), ..Default::default() };
    assert!(ok.validate().unwrap().is_empty());
    let paged = TrainConfig { optimizer: "paged_adamw_8bit".into(), ..Default::default() };
    let w = paged.validate().unwrap();
    assert!(w.len() == 1 && w[0].contains("not honoured"), "{w:?}");
    let bad = TrainConfig { optimizer: "lion".into(), ..Default::default() };
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("lion") && e.contains("adamw_torch") && e.contains("paged_adamw_32bit"), "{e}");
    let sched = TrainConfig { lr_scheduler: "polynomial".into(), ..Default::default() };
    assert!(sched.validate().unwrap_err().to_string().contains("cosine"));
}

#[test]
fn weight_decay_skips_biases_and_norms_like_hf() {
    assert!(decays("layers.0.self_attn.q_proj.lora_A.weight"));
    assert!(decays("lm_head.weight"));
    assert!(!decays("layers.0.self_attn.q_proj.bias"));
    assert!(!decays("layers.0.input_layernorm.weight"));
    assert!(!decays("norm.weight"));
    assert!(!decays("layers.3.q_norm.weight"));
}
