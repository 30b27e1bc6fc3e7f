//! The training loop end to end on a tiny CPU model: accumulation, loss going down,
//! kill-and-resume, checkpoints, out-of-memory errors, Parquet input and metrics output.

mod train_support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use newt_model::train::{
    self, CausalLoss, MetricsRecord, NoHooks, StepReport, TrainConfig, TrainData, TrainError, TrainHooks, TrainRun,
    eval_loss, step_gradients, trainable_params,
};
use train_support::{Ad, Dev, TinyLm, corpus, flat, max_abs_diff};

/// The backend RNG (dropout) is process-global and the loop reseeds it every step, so tests
/// that train must not overlap.
static TRAINING: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    TRAINING.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

const VOCAB: usize = 16;
const D: usize = 8;

fn model(dropout: f64) -> TinyLm<Ad> {
    TinyLm::new(VOCAB, D, 7, dropout, &Dev::default())
}

fn data(rows: usize) -> TrainData {
    TrainData::from_rows(corpus(rows, VOCAB, 11)).unwrap()
}

#[test]
fn accumulation_equals_big_batch() {
    let _serial = serial();
    let (m, d, dev) = (model(0.0), data(4), Dev::default());
    // Rows have different lengths and token counts, so a mean of per-micro-batch means would
    // differ from the token-weighted loss HF computes.
    let small = step_gradients::<Ad, _>(&m, &d, &[vec![0, 1], vec![2, 3]], &dev);
    let big = step_gradients::<Ad, _>(&m, &d, &[vec![0, 1, 2, 3]], &dev);
    assert_eq!(small.trained_tokens, big.trained_tokens);
    assert!((small.loss() - big.loss()).abs() < 1e-6, "{} vs {}", small.loss(), big.loss());
    let paths: Vec<&str> = big.grads.paths().collect();
    assert_eq!(paths, ["head", "hidden.bias", "hidden.weight"]);
    for p in paths {
        let a = flat(small.grads.get(p).unwrap().clone());
        let b = flat(big.grads.get(p).unwrap().clone());
        assert!(max_abs_diff(&a, &b) < 1e-6, "{p}");
    }
    let per_batch: Vec<f64> = [vec![0, 1], vec![2, 3]]
        .iter()
        .map(|mb| step_gradients::<Ad, _>(&m, &d, std::slice::from_ref(mb), &dev).loss())
        .collect();
    let mean_of_means = (per_batch[0] + per_batch[1]) / 2.0;
    assert!((mean_of_means - big.loss()).abs() > 1e-4, "corpus too uniform to tell them apart");

    // Through the loop: 2 × 2 and 1 × 4 take the same first step.
    let cfg = |mbs, gas| TrainConfig {
        micro_batch_size: mbs,
        gradient_accumulation_steps: gas,
        max_steps: Some(1),
        learning_rate: 1e-2,
        shuffle: false,
        warmup_steps: Some(0),
        ..Default::default()
    };
    let run = |c: TrainConfig| {
        let dir = tempfile::tempdir().unwrap();
        let mut hooks = Record::default();
        let (m, _) = train::train(model(0.0), &d, &c, &TrainRun::new(dir.path()), &mut hooks, &dev).unwrap();
        (trainable_params(&m), hooks.steps[0].clone())
    };
    let (pa, ra) = run(cfg(2, 2));
    let (pb, rb) = run(cfg(4, 1));
    assert!((ra.loss - rb.loss).abs() < 1e-6 && (ra.grad_norm - rb.grad_norm).abs() < 1e-6);
    for (k, v) in &pa {
        assert!(max_abs_diff(&v.values, &pb[k].values) < 1e-6, "{k}");
    }
}

#[derive(Default)]
struct Record {
    steps: Vec<StepReport>,
    evals: Vec<f64>,
    eval_data: Option<TrainData>,
    cancel_after: Option<usize>,
    /// Panics after this step: a process killed without warning (no checkpoint at the stop).
    kill_after: Option<usize>,
    checkpoints: Vec<usize>,
}

