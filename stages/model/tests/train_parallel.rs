//! Data-parallel training on the CPU with the host reducer: W replicas that split each step's
//! micro-batches take the same steps as one process over the same global batch, a replica that
//! fails stops the others, and a checkpoint resumes on another world size.

mod train_support;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use newt_model::train::{
    self, HostReducer, StepReport, TrainConfig, TrainData, TrainError, TrainHooks, TrainRun, trainable_params,
};
use train_support::{Ad, Dev, TinyLm, corpus, max_abs_diff};

/// Training reseeds the process-wide backend RNG every step: tests that train must not overlap.
static TRAINING: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    TRAINING.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

const VOCAB: usize = 16;
const D: usize = 8;

fn model() -> TinyLm<Ad> {
    TinyLm::new(VOCAB, D, 7, 0.0, &Dev::default())
}

fn data(rows: usize) -> TrainData {
    TrainData::from_rows(corpus(rows, VOCAB, 11)).unwrap()
}

/// 26 rows in micro-batches of 2: 13 per epoch, so with 4 per step the last step of each epoch
/// has one micro-batch and, on 2 or 3 replicas, some replicas have none.
fn cfg() -> TrainConfig {
    TrainConfig {
        micro_batch_size: 2,
        gradient_accumulation_steps: 4,
        num_epochs: 2.0,
        learning_rate: 2e-2,
        weight_decay: 0.01,
        warmup_steps: Some(2),
        max_grad_norm: 0.5,
        save_steps: Some(2),
        ..Default::default()
    }
}

#[derive(Default)]
struct Record {
    steps: Vec<StepReport>,
    cancel_after: Option<usize>,
    checkpoints: Vec<usize>,
}

impl TrainHooks<TinyLm<Ad>> for Record {
    fn on_step(&mut self, r: &StepReport) {
        self.steps.push(r.clone());
    }
    fn on_checkpoint(&mut self, step: usize, _dir: &Path) {
        self.checkpoints.push(step);
    }
    fn cancelled(&self) -> bool {
        self.cancel_after.is_some_and(|n| self.steps.last().is_some_and(|s| s.step >= n))
    }
}

fn replicas(world: usize) -> Vec<(TinyLm<Ad>, Dev)> {
    (0..world).map(|_| (model(), Dev::default())).collect()
}

fn parallel(
    world: usize,
    d: &TrainData,
    cfg: &TrainConfig,
    run: &TrainRun,
    hooks: &mut Record,
) -> Result<TinyLm<Ad>, TrainError> {
    let reducer = HostReducer::new(world);
    train::train_data_parallel::<Ad, _>(replicas(world), d, cfg, run, hooks, &reducer).map(|(m, _)| m)
}

fn assert_same_weights(a: &TinyLm<Ad>, b: &TinyLm<Ad>, tol: f32, what: &str) {
    let (pa, pb) = (trainable_params(a), trainable_params(b));
    assert_eq!(pa.keys().collect::<Vec<_>>(), pb.keys().collect::<Vec<_>>());
    for (k, v) in &pa {
        let diff = max_abs_diff(&v.values, &pb[k].values);
        assert!(diff < tol, "{what}: {k} differs by {diff}");
    }
}

fn assert_same_steps(a: &[StepReport], b: &[StepReport], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: step counts");
    for (x, y) in a.iter().zip(b) {
        assert_eq!((x.step, x.tokens, x.trained_tokens), (y.step, y.tokens, y.trained_tokens), "{what}");
        assert!((x.loss - y.loss).abs() < 1e-6, "{what}: step {} loss {} vs {}", x.step, x.loss, y.loss);
        assert!((x.grad_norm - y.grad_norm).abs() < 1e-5, "{what}: step {} grad_norm", x.step);
        assert_eq!(x.lr, y.lr, "{what}: step {} lr", x.step);
    }
}

#[test]
fn replicas_take_the_steps_of_one_process_over_the_same_global_batch() {
    let _serial = serial();
    let (d, cfg) = (data(26), cfg());
    let dir = tempfile::tempdir().unwrap();
    let mut one = Record::default();
    let (single, _) =
        train::train(model(), &d, &cfg, &TrainRun::new(dir.path().join("w1")), &mut one, &Dev::default()).unwrap();
    assert_eq!(one.steps.len(), 8, "13 micro-batches → 4 steps per epoch, the last one short");
    // The weights moved: the comparison below is not between two untrained models.
    let (trained, start) = (trainable_params(&single), trainable_params(&model()));
    assert!(max_abs_diff(&trained["head"].values, &start["head"].values) > 1e-3);

    for world in [2, 3, 4] {
        let mut hooks = Record::default();
        let run = TrainRun::new(dir.path().join(format!("w{world}")));
        let m = parallel(world, &d, &cfg, &run, &mut hooks).unwrap();
        assert_same_steps(&one.steps, &hooks.steps, &format!("W={world}"));
        assert_same_weights(&single, &m, 1e-6, &format!("W={world}"));
        assert_eq!(hooks.checkpoints, [2, 4, 6, 8], "rank 0 alone writes checkpoints");
    }
}

#[test]
fn a_stop_on_two_replicas_resumes_on_one_and_on_four_with_the_same_result() {
    let _serial = serial();
    let (d, cfg) = (data(26), cfg());
    let dir = tempfile::tempdir().unwrap();
    let (uninterrupted, _) =
        train::train(model(), &d, &cfg, &TrainRun::new(dir.path().join("a")), &mut Record::default(), &Dev::default())
            .unwrap();

    for (resume_world, name) in [(1, "b"), (4, "c")] {
        let run = TrainRun::new(dir.path().join(name));
        // Step 3 falls between the periodic checkpoints (every 2): the stop writes its own.
        let mut stopped = Record { cancel_after: Some(3), ..Default::default() };
        let err = parallel(2, &d, &cfg, &run, &mut stopped).err().expect("stopped");
        assert!(matches!(err, TrainError::Cancelled { step: 3, checkpoint: Some(3) }), "{err}");
        assert_eq!(stopped.checkpoints, [2, 3]);

        let mut resumed = Record::default();
        let m = if resume_world == 1 {
            train::train(model(), &d, &cfg, &run, &mut resumed, &Dev::default()).unwrap().0
        } else {
            parallel(resume_world, &d, &cfg, &run, &mut resumed).unwrap()
        };
        assert_eq!(resumed.steps.first().map(|s| s.step), Some(4), "W=2 → W={resume_world}");
        assert_same_weights(&uninterrupted, &m, 1e-6, &format!("W=2 → W={resume_world}"));
    }
}

#[test]
fn a_replica_that_fails_stops_the_others_and_its_error_is_returned() {
    let _serial = serial();
    let (d, cfg) = (data(26), cfg());
    let dir = tempfile::tempdir().unwrap();
    let mut reps = replicas(3);
    // Replica 2 runs out of memory in its first forward pass; ranks 0 and 1 would otherwise
    // wait for its gradients forever.
    reps[2].0.panic_with = "CUDA_ERROR_OUT_OF_MEMORY: out of memory".into();
    let reducer = HostReducer::new(3);
    let err = train::train_data_parallel::<Ad, _>(
        reps,
        &d,
        &cfg,
        &TrainRun::new(dir.path()),
        &mut Record::default(),
        &reducer,
    )
    .err()
    .expect("fails");
    assert!(matches!(err, TrainError::OutOfMemory { step: 1, .. }), "{err}");
}

#[test]
fn replicas_must_match_the_reducer() {
    let (d, cfg) = (data(26), cfg());
    let dir = tempfile::tempdir().unwrap();
    let reducer = HostReducer::new(2);
    let err = train::train_data_parallel::<Ad, _>(
        replicas(3),
        &d,
        &cfg,
        &TrainRun::new(dir.path()),
        &mut Record::default(),
        &reducer,
    )
    .err()
    .expect("refused");
    assert!(err.to_string().contains("3 replicas for a reducer of world size 2"), "{err}");
}