impl TrainHooks<TinyLm<Ad>> for Record {
    fn on_step(&mut self, r: &StepReport) {
        self.steps.push(r.clone());
        if self.kill_after.is_some_and(|n| r.step >= n) {
            panic!("killed after step {}", r.step);
        }
    }
    fn evaluate(&mut self, model: &TinyLm<Ad>, _step: usize) -> Option<f64> {
        let d = self.eval_data.as_ref()?;
        let inner = burn::module::AutodiffModule::valid(model);
        let l = eval_loss(&inner, d, 4, &Dev::default());
        self.evals.push(l);
        Some(l)
    }
    fn on_checkpoint(&mut self, step: usize, _dir: &Path) {
        self.checkpoints.push(step);
    }
    fn cancelled(&self) -> bool {
        self.cancel_after.is_some_and(|n| self.steps.last().is_some_and(|s| s.step >= n))
    }
}

#[test]
fn loss_decreases_on_tiny_model() {
    let _serial = serial();
    let cfg = TrainConfig {
        micro_batch_size: 4,
        gradient_accumulation_steps: 1,
        num_epochs: 6.0,
        learning_rate: 3e-2,
        lr_scheduler: "cosine".into(),
        warmup_steps: Some(2),
        evals_per_epoch: Some(1),
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut hooks = Record { eval_data: Some(data(8)), ..Default::default() };
    let (_, summary) =
        train::train(model(0.0), &data(32), &cfg, &TrainRun::new(dir.path()), &mut hooks, &Dev::default()).unwrap();
    assert_eq!(hooks.steps.len(), 48);
    let first: f64 = hooks.steps[..4].iter().map(|s| s.loss).sum::<f64>() / 4.0;
    let last: f64 = hooks.steps[44..].iter().map(|s| s.loss).sum::<f64>() / 4.0;
    assert!(last < 0.5 * first, "train loss {first:.3} → {last:.3}");
    assert_eq!(hooks.evals.len(), 6);
    assert!(hooks.evals[5] < 0.6 * hooks.evals[0], "eval loss {:?}", hooks.evals);
    assert_eq!(summary.eval_loss, Some(hooks.evals[5]));
    // Warmup: step 1 runs at lr 0, as under HF Trainer.
    assert_eq!(hooks.steps[0].lr, 0.0);
}

fn resume_cfg() -> TrainConfig {
    TrainConfig {
        micro_batch_size: 2,
        gradient_accumulation_steps: 2,
        num_epochs: 2.0, // 24 rows → 12 micro-batches → 6 steps per epoch, 12 in all
        learning_rate: 2e-2,
        weight_decay: 0.01,
        warmup_steps: Some(2),
        save_steps: Some(3),
        ..Default::default()
    }
}

#[test]
fn kill_and_resume_matches_uninterrupted() {
    let _serial = serial();
    let (d, dev, cfg) = (data(24), Dev::default(), resume_cfg());
    // Dropout on: the backend RNG must also continue where it was.
    let dir_a = tempfile::tempdir().unwrap();
    let mut ha = Record::default();
    let (a, _) = train::train(model(0.1), &d, &cfg, &TrainRun::new(dir_a.path()), &mut ha, &dev).unwrap();
    assert_eq!(ha.steps.len(), 12);

    let dir_b = tempfile::tempdir().unwrap();
    let metrics = dir_b.path().join("out/metrics.jsonl");
    let run_b = TrainRun { metrics_jsonl: Some(metrics.clone()), ..TrainRun::new(dir_b.path().join("ckpt")) };
    let mut killed = Record { kill_after: Some(5), ..Default::default() };
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        train::train(model(0.1), &d, &cfg, &run_b, &mut killed, &dev).map(|_| ())
    }));
    assert!(caught.is_err(), "the kill happened");
    // The killed attempt's metrics (steps 1-5) are gone with its output directory: a stage
    // writes into a fresh temp dir each attempt, so history must come from the checkpoint.
    std::fs::remove_file(&metrics).unwrap();

    let mut resumed = Record::default();
    let (b, summary) = train::train(model(0.1), &d, &cfg, &run_b, &mut resumed, &dev).unwrap();
    assert_eq!(summary.resumed_from, Some(3));
    assert_eq!(resumed.steps.first().map(|s| s.step), Some(4), "resumes after the checkpoint, not at 0");
    assert_eq!(resumed.steps.len(), 9);

    let (pa, pb) = (trainable_params(&a), trainable_params(&b));
    assert_eq!(pa.keys().collect::<Vec<_>>(), pb.keys().collect::<Vec<_>>());
    for (k, v) in &pa {
        let diff = max_abs_diff(&v.values, &pb[k].values);
        assert!(diff < 1e-6, "{k}: {diff}");
    }
    for (x, y) in ha.steps.iter().skip(3).zip(&resumed.steps) {
        assert!((x.loss - y.loss).abs() < 1e-6 && x.lr == y.lr, "step {}: {x:?} vs {y:?}", x.step);
    }
    // The JSONL has each step once, in order: 1-3 from the checkpoint, 4-12 from the resumed run.
    let steps: Vec<usize> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| match serde_json::from_str::<MetricsRecord>(l).unwrap() {
            MetricsRecord::Train(r) => r.step,
            MetricsRecord::Eval(r) => r.step,
        })
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());
}

#[test]
fn a_stop_asked_for_saves_a_checkpoint_there_and_resume_matches_uninterrupted() {
    let _serial = serial();
    let (d, dev, cfg) = (data(24), Dev::default(), resume_cfg());
    let dir_a = tempfile::tempdir().unwrap();
    let (a, _) =
        train::train(model(0.1), &d, &cfg, &TrainRun::new(dir_a.path()), &mut Record::default(), &dev).unwrap();

    let dir_b = tempfile::tempdir().unwrap();
    let run_b = TrainRun::new(dir_b.path());
    // Step 5 is between the periodic checkpoints (every 3): the stop writes its own.
    let mut stopped = Record { cancel_after: Some(5), ..Default::default() };
    let err = train::train(model(0.1), &d, &cfg, &run_b, &mut stopped, &dev).unwrap_err();
    assert!(matches!(err, TrainError::Cancelled { step: 5, checkpoint: Some(5) }), "{err}");
    assert_eq!(stopped.checkpoints, vec![3, 5]);
    assert!(err.to_string().contains("checkpoint at step 5") && !err.to_string().contains("Some("), "{err}");

    let mut resumed = Record::default();
    let (b, summary) = train::train(model(0.1), &d, &cfg, &run_b, &mut resumed, &dev).unwrap();
    assert_eq!(summary.resumed_from, Some(5));
    assert_eq!(resumed.steps.first().map(|s| s.step), Some(6));
    let (pa, pb) = (trainable_params(&a), trainable_params(&b));
    for (k, v) in &pa {
        let diff = max_abs_diff(&v.values, &pb[k].values);
        assert!(diff < 1e-6, "{k}: {diff}");
    }
}

#[test]
fn checkpoints_are_atomic_and_only_the_newest_are_kept() {
    let _serial = serial();
    let (d, dev) = (data(24), Dev::default());
    let cfg = TrainConfig { save_steps: Some(2), ..resume_cfg() };
    let dir = tempfile::tempdir().unwrap();
    // A writer killed mid-checkpoint and a directory without state.json are not checkpoints.
    std::fs::create_dir_all(dir.path().join(".tmp-checkpoint-9-1")).unwrap();
    std::fs::create_dir_all(dir.path().join("checkpoint-11")).unwrap();
    let mut hooks = Record::default();
    train::train(model(0.0), &d, &cfg, &TrainRun::new(dir.path()), &mut hooks, &dev).unwrap();
    assert_eq!(hooks.checkpoints, [2, 4, 6, 8, 10, 12]);
    let kept: Vec<usize> = train::checkpoint::list(dir.path()).unwrap().into_iter().map(|c| c.0).collect();
    let mut kept = kept;
    kept.sort();
    assert_eq!(kept, [10, 12]);
    assert!(!dir.path().join(".tmp-checkpoint-9-1").exists());
    let ck = train::checkpoint::load(&dir.path().join("checkpoint-12")).unwrap();
    assert_eq!((ck.state.step, ck.state.epoch, ck.state.micro_batch), (12, 2, 0));
    assert_eq!(ck.optimizer["head"].step, 12);
    assert_eq!(ck.params.len(), 3, "only trainable params; the frozen embedding is not saved");

    // A finished run resumed again does no steps and returns the checkpointed weights.
    let mut again = Record::default();
    let (m, s) = train::train(model(0.0), &d, &cfg, &TrainRun::new(dir.path()), &mut again, &dev).unwrap();
    assert!(again.steps.is_empty() && s.resumed_from == Some(12));
    assert_eq!(trainable_params(&m)["head"].values, ck.params["head"].values);
}

#[test]
fn out_of_memory_panic_becomes_typed_error_with_cheapest_fix_first() {
    let _serial = serial();
    let mut m = model(0.0);
    m.panic_with = "called `Result::unwrap()` on an `Err` value: BufferTooBig { size: 1 }".into();
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig { micro_batch_size: 4, ..Default::default() };
    let err = train::train(m, &data(8), &cfg, &TrainRun::new(dir.path()), &mut NoHooks, &Dev::default()).unwrap_err();
    let TrainError::OutOfMemory { step, hint } = &err else { panic!("{err}") };
    assert_eq!(*step, 1);
    let at = |s: &str| hint.find(s).unwrap_or_else(|| panic!("{s} missing in {hint}"));
    assert!(at("micro_batch_size: 2") < at("gradient_checkpointing"));
    assert!(at("gradient_checkpointing") < at("sequence_len"));
    assert!(at("sequence_len") < at("adapter: qlora"));

    // Any other panic is a bug and is not disguised as an error.
    let mut m = model(0.0);
    m.panic_with = "index out of bounds".into();
    let d = data(8);
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        train::train(m, &d, &cfg, &TrainRun::new(dir.path()), &mut NoHooks, &Dev::default())
    }));
    assert!(caught.is_err());
}

#[test]
fn cancel_flag_stops_between_steps() {
    let _serial = serial();
    struct Flag(Arc<AtomicBool>, usize);
    impl TrainHooks<TinyLm<Ad>> for Flag {
        fn on_step(&mut self, r: &StepReport) {
            self.1 = r.step;
            if r.step == 2 {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        fn cancelled(&self) -> bool {
            self.0.load(Ordering::SeqCst)
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mut hooks = Flag(Arc::new(AtomicBool::new(false)), 0);
    let err =
        train::train(model(0.0), &data(24), &resume_cfg(), &TrainRun::new(dir.path()), &mut hooks, &Dev::default())
            .unwrap_err();
    // The stop saves the two steps done (no periodic checkpoint had been written yet).
    assert!(matches!(err, TrainError::Cancelled { step: 2, checkpoint: Some(2) }), "{err}");
    assert_eq!(hooks.1, 2);
}

#[test]
fn parquet_rows_become_padded_micro_batches_with_segments() {
    use arrow::array::{ArrayRef, Int32Builder, ListBuilder, RecordBatch};
    // Columns: input_ids, labels, position_ids; row 0 packs two samples.
    let columns: [[Vec<i32>; 2]; 3] =
        [[vec![5, 6, 7, 8, 9], vec![1, 2]], [vec![-100, 6, 7, -100, 9], vec![1, 2]], [vec![0, 1, 2, 0, 1], vec![0, 1]]];
    let col = |rows: &[Vec<i32>; 2]| -> ArrayRef {
        let mut b = ListBuilder::new(Int32Builder::new());
        for r in rows {
            b.values().append_slice(r);
            b.append(true);
        }
        Arc::new(b.finish())
    };
    let batch = RecordBatch::try_from_iter([
        ("input_ids", col(&columns[0])),
        ("labels", col(&columns[1])),
        ("position_ids", col(&columns[2])),
    ])
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.parquet");
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();

    let d = TrainData::from_parquet(&path).unwrap();
    assert_eq!(d.len(), 2);
    assert_eq!(d.stats(&[0, 1]).tokens, 7);
    assert_eq!(d.stats(&[0]).sum_sq_sample_len, 9 + 4);
    let b = d.micro_batch::<burn::backend::Flex>(&[1, 0], &Dev::default());
    let ints = |t: burn::tensor::Tensor<burn::backend::Flex, 2, burn::tensor::Int>| {
        t.into_data().convert::<i64>().into_vec::<i64>().unwrap()
    };
    assert_eq!(ints(b.input_ids), [1, 2, 0, 0, 0, 5, 6, 7, 8, 9]);
    assert_eq!(ints(b.labels), [1, 2, -100, -100, -100, -100, 6, 7, -100, 9]);
    assert_eq!(ints(b.segment_ids), [1, 1, 0, 0, 0, 1, 1, 1, 2, 2]);
    assert_eq!(ints(b.position_ids), [0, 1, 0, 0, 0, 0, 1, 2, 0, 1]);

    // pad_to_sequence_len: one shape for every batch, a short last batch included.
    let d = d.pad_batches_to(8, 3);
    let b = d.micro_batch::<burn::backend::Flex>(&[1], &Dev::default());
    assert_eq!(b.input_ids.dims(), [3, 8]);
    assert_eq!(ints(b.labels), [vec![1i64, 2], vec![-100; 22]].concat());
    assert_eq!(ints(b.segment_ids), [vec![1i64, 1], vec![0; 22]].concat());
    assert_eq!(d.stats(&[1]).tokens, 2, "padding is not counted as tokens");
}

#[test]
fn batches_padded_to_a_fixed_shape_give_the_same_loss_and_gradients() {
    let _serial = serial();
    let (m, dev) = (model(0.0), Dev::default());
    let plain = data(5);
    let widest = (0..plain.len()).map(|i| plain.stats(&[i]).tokens).max().unwrap();
    let padded = data(5).pad_batches_to(widest + 7, 4);
    for mb in [vec![0, 1], vec![2, 3, 4]] {
        let a = step_gradients::<Ad, _>(&m, &plain, std::slice::from_ref(&mb), &dev);
        let b = step_gradients::<Ad, _>(&m, &padded, std::slice::from_ref(&mb), &dev);
        assert_eq!(a.trained_tokens, b.trained_tokens);
        assert!((a.loss() - b.loss()).abs() < 1e-6, "{} vs {}", a.loss(), b.loss());
        for p in a.grads.paths() {
            let (x, y) = (flat(a.grads.get(p).unwrap().clone()), flat(b.grads.get(p).unwrap().clone()));
            assert!(max_abs_diff(&x, &y) < 1e-6, "{p}");
            assert!(x.iter().any(|v| *v != 0.0), "{p} has no gradient: the test would prove nothing");
        }
    }
}

#[test]
fn epoch_order_is_a_seeded_permutation_per_epoch() {
    let d = data(50);
    let e0 = d.epoch_order(42, 0, true);
    assert_eq!(e0, d.epoch_order(42, 0, true));
    let mut sorted = e0.clone();
    sorted.sort();
    assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    assert_ne!(e0, d.epoch_order(42, 1, true));
    assert_ne!(e0, d.epoch_order(43, 0, true));
    assert_eq!(d.epoch_order(42, 0, false), (0..50).collect::<Vec<_>>());
}

#[test]
fn metrics_jsonl_and_loss_curve_are_written() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let run = TrainRun {
        metrics_jsonl: Some(dir.path().join("metrics.jsonl")),
        loss_curve_png: Some(dir.path().join("loss.png")),
        flops: Some(train::FlopsModel { frozen_matmul_params: 1000, n_layers: 1, d_model: D as u64, peak_flops: 1e12 }),
        ..TrainRun::new(dir.path().join("ckpt"))
    };
    let cfg = TrainConfig { eval_steps: Some(2), ..resume_cfg() };
    let mut hooks = Record { eval_data: Some(data(4)), ..Default::default() };
    train::train(model(0.0), &data(24), &cfg, &run, &mut hooks, &Dev::default()).unwrap();
    let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let records: Vec<MetricsRecord> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let train_n = records.iter().filter(|r| matches!(r, MetricsRecord::Train(_))).count();
    let eval_n = records.iter().filter(|r| matches!(r, MetricsRecord::Eval(_))).count();
    assert_eq!((train_n, eval_n), (12, 6));
    let MetricsRecord::Train(r) = &records[0] else { panic!() };
    assert!(r.tokens > 0 && r.trained_tokens > 0 && r.tokens_per_s > 0.0 && r.grad_norm > 0.0);
    assert!(r.mfu.is_some_and(|m| m > 0.0));
    let img = image::open(dir.path().join("loss.png")).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (800, 480));
    let blue = img.pixels().filter(|p| p.0 == [31, 119, 180]).count();
    let orange = img.pixels().filter(|p| p.0 == [255, 127, 14]).count();
    assert!(blue > 100 && orange > 50, "curves drawn: {blue} blue, {orange} orange pixels");
}

#[test]
fn frozen_parameters_are_not_trained() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let m = model(0.0);
    let embed_before = flat(m.embed.val());
    let (m, s) = train::train(
        m,
        &data(8),
        &TrainConfig { max_steps: Some(3), ..Default::default() },
        &TrainRun::new(dir.path()),
        &mut NoHooks,
        &Dev::default(),
    )
    .unwrap();
    assert_eq!(flat(m.embed.val()), embed_before);
    assert_eq!((s.params.trainable, s.params.frozen), (D * D + D + D * VOCAB, VOCAB * D));
    let _: &dyn CausalLoss<Ad> = &m;
}
